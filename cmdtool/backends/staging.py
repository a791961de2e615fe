"""Column blocks from the host to the pass's device: reused (pinned) buffers, and on a GPU
the host-to-device copy of the next block overlapped with the compute of this one.

A :class:`Staging` holds a ring of ``slots`` buffer pairs (host, device). :meth:`put`
copies a block into the next slot's host buffer and starts its transfer on a copy
stream, recording an event; :meth:`Staged.tensor` makes the compute stream wait for that
event (the device waits, not the host); :meth:`Staged.release` records, on the compute
stream, when the kernel is done with the device buffer, and the next transfer into that
slot waits for it. The host waits only before overwriting a host buffer whose transfer
has not finished. Buffers grow to the largest block seen and are then reused.

On the CPU the block itself is the kernel's input: no buffer, no copy
(``emulate=True`` runs the ring with ordinary tensors and synchronous copies instead,
so that its logic is exercised without a GPU).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Staged:
    """One block on its way to the device (from :meth:`Staging.put`).

    Attributes
    ----------
    slot : int            the ring slot holding it (-1: the host array itself)
    shape : tuple of int  (T', n)
    """

    owner: Staging
    slot: int
    shape: tuple[int, int]
    _data: torch.Tensor
    _copied: Any = None  # torch.cuda.Event of the transfer

    def tensor(self) -> torch.Tensor:
        """The block on the device, float32 (T', n), C-contiguous; on a GPU the current
        stream waits for its transfer. The kernel may overwrite it."""
        if self._copied is not None:
            torch.cuda.current_stream(self.owner.device).wait_event(self._copied)
        return self._data

    def release(self) -> None:
        """The kernel is done with the device buffer (work queued on the current stream
        so far); the slot may take the next block once that work has run."""
        self.owner._release(self)


class Staging:
    """A ring of reused host/device buffer pairs for the blocks of a pass.

    Parameters
    ----------
    device : torch.device
        Where the kernel runs.
    slots : int
        Blocks in flight (2: one computing, one copying).
    emulate : bool
        On the CPU, copy through the ring as a GPU would (for tests).
    """

    def __init__(self, device: torch.device, slots: int = 2, *, emulate: bool = False) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.active = self.cuda or emulate
        self.slots = slots
        self._host: list[torch.Tensor | None] = [None] * slots
        self._dev: list[torch.Tensor | None] = [None] * slots
        self._copied: list[Any] = [None] * slots  # transfer done (copy stream)
        self._free: list[Any] = [None] * slots  # kernel done (compute stream)
        self._next = 0
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        #: Transfers made and buffer (re)allocations, for tests and benchmarks.
        self.transfers = 0
        self.allocations = 0

    @property
    def overlaps(self) -> bool:
        """Whether the caller should put the next block before computing this one."""
        return self.active

    def put(self, block: np.ndarray) -> Staged:
        """Start moving ``block`` (float32, (T', n), C-contiguous) to the device."""
        shape = (int(block.shape[0]), int(block.shape[1]))
        if not self.active:
            return Staged(self, -1, shape, torch.from_numpy(block))
        slot = self._next
        self._next = (slot + 1) % self.slots
        size = shape[0] * shape[1]
        if self._copied[slot] is not None:  # its last transfer still reads the host buffer
            self._copied[slot].synchronize()
        host = self._buffer(self._host, slot, size, pinned=self.cuda, device=None)
        dev = self._buffer(self._dev, slot, size, pinned=False, device=self.device)
        hv, dv = host[:size].view(shape), dev[:size].view(shape)
        hv.numpy()[...] = block
        self.transfers += 1
        if self._stream is None:  # emulated: the kernel "waits" by running after this
            dv.copy_(hv)
            return Staged(self, slot, shape, dv)
        with torch.cuda.stream(self._stream):
            if self._free[slot] is not None:  # the kernel still reads the device buffer
                self._stream.wait_event(self._free[slot])
            dv.copy_(hv, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        self._copied[slot] = copied
        return Staged(self, slot, shape, dv, copied)

    def _buffer(
        self,
        ring: list[torch.Tensor | None],
        slot: int,
        size: int,
        *,
        pinned: bool,
        device: torch.device | None,
    ) -> torch.Tensor:
        buf = ring[slot]
        if buf is None or buf.numel() < size:
            # (the old buffer's transfer and kernel ran before this slot came round)
            buf = torch.empty(
                size, dtype=torch.float32, device=device or "cpu", pin_memory=pinned
            )
            ring[slot] = buf
            self.allocations += 1
        return buf

    def _release(self, staged: Staged) -> None:
        if staged.slot < 0 or not self.cuda:
            return
        free = torch.cuda.Event()
        free.record(torch.cuda.current_stream(self.device))
        self._free[staged.slot] = free


_LOCAL = threading.local()


def staging_for(device: torch.device) -> Staging:
    """This thread's :class:`Staging` for ``device`` (kept, so that its pinned buffers
    are reused from one block, or Dask task, to the next)."""
    cache: dict[str, Staging] = getattr(_LOCAL, "cache", None) or {}
    _LOCAL.cache = cache
    key = str(device)
    if key not in cache:
        cache[key] = Staging(device)
    return cache[key]
