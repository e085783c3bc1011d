"""`vllm-dspark train`: distil a DSpark drafter from a frozen HF target, online (no feature dump needed).

Read top to bottom: defaults, the learning-rate schedule, the drafter, one training step, checkpoints, the loop
and the CLI; the data and its batch order live in :mod:`.examples`, held-out evaluation in :mod:`.monitor`.
Every step's target features come from one target forward on the step's sequences (:mod:`.features`); the loss
is :func:`.loss.dspark_loss`.

Exact resume: a batch is a pure function of (seed, step) and each sequence's anchors of (seed, its index in the
sample stream), so ``trainer_state.pt`` (weights in float32, optimizer, step, RNG states) is all a resumed run
needs to reproduce the uninterrupted run's losses bit for bit. DDP (``torchrun --nproc_per_node N``, gloo on
CPU): every rank takes a disjoint shard of each global batch; the loss is normalised by the global batch's
weight sum (known before the forward) so the averaged gradient equals the single-process one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cli import HelpFormatter
from ..checkpoint import load_drafter, new_drafter, save_drafter, select_draft_vocab, set_lm_head, target_embeddings
from ..config import DSparkConfig
from ..model.drafter import DSparkDrafter
from .examples import Example, anchor_generator, batch_indices, collate, end_token_ids, load_examples, read_ids, \
    token_counts
from .features import TargetFeatures, fill_feature_cache, load_target
from .loss import CE_LABELS, LOSS_TYPES, LossStats, dspark_loss, expected_tau, sample_anchors, supervised_weight
from .monitor import HeldOut, plot_learning_curve, tau_estimate
from .optim import get_lr, param_groups
from .warmstart import copy_target_layers, feature_scale, folded, grow_layers

# ----------------------------------------------------------------------------- defaults
DEFAULTS = dict(
    layers=2,  # the paper: 2 draft layers already beat a 5-layer DFlash
    markov_rank=256,  # DeepSpec's configs; 0 = the Markov-less (DFlash) ablation
    block_size=7,  # draft tokens per block, as DeepSpec's released drafters
    num_target_layers=5,  # target layers feeding the drafter (DeepSpec: 5, spread from layer 1 to L-2)
    steps=2000,  # optimizer steps
    batch_size=8,  # sequences per global batch (split across DDP ranks)
    micro_batch_size=2,  # sequences per forward on a rank (0 = whole shard): bounds the [rows x vocab] loss
    #                      tensors (~0.2 GB each for SmolLM2's 49k vocabulary at 64 anchors x 7 per sequence)
    lr=6e-4,  # DeepSpec
    min_lr_frac=0.0,  # cosine decays to lr * this
    warmup_frac=0.04,  # DeepSpec: 4% linear warmup
    weight_decay=0.0,  # short distillation runs; the frozen target is the regulariser
    clip=1.0,  # DeepSpec: global grad-norm clip
    anchors_per_seq=64,  # DeepSpec uses 512; the LM head over anchors x block x vocab rows dominates CPU cost
    #                      (0 = every supervised position: the target's forward is shared by more blocks)
    max_len=512,  # tokens per conversation (longer ones are truncated)
    seed=0,
    save_every=500,  # steps between checkpoints (0 = only the final drafter)
    keep_checkpoints=2,  # older step_* folders are deleted
    loss="dspark",  # "ce" = the DFlash baseline (CE only, plus the confidence BCE if the head exists)
    ce_labels="data",  # "target": CE against the target's greedy token (for data the target did not write)
    eval_every=0,  # steps between held-out evaluations (with --heldout)
    heldout_size=64,  # conversations of --heldout evaluated
    save_dtype="float32",  # "bfloat16" halves the final checkpoint
)


# ----------------------------------------------------------------------------- drafter
class LossModule(nn.Module):
    """The drafter with :func:`dspark_loss` as its forward, so DDP can wrap it (DDP syncs gradients of what
    runs through its forward). Returns (weighted_sum, weight_sum, stats [3, g])."""

    def __init__(self, drafter: DSparkDrafter, loss_type: str, ce_labels: str = "data"):
        super().__init__()
        self.drafter, self.loss_type, self.ce_labels = drafter, loss_type, ce_labels

    def forward(self, features, target_logits, input_ids, loss_mask, anchors):
        out = dspark_loss(self.drafter, features, target_logits, input_ids, loss_mask, anchors,
                          loss_type=self.loss_type, ce_labels=self.ce_labels)
        return out.weighted_sum, out.weight_sum, out.stats.as_tensor()


# ----------------------------------------------------------------------------- one step
def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


def train_step(module: nn.Module, target: TargetFeatures, examples: list[Example], sample_ids: list[int], *,
               args: argparse.Namespace, pad_id: int) -> tuple[float, LossStats, int, int]:
    """Forward/backward of this rank's shard of one global batch; gradients left in .grad.

    -> (global loss, global stats, global tokens, global blocks) — identical on every rank.
    """
    rank, world = _world()
    g = (module.module if hasattr(module, "module") else module).drafter.cfg.block_size
    mine = list(range(rank, len(examples), world))
    micro = args.micro_batch_size or len(mine)
    chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
    batches = []
    device = next(module.parameters()).device
    for chunk in chunks:
        ids, attn, mask = collate([examples[i] for i in chunk], pad_id)
        anchors = sample_anchors(mask, args.anchors_per_seq or mask.shape[1],
                                 [anchor_generator(args.seed, sample_ids[i]) for i in chunk])
        batches.append(tuple(t.to(device) for t in (ids, attn, mask, anchors)))
    # The normaliser of the whole global batch, before any forward: DDP averaging stays exact.
    weight = sum((supervised_weight(a, m, g).cpu() for _, _, m, a in batches), torch.zeros(()))
    weight = _all_reduce(weight.double().to(device)).float()
    weighted = torch.zeros((), dtype=torch.float64, device=device)
    stats = torch.zeros(3, g, dtype=torch.float64, device=device)
    blocks = torch.tensor([float(sum(int((a >= 0).sum()) for _, _, _, a in batches))], dtype=torch.float64)
    for j, (ids, attn, mask, anchors) in enumerate(batches):
        tgt = target(ids, attn)
        sync = j == len(batches) - 1 or not hasattr(module, "no_sync")
        with nullcontext() if sync else module.no_sync():
            wsum, _, st = module(tgt.features, tgt.rows, ids, mask, anchors)
            (wsum * world / weight).backward()  # DDP averages over ranks; undo it so the sum is global
        weighted += wsum.detach().double()
        stats += st.to(device)
    reduced = _all_reduce(torch.cat([weighted[None], blocks.to(device), stats.flatten()])).cpu()
    tokens = sum(len(e.ids) for e in examples)
    return (float(reduced[0] / weight.double().cpu()), LossStats.from_tensor(reduced[2:].view(3, g)), tokens,
            int(reduced[1]))


# ----------------------------------------------------------------------------- checkpoints
STATE_FILE = "trainer_state.pt"


def save_checkpoint(directory: Path, drafter: DSparkDrafter, optimizer, step: int, args, *,
                    totals: dict | None = None, scale: torch.Tensor | None = None) -> None:
    with folded(drafter, scale):
        save_drafter(drafter, directory, dtype=getattr(torch, args.save_dtype))
    state = dict(
        step=step,
        model={k: v.detach().clone() for k, v in drafter.trainable_state_dict().items()},  # float32, exact
        optimizer=optimizer.state_dict(),
        rng=dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state()),
        args={k: v for k, v in vars(args).items()},
        totals=dict(totals or {}),  # blocks seen and training seconds so far (the learning curve's x axes)
        feature_scale=scale,
    )
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / STATE_FILE)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's --out folder (-> its newest checkpoints/step_*)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step_*"))
    steps = [s for s in steps if (s / STATE_FILE).is_file()]
    if not steps:
        raise FileNotFoundError(f"--resume {str(path)!r}: no {STATE_FILE} there or in its checkpoints/step_*")
    return steps[-1]


_MUST_MATCH = ("batch_size", "seed", "anchors_per_seq", "max_len", "loss")


def _prune(out: Path, keep: int) -> None:
    steps = sorted((out / "checkpoints").glob("step_*"))
    for old in steps[: max(0, len(steps) - keep)]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


# ----------------------------------------------------------------------------- the loop
def train(args: argparse.Namespace) -> list[dict]:
    """Run (or resume) a training job; returns the log records of this run's steps (all ranks)."""
    rank, world = _world()
    torch.manual_seed(args.seed)
    if args.batch_size % world:
        raise ValueError(f"--batch-size={args.batch_size}: expected a multiple of the {world} DDP ranks")
    if args.loss not in LOSS_TYPES:
        raise ValueError(f"--loss={args.loss!r}: expected one of {list(LOSS_TYPES)}")
    if args.heldout and not args.eval_every:
        raise ValueError(f"--heldout={args.heldout!r}: expected --eval-every N > 0 (steps between evaluations)")
    from transformers import AutoTokenizer

    out = Path(args.out)
    target_model = load_target(args.target).to(args.device)
    target_config = json.loads((Path(args.target) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    heldout_ids = read_ids(args.heldout) if args.heldout else set()
    examples, dropped = load_examples(args.data, tokenizer, args.max_len, exclude=heldout_ids)

    resume_state = None
    if args.resume:
        ckpt = find_checkpoint(args.resume)
        resume_state = torch.load(ckpt / STATE_FILE, weights_only=False)
        for key in _MUST_MATCH:
            if resume_state["args"].get(key) != getattr(args, key):
                raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)!r}: expected "
                                 f"{resume_state['args'].get(key)!r} as in the run being resumed ({ckpt})")
        cfg = DSparkConfig.load(ckpt)
        drafter = DSparkDrafter(cfg)
        missing, unexpected = drafter.load_state_dict(resume_state["model"], strict=False)
        if unexpected or set(missing) - {"embed_tokens.weight", "lm_head.weight"}:
            raise ValueError(f"--resume {ckpt}: trainer state does not fit its config.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        embed, head = target_embeddings(target_model)
        drafter.embed_tokens.weight.data.copy_(embed[: cfg.vocab_size].float())
        set_lm_head(drafter, head)
    elif args.init:
        drafter = load_drafter(args.init, target_model, target_config=target_config)
        if args.grow_layers:
            drafter = grow_layers(drafter, args.grow_layers, target_model)
    else:
        if args.grow_layers:
            raise SystemExit(f"--grow-layers {args.grow_layers}: expected --init DIR as well (the drafter to deepen)")
        draft_ids = None
        if args.draft_vocab:
            counted = examples if not args.vocab_data else \
                load_examples(args.vocab_data, tokenizer, args.max_len, exclude=heldout_ids)[0]
            draft_ids = select_draft_vocab(token_counts(counted, target_config), args.draft_vocab,
                                           always=end_token_ids(tokenizer))
        drafter = new_drafter(target_model, target_config, seed=args.seed, num_layers=args.layers,
                              markov_rank=args.markov_rank, block_size=args.block_size,
                              num_target_layer_ids=args.num_target_layers, draft_token_ids=draft_ids)
        if args.init_target_layers:
            copy_target_layers(drafter, target_model)
    drafter.cfg.check_target(target_config)
    drafter.float().to(args.device).train()
    target = TargetFeatures(target_model, drafter.cfg.target_layer_ids, cache_dir=args.feature_cache)
    if args.cache_only:
        return fill_feature_cache(target, examples, args, pad_id)
    scale = None
    if resume_state is not None and resume_state.get("feature_scale") is not None:
        scale = resume_state["feature_scale"]
    elif args.feature_norm and resume_state is None:
        scale = feature_scale(target, [collate(examples[i:i + 4], pad_id)[:2]
                                       for i in range(0, min(32, len(examples)), 4)],
                              len(drafter.cfg.target_layer_ids))
    target.feature_scale = scale
    heldout = None
    if args.heldout:
        held, _ = load_examples(args.heldout, tokenizer, args.max_len, limit=args.heldout_size)
        heldout = HeldOut(target, held, drafter.cfg.block_size)

    module: nn.Module = LossModule(drafter, args.loss, args.ce_labels)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=None)
    groups = param_groups(drafter, args.top_layers_lr)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    start, totals = 0, dict(blocks=0, seconds=0.0)
    if resume_state is not None:
        totals.update(resume_state.get("totals") or {})
        optimizer.load_state_dict(resume_state["optimizer"])
        for group, want in zip(optimizer.param_groups, groups):  # loading replaced the groups' settings
            group["lr_mult"] = want["lr_mult"]
        start = resume_state["step"]
        rng = resume_state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])

    log_path = out / "train_log.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        old = log_path.read_text().splitlines() if log_path.is_file() and resume_state is not None else []
        log_path.write_text("".join(line + "\n" for line in old if json.loads(line)["step"] <= start))
    records: list[dict] = []
    if heldout is not None and rank == 0 and start == 0:
        # The curve's first point: where a warm start (--init) begins, or chance for a new drafter.
        rec = dict(step=0, blocks=0, hours=0.0, heldout=heldout.accuracy(drafter), heldout_blocks=heldout.blocks)
        records.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    bar = _progress(args, start, rank, len(examples), dropped, drafter)
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        lr = get_lr(step, args.steps, args.lr, args.warmup_frac, args.min_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        idx = batch_indices(step, args.batch_size, len(examples), args.seed)
        sample_ids = [step * args.batch_size + j for j in range(args.batch_size)]
        loss, stats, tokens, blocks = train_step(module, target, [examples[i] for i in idx], sample_ids,
                                                 args=args, pad_id=pad_id)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        totals["blocks"] += blocks
        totals["seconds"] += dt
        acc = stats.acceptance()
        rec = dict(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm, acc=acc, tau_est=expected_tau(acc),
                   greedy=stats.greedy(), supervised=stats.tokens, tokens=tokens, tokens_per_s=tokens / dt,
                   blocks=totals["blocks"], blocks_per_s=blocks / dt, hours=totals["seconds"] / 3600)
        last = step + 1 == args.steps
        if heldout is not None and rank == 0 and ((step + 1) % args.eval_every == 0 or last):
            rec["heldout"] = heldout.accuracy(drafter)  # not timed: the curve's hours are training hours
            rec["heldout_blocks"] = heldout.blocks
        records.append(rec)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if "heldout" in rec:
                plot_learning_curve(log_path, out / "learning_curve.png")
            if bar is not None:
                held = f" held-out {_compact(rec['heldout'][:3])} tau~{tau_estimate(rec['heldout']):.2f}" \
                    if "heldout" in rec else ""
                bar.set_postfix_str(f"loss {loss:.3f} acc {_compact(acc)} blocks/s {blocks / dt:,.0f}{held}")
                bar.update(1)
            if args.save_every and ((step + 1) % args.save_every == 0 or last):
                save_checkpoint(out / "checkpoints" / f"step_{step + 1:06d}", drafter, optimizer, step + 1, args,
                                totals=totals, scale=scale)
                _prune(out, args.keep_checkpoints)
    if bar is not None:
        bar.close()
    if rank == 0:
        with folded(drafter, scale):
            save_drafter(drafter, out, dtype=getattr(torch, args.save_dtype))
    return records


def _compact(values: list[float]) -> str:
    return " ".join(f"{v:.2f}".removeprefix("0") for v in values)


def _progress(args, start: int, rank: int, n_examples: int, dropped: int, drafter: DSparkDrafter):
    if rank != 0 or args.quiet:
        return None
    from tqdm import tqdm

    n_train = sum(p.numel() for p in drafter.parameters() if p.requires_grad)
    print(f"vllm-dspark train: {n_examples} conversations ({dropped} without an assistant turn dropped), "
          f"drafter {drafter.cfg.num_hidden_layers} layers, {n_train / 1e6:.2f} M trainable, "
          f"target layers {drafter.cfg.target_layer_ids}, block {drafter.cfg.block_size}", file=sys.stderr)
    return tqdm(total=args.steps, initial=start, dynamic_ncols=True, desc="train")


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    ap = argparse.ArgumentParser(prog="vllm-dspark train", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--target", required=True, help="target HF folder (frozen; its tokenizer and chat template)")
    ap.add_argument("--data", required=True,
                    help="JSONL from `vllm-dspark gen-data` (answers by the target); several: comma-separated")
    ap.add_argument("--out", required=True, help="output folder: drafter, train_log.jsonl, checkpoints/")
    ap.add_argument("--layers", type=int, default=d["layers"], help="draft transformer layers")
    ap.add_argument("--markov-rank", type=int, default=d["markov_rank"], help="0 = Markov-less ablation")
    ap.add_argument("--block-size", type=int, default=d["block_size"], help="draft tokens per block")
    ap.add_argument("--num-target-layers", type=int, default=d["num_target_layers"],
                    help="target layers feeding the drafter")
    ap.add_argument("--draft-vocab", type=int, default=0,
                    help="draft over the N most frequent assistant tokens of --data (d2t table; cuts the LM head "
                         "cost of training and drafting); 0 = the target's whole vocabulary")
    ap.add_argument("--init", help="start from this drafter folder (its config decides the architecture)")
    ap.add_argument("--grow-layers", type=int, default=0, metavar="N",
                    help="with --init: deepen it to N layers, the new ones from the target's top layers with zero "
                         "output projections (the drafter starts out drafting what --init did)")
    ap.add_argument("--top-layers-lr", metavar="N:X",
                    help="train the top N draft layers at X times --lr (e.g. the layers --grow-layers adds)")
    ap.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per global batch")
    ap.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"],
                    help="sequences per forward on one rank (gradient accumulation); 0 = whole shard")
    ap.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate (DeepSpec)")
    ap.add_argument("--min-lr-frac", type=float, default=d["min_lr_frac"], help="cosine floor, as a fraction of --lr")
    ap.add_argument("--warmup-frac", type=float, default=d["warmup_frac"], help="linear warmup share of --steps")
    ap.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    ap.add_argument("--clip", type=float, default=d["clip"], help="grad-norm clip")
    ap.add_argument("--anchors-per-seq", type=int, default=d["anchors_per_seq"],
                    help="blocks trained per sequence (DeepSpec: 512; 0 = all); the main cost knob")
    ap.add_argument("--max-len", type=int, default=d["max_len"], help="tokens per conversation (truncated)")
    ap.add_argument("--seed", type=int, default=d["seed"], help="init, data order and anchors")
    ap.add_argument("--save-every", type=int, default=d["save_every"],
                    help="steps between checkpoints/step_* (resumable); 0 = final drafter only")
    ap.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"], help="newest step_* kept")
    ap.add_argument("--resume", help="checkpoint folder, or a previous --out (its newest checkpoint)")
    ap.add_argument("--loss", choices=LOSS_TYPES, default=d["loss"],
                    help="dspark = 0.1 CE + 0.9 L1 + BCE; ce = the DFlash baseline (CE + BCE); "
                         "kl = KL(target || drafter) + BCE")
    ap.add_argument("--ce-labels", choices=CE_LABELS, default=d["ce_labels"],
                    help="CE target: the data's next token (DeepSpec) or the target's greedy token there")
    ap.add_argument("--heldout", help="JSONL of target-written conversations never trained on (ids excluded "
                                      "from --data): teacher-forced greedy accuracy per position, learning curve")
    ap.add_argument("--heldout-size", type=int, default=d["heldout_size"], help="conversations of --heldout used")
    ap.add_argument("--eval-every", type=int, default=d["eval_every"], help="steps between held-out evaluations")
    ap.add_argument("--vocab-data", help="JSONL(s) whose assistant tokens pick --draft-vocab (default: --data), "
                                         "e.g. only the target-written part of a mix")
    ap.add_argument("--init-target-layers", action="store_true",
                    help="start the draft layers from the target's top layers, fc passing the last feature "
                         "layer through")
    ap.add_argument("--feature-norm", action="store_true",
                    help="scale each target layer's features to unit RMS before fc (folded into fc when saved)")
    ap.add_argument("--feature-cache", help="cache target features here (fp16; worth it for small targets)")
    ap.add_argument("--cache-only", action="store_true",
                    help="fill --feature-cache for shard --cache-shard of the data, then exit (no training)")
    ap.add_argument("--cache-shard", default="0/1", help="I/N: the share of the data --cache-only computes")
    ap.add_argument("--save-dtype", choices=("float32", "bfloat16"), default=d["save_dtype"],
                    help="dtype of the saved drafter weights (resume state stays float32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (DDP then uses nccl, one GPU per rank)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0 = torch's default)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.device.startswith("cuda") and distributed:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank = _world()[0]
    try:
        records = train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vllm-dspark train: {e}", file=sys.stderr)
        return 2
    finally:
        if distributed and torch.distributed.is_initialized():
            # Leave together: a rank exiting while gloo's threads still talk to the other aborts with
            # "terminate called without an active exception".
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    if rank == 0 and records and not args.quiet:
        last = records[-1]
        print(f"done: step {last['step']} loss {last['loss']:.4f} acc {_compact(last['acc'])} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
