"""The transport: two buffer slots reserved per step and the packing of typed channels into them.

One slot serves the gathers (pieces to their owners), the other the scatters (results back);
each holds a send and a receive region. The pipeline keeps at most one gather and one scatter
in flight (:mod:`.engine`), and a slot is reused only after its previous exchange has been
waited for and unpacked, so two slots suffice. At the start of a step they are reserved at the
size of the schedule's largest bucket (:attr:`~.plan.Schedule.gather_slot`,
:attr:`~.plan.Schedule.scatter_slot`) and every bucket of the step reuses them.

Between steps the engine releases them by default (:meth:`Transport.release`): a training
step's peak memory is in the backward pass, not in the optimizer step (measured at 350M on two
FSDP2 ranks: the slots, 2 x 125 MiB for the LM head's bucket, sat on top of the backward peak),
so kept slots would raise the run's peak by their size. ``keep_buffers=True`` keeps them, for
allocators where a fresh reservation each step costs more than the memory.

Channels other than the piece are float32 values carried bit for bit in wire elements
(:func:`put_f32`, :func:`get_f32`), so a bf16 wire carries them losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .plan import Direction

_ALIGN = 16  # bytes: the receive region starts aligned, so float32 views of it are cheap


@dataclass
class Exchange:
    """One all_to_all in flight: wait, then unpack ``recv`` with ``direction.recv``."""

    work: Any
    send: torch.Tensor
    recv: torch.Tensor
    direction: Direction

    def wait(self) -> None:
        self.work.wait()


class Transport:
    """The exchange group's all_to_all over two reserved slots (this rank's side).

    Args:
        group: the process group (every rank of it runs the same schedule).
    """

    GATHER, SCATTER = 0, 1

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.group = group
        self._slots: list[Optional[torch.Tensor]] = [None, None]  # uint8 storage per slot

    def reserved_bytes(self) -> int:
        """Bytes the two slots hold now."""
        return sum(s.numel() for s in self._slots if s is not None)

    def reserve(self, gather_numel: int, scatter_numel: int, wire: torch.dtype,
                device: torch.device) -> None:
        """Makes both slots large enough for a step whose largest gather and scatter move
        ``gather_numel`` and ``scatter_numel`` wire elements (send + receive), so no bucket of
        the step allocates."""
        elem = torch.empty(0, dtype=wire).element_size()
        for slot, numel in ((self.GATHER, gather_numel), (self.SCATTER, scatter_numel)):
            need = numel * elem + _ALIGN
            buf = self._slots[slot]
            if buf is None or buf.numel() < need or buf.device != device:
                self._slots[slot] = None  # free the old one before the new one is made
                self._slots[slot] = torch.empty(need, dtype=torch.uint8, device=device)

    def release(self) -> None:
        """Drops both slots (their memory goes back to the allocator until the next step)."""
        self._slots = [None, None]

    def buffers(self, slot: int, direction: Direction, wire: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (send, receive) regions of ``slot`` for ``direction``, as wire-dtype views of the
        slot :meth:`reserve` made for this step."""
        elem = torch.empty(0, dtype=wire).element_size()
        send_bytes = direction.send_numel * elem
        recv_at = -(-send_bytes // _ALIGN) * _ALIGN
        need = recv_at + direction.recv_numel * elem
        buf = self._slots[slot]
        if buf is None or buf.numel() < need or buf.device != device:
            raise RuntimeError(f"transport slot {slot} holds {0 if buf is None else buf.numel()} bytes, "
                               f"an exchange needs {need} on {device}: reserve() was not called for this step")
        send = buf[:send_bytes].view(wire)
        recv = buf[recv_at:need].view(wire)
        return send, recv

    def start(self, send: torch.Tensor, recv: torch.Tensor, direction: Direction) -> Exchange:
        """Starts the packed all_to_all (every rank of the group calls it, in the same order)."""
        work = dist.all_to_all_single(recv, send, list(direction.recv_splits),
                                      list(direction.send_splits), group=self.group, async_op=True)
        return Exchange(work=work, send=send, recv=recv, direction=direction)


def put_f32(out: torch.Tensor, values: torch.Tensor) -> None:
    """Writes float32 ``values`` as raw bytes at the start of the wire slice ``out``."""
    out.view(torch.uint8)[: 4 * values.numel()] = values.reshape(-1).contiguous().view(torch.uint8)


def f32_slot(out: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """The first n float32 values of the wire slice ``out`` as a float32 view, or None when
    its byte offset is not float32-aligned."""
    data = out.view(torch.uint8)[: 4 * n]
    return data.view(torch.float32) if data.storage_offset() % 4 == 0 else None


def get_f32(raw: torch.Tensor, n: int) -> torch.Tensor:
    """The n float32 values at the start of the wire slice ``raw``: a view when its byte
    offset is float32-aligned (always on a float32 wire), else a copy."""
    data = raw.view(torch.uint8)[: 4 * n]
    if data.storage_offset() % 4:
        data = data.clone()
    return data.view(torch.float32)
