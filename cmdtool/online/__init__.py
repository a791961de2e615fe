"""CMD while training runs: in the training loop (:class:`OnlineCMD`, :class:`EmbeddedCMD`)
and beside it, following the folder a job writes checkpoints into (``cmdtool watch``,
:mod:`cmdtool.online.watch`).

``docs/design.md``, "Online and embedded CMD", describes the method.
"""

from cmdtool.online.embedded import EmbeddedCMD
from cmdtool.online.incremental import OnlineCMD
from cmdtool.online.warmup import WarmupError

__all__ = ["EmbeddedCMD", "OnlineCMD", "WarmupError"]
