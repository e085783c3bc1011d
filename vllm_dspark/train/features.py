"""Target features for training: the frozen target's hidden states at the drafter's layers, plus its logits.

One forward of a HF causal LM gives both. ``hidden_states[i + 1]`` of HF's ``output_hidden_states`` is the output
of layer ``i`` (index 0 is the embedding output, layer id -1), the same convention as vLLM's aux hidden states
(``aux_layer_ids = target_layer_ids + 1``), so a drafter trained here reads the rows vLLM hands it at serving
time. The final layer's output never feeds the drafter (HF replaces it with the final-normed state anyway).

Online by default. With ``cache_dir`` each sequence's features and final normed hidden state are kept on disk
in float16 (safetensors, keyed by a hash of the target, the layer ids and the token ids); logits are recomputed
from the cached final state with the target's LM head, which is cheap next to the transformer. Worth it for
small targets only (SmolLM2: 5 layers x 576 x 2 bytes ~ 6 KB per token).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch


class RowLogits:
    """The target's logits, computed only for the rows a loss indexes: ``rows[b_idx, pos]`` -> [N, V] float32.

    The loss needs the target's distribution at the supervised positions only (anchors x block rows), far fewer
    than B x T; the [B, T, V] tensor would cost a full LM head pass and ~0.2 GB per sequence at a 49k vocab.
    """

    def __init__(self, final: torch.Tensor, head):
        self.final, self._head = final, head  # final [B, T, Ht] normed hidden state

    def __getitem__(self, index) -> torch.Tensor:
        return self._head(self.final[index])


@dataclass
class TargetOutput:
    features: torch.Tensor  # [B, T, L*Ht] float32, target layers concatenated in target_layer_ids order
    rows: RowLogits  # rows[b, t] = the target's logits predicting token t+1 (computed on demand)

    @property
    def logits(self) -> torch.Tensor:
        """[B, T, V] float32 all logits at once (tests and small inputs; the trainer indexes ``rows``)."""
        return self.rows[:, :]


def load_target(target_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The target as a frozen HF causal LM on CPU (eval, no grad anywhere)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype)
    model.eval().requires_grad_(False)
    return model


class TargetFeatures:
    """Wraps a frozen HF causal LM; ``__call__(input_ids, attention_mask)`` -> :class:`TargetOutput`."""

    def __init__(self, model, layer_ids: list[int], *, cache_dir: str | Path | None = None):
        num_layers = model.config.get_text_config().num_hidden_layers
        bad = [i for i in layer_ids if not -1 <= i < num_layers - 1]
        if bad:
            raise ValueError(f"target_layer_ids={layer_ids}: expected ids in [-1, {num_layers - 2}] (-1 = the "
                             f"embedding output; the target has {num_layers} layers and the final layer never "
                             "feeds the drafter)")
        self.model = model
        self.layer_ids = list(layer_ids)
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # Features from another target or other layers must never be reused: both go into every key.
            ident = json.dumps([model.config.to_dict(), self.layer_ids], sort_keys=True, default=str)
            self._prefix = hashlib.sha256(ident.encode()).hexdigest()[:16]
        self.cache_hits = self.cache_misses = 0
        self.feature_scale: torch.Tensor | None = None  # [L*Ht] multiplies the features (train/warmstart.py)

    @classmethod
    def from_pretrained(cls, target_dir: str | Path, layer_ids: list[int], *,
                        cache_dir: str | Path | None = None) -> "TargetFeatures":
        return cls(load_target(target_dir), layer_ids, cache_dir=cache_dir)

    # ------------------------------------------------------------------ forward
    def _logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(final_hidden.to(self.lm_head.weight.dtype)).float()
        if self.softcap:  # Gemma-style final softcapping, as the HF model applies it
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """-> features [B, T, L*Ht] float32, final normed hidden [B, T, Ht]."""
        out = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       output_hidden_states=True, use_cache=False)
        feats = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1).float()
        return feats, out.last_hidden_state

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetOutput:
        """input_ids [B, T] (right-padded), attention_mask [B, T] (1 = real token) -> TargetOutput."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.cache_dir is None:
            feats, final = self._forward(input_ids, attention_mask)
            out = TargetOutput(feats, RowLogits(final, self._logits))
        else:
            out = self._cached(input_ids, attention_mask)
        if self.feature_scale is not None:
            out.features = out.features * self.feature_scale.to(out.features)
        return out

    # ------------------------------------------------------------------ cache
    def _key(self, ids: torch.Tensor) -> Path:
        digest = hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]
        return self.cache_dir / digest[:2] / f"{self._prefix}-{digest}.safetensors"

    def _cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TargetOutput:
        from safetensors.torch import load_file, save_file

        lengths = attention_mask.sum(1).tolist()
        rows: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for b, n in enumerate(lengths):
            path = self._key(input_ids[b, :n])
            if path.is_file():
                t = load_file(str(path))
                rows.append((t["features"], t["final"]))
                self.cache_hits += 1
            else:
                rows.append(None)
        missing = [b for b, r in enumerate(rows) if r is None]
        if missing:
            self.cache_misses += len(missing)
            n_max = max(lengths[b] for b in missing)
            feats, final = self._forward(input_ids[missing, :n_max], attention_mask[missing, :n_max])
            for j, b in enumerate(missing):
                n = lengths[b]
                entry = {"features": feats[j, :n].half().cpu().contiguous(),
                         "final": final[j, :n].half().cpu().contiguous()}
                path = self._key(input_ids[b, :n])
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file(entry, str(tmp))
                tmp.replace(path)  # atomic: concurrent ranks may write the same key
                rows[b] = (entry["features"], entry["final"])
        B, T = input_ids.shape
        dev = input_ids.device
        feats = torch.zeros(B, T, rows[0][0].shape[-1], device=dev)
        final = torch.zeros(B, T, rows[0][1].shape[-1], device=dev)
        for b, (f, h) in enumerate(rows):
            feats[b, : f.shape[0]] = f.to(dev).float()
            final[b, : h.shape[0]] = h.to(dev).float()
        return TargetOutput(feats, RowLogits(final, self._logits))


def fill_feature_cache(target: TargetFeatures, examples: list, args, pad_id: int) -> list[dict]:
    """--cache-only: run the target once over shard I of N of the data (several processes fill one cache in
    parallel before training runs share it). Sequences sorted by length, so little padding is computed."""
    if target.cache_dir is None:
        raise ValueError("--cache-only: expected --feature-cache DIR to fill")
    try:
        shard, shards = (int(x) for x in args.cache_shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        raise ValueError(f"--cache-shard={args.cache_shard!r}: expected I/N with 0 <= I < N, e.g. 0/2") from None
    from .examples import collate

    unique = {tuple(e.ids): e for e in examples}  # repeated conversations share one cache entry
    mine = sorted(unique.values(), key=lambda e: len(e.ids))[shard::shards]
    micro = max(1, args.micro_batch_size or 4)
    from tqdm import tqdm

    bar = tqdm(total=len(mine), desc=f"feature cache {shard}/{shards}", unit="seq", disable=args.quiet)
    for i in range(0, len(mine), micro):
        ids, attn, _ = collate(mine[i:i + micro], pad_id)
        target(ids, attn)
        bar.update(len(mine[i:i + micro]))
    bar.close()
    return []
