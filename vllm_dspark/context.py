"""Per-request drafter context: the injected K/V rows of every draft layer, kept in step with the target.

Rows are projected once when they arrive (never recomputed) and stored in slot-major buffers
``k, v [S, C, Ld, kvh, d]`` (S request slots, C capacity, grown by doubling), so a batch of requests is
gathered with one ``index_select``. A request's rows must cover positions 0..n-1 without holes: a row that
would leave a gap raises :class:`ContextGapError` (the caller then stops drafting for that request rather
than draft from a context with holes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model.drafter import DSparkDrafter


class ContextGapError(RuntimeError):
    """Rows arrived for positions beyond the request's context end (a hole would form)."""


@dataclass
class ContextBatch:
    k: torch.Tensor  # [B, C, Ld, kvh, d]
    v: torch.Tensor  # [B, C, Ld, kvh, d]
    lengths: torch.Tensor  # [B] int64, valid rows per batch row


class ContextStore:
    def __init__(self, drafter: DSparkDrafter, *, initial_slots: int = 8, initial_capacity: int = 256):
        self.drafter = drafter
        cfg = drafter.cfg
        p = drafter.fc.weight
        self._row_shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        self.k = p.new_zeros((initial_slots, initial_capacity, *self._row_shape))
        self.v = torch.zeros_like(self.k)
        self.lengths = [0] * initial_slots
        self.slots: dict[str, int] = {}
        self._free: list[int] = list(range(initial_slots - 1, -1, -1))

    # ----------------------------------------------------------------- queries
    def __contains__(self, req_id: str) -> bool:
        return req_id in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def length(self, req_id: str) -> int:
        slot = self.slots.get(req_id)
        return 0 if slot is None else self.lengths[slot]

    # ----------------------------------------------------------------- updates
    def append(self, rows: list[tuple[str, int, torch.Tensor]]) -> None:
        """rows: (req_id, start_position, features [n, L*Ht]) per request; one batched projection for all.

        A start below the current length overwrites from there (a re-delivered prefix after recompute);
        a start above it raises ContextGapError before anything is written.
        """
        rows = [r for r in rows if r[2].shape[0] > 0]
        if not rows:
            return
        for req_id, start, _ in rows:
            if start > self.length(req_id):
                raise ContextGapError(f"request {req_id!r}: rows start at position {start} but its drafter "
                                      f"context ends at {self.length(req_id)}")
        feats = torch.cat([f for _, _, f in rows])
        positions = torch.cat([torch.arange(s, s + f.shape[0]) for _, s, f in rows]).to(feats.device)
        with torch.inference_mode():
            k, v = self.drafter.context_kv(feats, positions)
        offset = 0
        for req_id, start, f in rows:
            n = f.shape[0]
            slot = self._slot_for(req_id)
            self._reserve(start + n)
            self.k[slot, start:start + n] = k[offset:offset + n]
            self.v[slot, start:start + n] = v[offset:offset + n]
            self.lengths[slot] = start + n
            offset += n

    def truncate(self, req_id: str, length: int) -> None:
        slot = self.slots.get(req_id)
        if slot is not None:
            self.lengths[slot] = min(self.lengths[slot], length)

    def free(self, req_id: str) -> None:
        slot = self.slots.pop(req_id, None)
        if slot is not None:
            self.lengths[slot] = 0
            self._free.append(slot)

    def gather(self, req_ids: list[str]) -> ContextBatch:
        slots = [self.slots[r] for r in req_ids]
        lengths = torch.tensor([self.lengths[s] for s in slots], dtype=torch.long)
        c = max(1, int(lengths.max())) if slots else 1
        index = torch.tensor(slots, dtype=torch.long, device=self.k.device)
        return ContextBatch(self.k[:, :c].index_select(0, index), self.v[:, :c].index_select(0, index), lengths)

    # ----------------------------------------------------------------- storage
    def _slot_for(self, req_id: str) -> int:
        slot = self.slots.get(req_id)
        if slot is None:
            if not self._free:
                self._grow(slots=2 * self.k.shape[0])
            slot = self.slots[req_id] = self._free.pop()
            self.lengths[slot] = 0
        return slot

    def _reserve(self, capacity: int) -> None:
        if capacity > self.k.shape[1]:
            self._grow(capacity=max(capacity, 2 * self.k.shape[1]))

    def _grow(self, *, slots: int | None = None, capacity: int | None = None) -> None:
        s_old, c_old = self.k.shape[:2]
        s_new, c_new = slots or s_old, capacity or c_old
        k = self.k.new_zeros((s_new, c_new, *self._row_shape))
        v = torch.zeros_like(k)
        k[:s_old, :c_old], v[:s_old, :c_old] = self.k, self.v
        self.k, self.v = k, v
        if s_new > s_old:
            self.lengths += [0] * (s_new - s_old)
            self._free = list(range(s_new - 1, s_old - 1, -1)) + self._free
