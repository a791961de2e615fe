"""Stage 5 of the flow: the CMD estimator (steps 1-7 of ``docs/design.md``) and ``update``.

:class:`CMD` (:mod:`~cmdtool.decomposition.estimator`) samples, clusters and hands the
streamed pass to a backend (:mod:`cmdtool.backends`); :func:`update`
(:mod:`~cmdtool.decomposition.update`) folds new epochs into a decomposition.
"""

from cmdtool.decomposition.estimator import CMD, MIN_EPOCHS

__all__ = ["CMD", "MIN_EPOCHS"]
