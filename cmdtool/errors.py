"""The one exception tree of cmdtool.

Every error the tool raises on bad input is a :class:`CmdtoolError`. Each subclass also
subclasses the matching builtin (as zarr does), so ``except FileNotFoundError`` keeps
working for library users, and carries the process exit code the CLI uses for it.

Exit codes (documented in the README):

====  ==========================================================================
code  meaning
====  ==========================================================================
0     success
1     internal error (a bug: please report it with ``--debug`` output)
2     usage: an option value is invalid (bad ``--modes``, ``--epochs``, ...)
3     not found: SOURCE, STORE, a decomposition or an epoch does not exist
4     bad checkpoint: unreadable, truncated, unsafe to load, non-finite values
5     mismatch: a checkpoint's tensors or shapes differ from the store's
6     store: the store is corrupt, of a newer format, or cannot be written
7     device: the requested compute device is not available
8     cluster: the Dask scheduler cannot be reached, or a worker or task was lost
9     evaluation: the ``--eval`` function cannot be loaded, raises, or returns non-numbers
10    gate failed: ``--fail-if-worse``, CMD scored worse than raw (``GateFailed``)
11    object store: credentials missing or refused, access denied, network failure
130   interrupted (Ctrl-C)
====  ==========================================================================
"""

from __future__ import annotations


class CmdtoolError(Exception):
    """Root of every error cmdtool raises on bad input or a bad environment."""

    exit_code: int = 1


class UsageError(CmdtoolError, ValueError):
    """An option or argument value is invalid."""

    exit_code = 2


class NotFoundError(CmdtoolError, FileNotFoundError):
    """Something the command needs does not exist."""

    exit_code = 3


class SourceNotFoundError(NotFoundError):
    """The checkpoint folder is missing, empty, or holds no recognisable checkpoint."""


class StoreNotFoundError(NotFoundError):
    """The trajectory store does not exist."""


class DecompositionNotFoundError(NotFoundError, KeyError):
    """The store holds no decomposition of the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EpochNotFoundError(NotFoundError, KeyError):
    """A requested epoch label is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointError(CmdtoolError, ValueError):
    """A checkpoint file cannot be read: corrupt, truncated or of unknown layout."""

    exit_code = 4


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need code execution (pickled globals) to be loaded."""


class NonFiniteError(CheckpointError):
    """A checkpoint holds NaN or Inf values and ``allow_nonfinite`` is off."""


class MismatchError(CmdtoolError, ValueError):
    """A checkpoint's tensor names, shapes or kinds differ from the store's."""

    exit_code = 5


class StoreError(CmdtoolError, OSError):
    """The store is corrupt, of an unsupported format version, or not writable."""

    exit_code = 6


class ResultChangedError(StoreError):
    """A decomposition was republished while a reader used it (readers start again)."""


class DeviceError(CmdtoolError, RuntimeError):
    """The requested compute device is not available."""

    exit_code = 7


class ClusterError(CmdtoolError, ConnectionError):
    """The Dask cluster (``--cluster``) cannot be reached, or lost a task or worker mid-run."""

    exit_code = 8


class ObjectStoreError(CmdtoolError, OSError):
    """An object store (``s3://`` ...) cannot be used: missing or refused credentials,
    access denied, or the network failed (a missing bucket or key is a NotFoundError)."""

    exit_code = 11


class EvaluationError(CmdtoolError, RuntimeError):
    """The ``--eval`` function cannot be imported, lacks the function, raises, or returns
    something other than a dict of metric name to number."""

    exit_code = 9
