"""CMD inside training frameworks: callbacks for PyTorch Lightning
(:mod:`cmdtool.integrations.lightning`, extra ``cmdtool[lightning]``) and the Hugging Face
Trainer (:mod:`cmdtool.integrations.transformers`, extra ``cmdtool[transformers]``).

Importing this package imports neither framework; each module imports its own.
:mod:`cmdtool.integrations.common` holds the framework-free part.
"""
