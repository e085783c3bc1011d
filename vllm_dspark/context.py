"""Per-request drafter context: the injected K/V rows of every draft layer, kept in step with the target.

Rows are projected once (never recomputed) and stored in slot-major buffers ``k, v [S, C, Ld, kvh, d]``
(S request slots, C capacity, grown by doubling), so a batch of requests is gathered with one
``index_select``. ``append(..., defer=True)`` keeps the raw rows until drafting reads their K/V (``gather``) or
too many are pending: steps that do not draft then cost a list append, and one projection later reads the
weights once for all of them. Prefix blocks completed while their rows are deferred are offered raw and
projected only when a request takes them: a request that ends before drafting resumes is never projected.
A request's rows must cover positions 0..n-1 without holes: a row that would leave a gap raises
:class:`ContextGapError` (the caller then stops drafting for that request rather than draft from a context
with holes).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .model.drafter import DSparkDrafter


class ContextGapError(RuntimeError):
    """Rows arrived for positions beyond the request's context end (a hole would form)."""


@dataclass
class ContextBatch:
    k: torch.Tensor  # [B, C, Ld, kvh, d]
    v: torch.Tensor  # [B, C, Ld, kvh, d]
    lengths: torch.Tensor  # [B] int64, valid rows per batch row


@dataclass
class RawBlock:
    """A prefix block offered while its last rows were deferred (not projected): ``k, v`` [m, Ld, kvh, d] for
    the first m rows, ``feats`` [bs - m, L*Ht] the raw rows from position ``start``. Projected when a request
    first takes it (:meth:`ContextStore.fill_from_prefix_cache`)."""

    k: torch.Tensor
    v: torch.Tensor
    feats: torch.Tensor
    start: int


def _nbytes(entry) -> int:
    tensors = (entry.k, entry.v, entry.feats) if isinstance(entry, RawBlock) else entry
    return sum(t.numel() * t.element_size() for t in tensors)


class PrefixCache:
    """Context rows per full block of tokens, keyed by the hash chain of the token prefix (as vLLM's prefix
    cache keys its KV blocks). A context row depends only on the tokens up to its position, so a request whose
    prompt hits vLLM's prefix cache (and so delivers no hidden states for the cached part) can take its first
    rows from an earlier request with the same prefix instead of drafting from a context with holes.
    A block is (k, v) or a :class:`RawBlock` (projected on first use). Least-recently-used blocks are evicted
    beyond ``max_bytes``.
    """

    def __init__(self, block_size: int, max_bytes: int):
        self.block_size, self.max_bytes = block_size, max_bytes
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor] | RawBlock] = OrderedDict()
        self.nbytes = 0

    def chain(self, tokens: np.ndarray, known: list[bytes]) -> list[bytes]:
        """Extend ``known`` (keys of the first blocks) to every full block of ``tokens``."""
        keys, bs = list(known), self.block_size
        for j in range(len(keys), len(tokens) // bs):
            prev = keys[-1] if keys else b""
            keys.append(hashlib.blake2b(prev + np.asarray(tokens[j * bs:(j + 1) * bs], np.int64).tobytes(),
                                        digest_size=16).digest())
        return keys

    def put(self, key: bytes, entry: tuple[torch.Tensor, torch.Tensor] | RawBlock, *, replace: bool = False) -> None:
        """Store ``entry`` (tensors the cache may keep: copies or tensors nobody else writes)."""
        old = self.blocks.get(key)
        if old is not None:
            self.blocks.move_to_end(key)
            if not replace:
                return
            self.nbytes -= _nbytes(old)
        self.blocks[key] = entry
        self.nbytes += _nbytes(entry)
        while self.nbytes > self.max_bytes and len(self.blocks) > 1:
            self.nbytes -= _nbytes(self.blocks.popitem(last=False)[1])

    def get(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor] | RawBlock | None:
        hit = self.blocks.get(key)
        if hit is not None:
            self.blocks.move_to_end(key)
        return hit


class ContextStore:
    def __init__(self, drafter: DSparkDrafter, *, initial_slots: int = 8, initial_capacity: int = 256,
                 prefix_cache: PrefixCache | None = None):
        self.drafter = drafter
        cfg = drafter.cfg
        p = drafter.fc.weight
        self._row_shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        self.k = p.new_zeros((initial_slots, initial_capacity, *self._row_shape))
        self.v = torch.zeros_like(self.k)
        self.lengths = [0] * initial_slots
        self.slots: dict[str, int] = {}
        self._free: list[int] = list(range(initial_slots - 1, -1, -1))
        self.prefix_cache = prefix_cache
        self._chains: dict[str, list[bytes]] = {}  # block keys of each request's cached prefix
        # Deferred rows per request, (start, features) in arrival order (lengths already count them); rows below
        # a request's smallest deferred start are projected, in its slot.
        self._pending: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self._pending_rows = 0

    # Deferred raw rows kept before all are projected at once. Under load drafting pauses for up to ~1000 steps
    # and a request's rows are projected only if it drafts again; at 32 requests in flight SmolLM2's rows (11 KB
    # each) reach ~85 MB, and a cap of 4096 rows made every row projected anyway (c=32: 1.7 ms per step).
    MAX_PENDING_BYTES = 512 * 2**20

    # ----------------------------------------------------------------- queries
    def __contains__(self, req_id: str) -> bool:
        return req_id in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def length(self, req_id: str) -> int:
        slot = self.slots.get(req_id)
        return 0 if slot is None else self.lengths[slot]

    def deferred_rows(self, req_id: str) -> int:
        """Rows of this request not projected yet (what reading its K/V would project first)."""
        return sum(f.shape[0] for _, f in self._pending.get(req_id, ()))

    # ----------------------------------------------------------------- updates
    def append(self, rows: list[tuple[str, int, torch.Tensor]], *, defer: bool = False, owned: bool = False) -> None:
        """rows: (req_id, start_position, features [n, L*Ht]) per request; one batched projection for all.

        A start below the current length overwrites from there (a re-delivered prefix after recompute);
        a start above it raises ContextGapError before anything is written. ``defer``: keep the raw rows and
        project them with the next :meth:`flush` (lengths count them at once); they are copied unless
        ``owned`` (the caller hands over tensors nobody else writes, e.g. views of a tensor made for this call).
        """
        rows = [r for r in rows if r[2].shape[0] > 0]
        if not rows:
            return
        for req_id, start, _ in rows:
            if start > self.length(req_id):
                raise ContextGapError(f"request {req_id!r}: rows start at position {start} but its drafter "
                                      f"context ends at {self.length(req_id)}")
        if defer:
            for req_id, start, f in rows:
                self.lengths[self._slot_for(req_id)] = start + f.shape[0]
                # a copy: a view of the runner's buffers may change, or keep a whole step's features alive
                self._pending.setdefault(req_id, []).append((start, f if owned else f.clone()))
                self._pending_rows += f.shape[0]
            if self._pending_rows * f.shape[1] * f.element_size() > self.MAX_PENDING_BYTES:
                self.flush()
            return
        self.flush()
        self._project(rows)
        for req_id, start, f in rows:
            self.lengths[self.slots[req_id]] = start + f.shape[0]

    def flush(self, req_ids: list[str] | None = None) -> None:
        """Project the deferred rows (one batched call): all of them, or only those of ``req_ids`` (the
        others stay deferred)."""
        if not self._pending:
            return
        rows = []
        for req_id in list(self._pending) if req_ids is None else req_ids:
            mine = self._pending.pop(req_id, None)
            if mine is not None:
                self._pending_rows -= sum(f.shape[0] for _, f in mine)
                rows += [(req_id, start, f) for start, f in mine]
        if rows:
            self._project(rows)

    def _project(self, rows: list[tuple[str, int, torch.Tensor]]) -> None:
        """Write the K/V of ``rows`` into their slots, in order (a later row may overwrite an earlier one)."""
        feats = torch.cat([f for _, _, f in rows])
        # Runs of rows that continue one another (a paused request's one row per step) are written at once.
        runs: list[list] = []  # [req_id, start, n]
        for req_id, start, f in rows:
            last = runs[-1] if runs else None
            if last is not None and last[0] == req_id and last[1] + last[2] == start:
                last[2] += f.shape[0]
            else:
                runs.append([req_id, start, f.shape[0]])
        lens = torch.tensor([n for _, _, n in runs])
        shift = torch.tensor([s for _, s, _ in runs]) - (torch.cumsum(lens, 0) - lens)  # position - row index
        positions = torch.arange(feats.shape[0]) + torch.repeat_interleave(shift, lens)
        with torch.inference_mode():
            k, v = self.drafter.context_kv(feats, positions.to(feats.device))
        offset = 0
        for req_id, start, n in runs:
            slot = self._slot_for(req_id)
            self._reserve(start + n)
            self.k[slot, start:start + n] = k[offset:offset + n]
            self.v[slot, start:start + n] = v[offset:offset + n]
            offset += n

    def append_step(self, rows: list[tuple[str, int, torch.Tensor]],
                    tokens: Callable[[str], np.ndarray]) -> list[tuple[str, int]]:
        """Append one engine step's rows (deferred; owned views of the step's features) and offer the prefix blocks
        they complete; ``tokens(req_id)``: the request's token ids from position 0.

        A row starting beyond its request's context means vLLM's prefix cache served the first ``start`` tokens,
        possibly from blocks another request computes in this very step (the children of an n > 1 request, each
        served part of the prompt): those come from our own prefix cache, each request's new rows appended at once
        so that the blocks they complete serve the next; shortest cached prefix first, again while that makes
        progress. Returns (req_id, start) of the rows that would still leave a hole (not appended)."""
        def add(batch):
            self.append(batch, defer=True, owned=True)
            for req_id, pos, f in batch:
                self.publish_blocks(req_id, tokens(req_id)[:pos + f.shape[0]])

        add([r for r in rows if r[1] <= self.length(r[0])])
        late = sorted((r for r in rows if r[1] > self.length(r[0])), key=lambda r: r[1])
        progress = True
        while late and progress:
            progress, waiting = False, []
            for req_id, pos, f in late:
                if self.fill_from_prefix_cache(req_id, tokens(req_id)[:pos]) >= pos:
                    add([(req_id, pos, f)])
                    progress = True
                else:
                    waiting.append((req_id, pos, f))
            late = waiting
        return [(req_id, pos) for req_id, pos, _ in late]

    def publish_blocks(self, req_id: str, tokens: np.ndarray) -> None:
        """Offer this request's newly completed blocks to the prefix cache (tokens: its ids from position 0).
        Rows still deferred go raw (:class:`RawBlock`): projected only if a request takes the block."""
        cache, slot = self.prefix_cache, self.slots.get(req_id)
        if cache is None or slot is None:
            return
        n = min(self.lengths[slot], len(tokens))
        known = self._chains.get(req_id, [])
        if n // cache.block_size <= len(known):
            return  # no block completed since the last offer
        keys = cache.chain(tokens[:n], known)
        self._chains[req_id] = keys
        bs = cache.block_size
        hi0 = len(keys) * bs
        mine = self._pending.get(req_id, ())
        p0 = min([hi0, *(start for start, _ in mine)])  # rows from p0 on are deferred
        raw = None
        if p0 < hi0:  # the deferred rows of the new blocks, in arrival order (a later row overwrites)
            raw = mine[0][1].new_empty((hi0 - p0, mine[0][1].shape[1]))
            for start, f in mine:
                if start < hi0 and start + f.shape[0] > p0:
                    a, b = max(start, p0), min(start + f.shape[0], hi0)
                    raw[a - p0:b - p0] = f[a - start:b - start]
        for j in range(len(known), len(keys)):
            lo, hi = j * bs, (j + 1) * bs
            m = min(max(p0 - lo, 0), bs)
            k, v = self.k[slot, lo:lo + m].clone(), self.v[slot, lo:lo + m].clone()
            cache.put(keys[j], (k, v) if m == bs else RawBlock(k, v, raw[lo + m - p0:hi - p0], lo + m))

    def fill_from_prefix_cache(self, req_id: str, tokens: np.ndarray) -> int:
        """Copy cached blocks covering ``tokens`` (the prefix up to where delivered rows start) into the
        request's context, from its current length on (raw blocks among them projected in one call); returns
        the new length."""
        cache = self.prefix_cache
        if cache is None:
            return self.length(req_id)
        self.flush([req_id])  # its own deferred rows first (they end where the cached blocks start)
        bs = cache.block_size
        keys = cache.chain(tokens, [])
        hits = []
        for j in range(self.length(req_id) // bs, len(keys)):
            hit = cache.get(keys[j])
            if hit is None:
                break
            hits.append((j, hit))
        raw = [(j, h) for j, h in hits if isinstance(h, RawBlock)]
        if raw:
            feats = torch.cat([h.feats for _, h in raw])
            positions = torch.cat([torch.arange(h.start, h.start + h.feats.shape[0]) for _, h in raw])
            with torch.inference_mode():
                k, v = self.drafter.context_kv(feats, positions.to(feats.device))
            offset, done = 0, {}
            for j, h in raw:
                n = h.feats.shape[0]
                done[j] = (torch.cat([h.k, k[offset:offset + n]]), torch.cat([h.v, v[offset:offset + n]]))
                cache.put(keys[j], done[j], replace=True)
                offset += n
            hits = [(j, done.get(j, h)) for j, h in hits]
        for j, (k, v) in hits:
            slot = self._slot_for(req_id)
            self._reserve((j + 1) * bs)
            self.k[slot, j * bs:(j + 1) * bs], self.v[slot, j * bs:(j + 1) * bs] = k, v
            self.lengths[slot] = (j + 1) * bs
        return self.length(req_id)

    def truncate(self, req_id: str, length: int) -> None:
        slot = self.slots.get(req_id)
        if slot is not None:
            self.lengths[slot] = min(self.lengths[slot], length)

    def free(self, req_id: str) -> None:
        """Forget a request (its blocks were offered as they completed; its deferred rows are dropped)."""
        slot = self.slots.pop(req_id, None)
        self._chains.pop(req_id, None)
        mine = self._pending.pop(req_id, None)
        if mine is not None:
            self._pending_rows -= sum(f.shape[0] for _, f in mine)
        if slot is not None:
            self.lengths[slot] = 0
            self._free.append(slot)

    def gather(self, req_ids: list[str]) -> ContextBatch:
        self.flush(req_ids)
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
