"""Training: the loss against a hand computation, learning on a tiny target, exact resume, DDP equivalence.

Every run here is single-threaded (the test machines are small and shared); the whole file takes ~2 minutes.
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import own_answers, train_in_memory

from vllm_dspark.checkpoint import init_weights, load_drafter
from vllm_dspark.config import DSparkConfig
from vllm_dspark.model.drafter import DSparkDrafter, block_attention_mask
from vllm_dspark.train import examples as train_examples
from vllm_dspark.train import trainer
from vllm_dspark.train.features import TargetFeatures, load_target
from vllm_dspark.train.loss import dspark_loss, sample_anchors, supervision
from vllm_dspark.train.monitor import greedy_acceptance

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_drafter(seed=0, **kw) -> DSparkDrafter:
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               intermediate_size=96, vocab_size=101, rms_norm_eps=1e-6, rope_theta=10000.0, block_size=3,
               mask_token_id=100, target_layer_ids=[1, 3], num_target_layers=6, target_hidden_size=48, markov_rank=8)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = DSparkDrafter(DSparkConfig(**cfg))
    init_weights(m, std=0.2)
    for p in m.parameters():  # every weight non-trivial, the zero-initialised Markov output included
        p.data.add_(0.1 * torch.randn_like(p))
    if m.d2t is not None:  # a reduced draft vocabulary: a sorted random subset of the target's ids
        ids = torch.randperm(cfg["vocab_size"])[: m.cfg.draft_vocab].sort().values
        m.d2t.copy_(ids - torch.arange(ids.numel()))
    return m.double()


# ----------------------------------------------------------------------------- the loss by hand
@torch.no_grad()
def hand_loss(m: DSparkDrafter, feats, logits, ids, mask, anchors, loss_type="dspark", ce_labels="data"):
    """One block at a time through the drafter's inference path; loss terms with explicit loops."""
    cfg, g = m.cfg, m.cfg.block_size
    draft_ids = list(range(cfg.vocab_size)) if m.d2t is None else m.draft_token_ids.tolist()
    total = weights = 0.0
    acc = [[] for _ in range(g)]
    for b in range(ids.shape[0]):
        for a in anchors[b]:
            if a < 0:
                continue
            k_ctx, v_ctx = m.context_kv(feats[b, :a], torch.arange(a))
            q_ids = m.query_ids(ids[b, a:a + 1], g)
            h = m.block_hidden(q_ids, a + torch.arange(g)[None], k_ctx[None], v_ctx[None],
                               block_attention_mask(torch.tensor([a]), a, g))[0].double()
            for k in range(g):
                label_pos = a + 1 + k
                if label_pos >= ids.shape[1] or not mask[b, label_pos]:
                    break  # supervision stops at the first position outside the assistant mask
                prev, label = int(ids[b, a + k]), int(ids[b, label_pos])
                if ce_labels == "target":  # the target's greedy token after position a+k
                    label = max(range(cfg.vocab_size), key=lambda v: float(logits[b, a + k, v]))
                markov = m.markov_head is not None
                e = m.markov_head.markov_w1.weight[prev].double() if markov else torch.zeros(0, dtype=torch.float64)
                z = [float(m.lm_head.weight[v].double() @ h[k]
                           + (m.markov_head.markov_w2.weight[v].double() @ e if markov else 0.0))
                     for v in range(cfg.draft_vocab)]
                zmax = max(z)
                s = sum(math.exp(x - zmax) for x in z)
                q = [0.0] * cfg.vocab_size  # over the target vocabulary: zero outside the draft vocabulary
                for v, x in enumerate(z):
                    q[draft_ids[v]] = math.exp(x - zmax) / s
                t = [float(x) for x in logits[b, a + k]]
                tmax = max(t)
                st = sum(math.exp(x - tmax) for x in t)
                p = [math.exp(x - tmax) / st for x in t]
                ce = -math.log(q[label]) if label in draft_ids else 0.0  # undraftable labels carry no CE
                l1 = sum(abs(qi - pi) for qi, pi in zip(q, p))
                c = min(1.0, max(0.0, 1 - l1 / 2))
                w_conf = m.confidence_head.proj.weight[0].double()
                zc = float(w_conf @ torch.cat([h[k], e]) + m.confidence_head.proj.bias[0])
                sig = 1 / (1 + math.exp(-zc))
                bce = -(c * math.log(sig) + (1 - c) * math.log(1 - sig))
                kl = sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in draft_ids)
                per = {"dspark": 0.1 * ce + 0.9 * l1, "ce": ce, "kl": kl}[loss_type] + bce
                w = math.exp(-k / 4)
                total += w * per
                weights += w
                acc[k].append(c)
    return total / weights, weights, [sum(x) / len(x) for x in acc if x]


def toy_batch(seed=0, vocab=101, width=96):
    torch.manual_seed(seed)
    T = 11
    ids = torch.randint(0, 100, (2, T))
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 3:10] = True  # position 10 = the template's newline after the end token: not supervised
    mask[1, 4:8] = True  # the second row is 8 tokens long (padding after)
    feats = torch.randn(2, T, width, dtype=torch.float64)
    logits = 3 * torch.randn(2, T, vocab, dtype=torch.float64)
    # Row 0: a full block (2), one cut by the mask (8: labels 9 then 10 unsupervised); row 1: cut by its end.
    anchors = torch.tensor([[2, 8], [5, -1]])
    return feats, logits, ids, mask, anchors


@pytest.mark.parametrize("loss_type,markov_rank,draft_vocab,ce_labels",
                         [("dspark", 8, None, "data"), ("ce", 8, None, "data"), ("ce", 0, None, "data"),
                          ("dspark", 8, 40, "data"), ("ce", 0, 40, "data"), ("dspark", 8, None, "target"),
                          ("ce", 8, 40, "target"), ("kl", 8, None, "data"), ("kl", 0, 40, "data")])
def test_loss_matches_hand_computation(loss_type, markov_rank, draft_vocab, ce_labels):
    # ("ce", 0) = the DFlash baseline; draft_vocab 40 = a reduced draft vocabulary (d2t) of the 101 target ids;
    # ce_labels "target" = CE against the target's argmax instead of the data's next token
    m = tiny_drafter(markov_rank=markov_rank, draft_vocab_size=draft_vocab)
    feats, logits, ids, mask, anchors = toy_batch()
    out = dspark_loss(m, feats, logits, ids, mask, anchors, loss_type=loss_type, ce_labels=ce_labels)
    want, weight, acc = hand_loss(m, feats, logits, ids, mask, anchors, loss_type, ce_labels)
    sup = supervision(anchors, mask, 3)
    assert sup.tolist() == [[[True] * 3, [True, False, False]], [[True, True, False], [False] * 3]]
    assert out.stats.tokens == 6
    assert float(out.weight_sum) == pytest.approx(weight, rel=1e-6)
    assert out.loss.item() == pytest.approx(want, rel=2e-5)
    assert out.stats.acceptance() == pytest.approx(acc, rel=1e-4)


def test_one_step_decreases_loss():
    m = tiny_drafter().float()
    feats, logits, ids, mask, anchors = (t.float() if t.is_floating_point() else t for t in toy_batch())
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    before = dspark_loss(m, feats, logits, ids, mask, anchors)
    before.loss.backward()
    assert m.embed_tokens.weight.grad is None and m.lm_head.weight.grad is None  # frozen target copies
    opt.step()
    after = dspark_loss(m, feats, logits, ids, mask, anchors)
    assert after.loss.item() < before.loss.item() - 1e-3


def test_anchors_have_a_supervised_next_token_and_follow_their_generator():
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 10:30] = True
    mask[1, 35:37] = True
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]
    a = sample_anchors(mask, 8, gens())
    assert a.shape == (2, 8)
    assert all(9 <= x <= 28 for x in a[0].tolist()) and len(set(a[0].tolist())) == 8
    assert sorted(a[1][a[1] >= 0].tolist()) == [34, 35]
    assert torch.equal(a, sample_anchors(mask, 8, gens()))


def test_chat_mask_covers_assistant_turns_up_to_their_end_token(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the first answer"},
            {"role": "user", "content": "and again"}, {"role": "assistant", "content": "a second one"}]
    ex = train_examples.encode_conversation(tok, msgs, 512, train_examples.end_token_ids(tok))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    spans, start = [], None
    for i, flag in enumerate(ex.mask + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    assert len(spans) == 2
    for (s, e), msg in zip(spans, msgs[1::2]):
        assert tok.decode(ex.ids[s:e - 1]) == msg["content"] and ex.ids[e - 1] == im_end
    prefix = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert spans[0][0] == len(prefix)
    assert train_examples.encode_conversation(tok, msgs, 10, train_examples.end_token_ids(tok)).ids == ex.ids[:10]


# ----------------------------------------------------------------------------- target features
def test_target_features_are_the_aux_hidden_states_and_logits(tiny_llama_dir, tmp_path):
    model = load_target(tiny_llama_dir)
    ids = torch.randint(3, 512, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0  # right padding
    ref = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    out = TargetFeatures(model, [0, 2])(ids, attn)
    torch.testing.assert_close(out.features, torch.cat([ref.hidden_states[1], ref.hidden_states[3]], -1))
    torch.testing.assert_close(out.logits, ref.logits)
    alone = TargetFeatures(model, [0, 2])(ids[1:, :7])  # padding changes nothing on the real tokens
    # (hidden states reach ~600 at init range 0.4: 1e-3 absolute is float32 rounding of another kernel path)
    torch.testing.assert_close(out.features[1, :7], alone.features[0], atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="final layer"):
        TargetFeatures(model, [1, 3])

    cached = TargetFeatures(model, [0, 2], cache_dir=tmp_path)
    first, second = cached(ids, attn), cached(ids, attn)
    assert (cached.cache_misses, cached.cache_hits) == (2, 2)
    torch.testing.assert_close(first.features, second.features, atol=0, rtol=0)
    torch.testing.assert_close(second.features[0], out.features[0], atol=2e-2, rtol=2e-3)  # fp16 storage
    torch.testing.assert_close(second.logits[1, :7], out.logits[1, :7], atol=5e-2, rtol=1e-2)


def test_layer_minus_one_features_are_the_targets_embedding_output(tiny_llama_dir):
    model = load_target(tiny_llama_dir)
    ids = torch.randint(3, 512, (2, 9))
    out = TargetFeatures(model, [-1, 1])(ids)
    embed = model.get_input_embeddings()(ids)  # computed here, not through output_hidden_states
    torch.testing.assert_close(out.features[..., :embed.shape[-1]], embed, rtol=0, atol=0)
    layer1 = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(out.features[..., embed.shape[-1]:], layer1)
    with pytest.raises(ValueError, match=r"expected ids in \[-1, 2\]"):
        TargetFeatures(model, [-2, 1])


# ----------------------------------------------------------------------------- learning
def test_training_raises_greedy_acceptance_on_held_out_prompts(smooth_target, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    train_set, held_out = own_answers(smooth_target, tok, 160, seed=0), own_answers(smooth_target, tok, 6, seed=1)
    drafter = trainer.new_drafter(smooth_target, smooth_target.config.to_dict(), seed=0, num_layers=2,
                                  markov_rank=32, block_size=4, num_target_layer_ids=2)
    target = TargetFeatures(smooth_target, drafter.cfg.target_layer_ids)
    before = greedy_acceptance(drafter, target, held_out, anchors_per_seq=16)

    train_in_memory(drafter, target, train_set, steps=300)
    after = greedy_acceptance(drafter, target, held_out, anchors_per_seq=16)
    assert before.rounds == after.rounds == 96
    assert before.survival[0] <= 0.02  # an untrained drafter guesses (almost) nothing
    assert after.survival[0] >= 0.15 and after.tau >= before.tau + 0.15, (before, after)
    # The training monitor's held-out accuracy is the teacher-forced greedy match rate, computed independently.
    from vllm_dspark.train.monitor import HeldOut

    monitor = HeldOut(target, held_out, 4, anchors_per_seq=16, seed=7)
    want = teacher_forced_accuracy(drafter, smooth_target, target, held_out, 4, 16, 7)
    assert 0.15 <= want[0] < 1 and monitor.blocks == 96
    assert monitor.accuracy(drafter) == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------- the CLI: resume, DDP
@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    from tiny_models import _WORDS

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    words = lambda a, b: " ".join(rng.choices(_WORDS, k=rng.randint(a, b)))
    rows = []
    for i in range(24):
        msgs = [{"role": "user", "content": words(3, 8)}, {"role": "assistant", "content": words(8, 20)}]
        if i % 3 == 0:  # some multi-turn conversations
            msgs += [{"role": "user", "content": words(2, 5)}, {"role": "assistant", "content": words(4, 10)}]
        rows.append({"id": str(i), "source": "test", "messages": msgs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_args(target, data, out, *extra) -> list[str]:
    return ["--target", str(target), "--data", str(data), "--out", str(out), "--layers", "1", "--markov-rank", "16",
            "--block-size", "4", "--num-target-layers", "2", "--batch-size", "4", "--anchors-per-seq", "8",
            "--lr", "3e-3", "--quiet", "--threads", "1", *extra]


def losses(out: Path) -> list[float]:
    recs = map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
    return [r["loss"] for r in recs if "loss" in r]  # step 0 is the held-out point before training


@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_resume_continues_exactly(tiny_llama_dir, chat_file, tmp_path, draft_vocab):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    vocab = ("--draft-vocab", str(draft_vocab))  # 40 = a reduced draft vocabulary picked from the data
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, straight, "--steps", "6", "--save-every", "3",
                                 *vocab)) == 0
    ckpt = straight / "checkpoints" / "step_000003"
    assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "config.json").is_file()
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, resumed, "--steps", "6", "--resume", str(ckpt))) == 0
    assert len(losses(straight)) == 6 and losses(resumed) == losses(straight)[3:]  # bit-identical
    a, b = (load_drafter(d, tiny_llama_dir).state_dict() for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = load_drafter(straight, tiny_llama_dir)
    if draft_vocab:  # the most frequent assistant tokens, the end-of-turn token always among them
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
        examples, _ = train_examples.load_examples(chat_file, tok, 512)
        counts = train_examples.token_counts(examples, json.loads((tiny_llama_dir / "config.json").read_text()))
        ids = final.draft_token_ids
        assert final.cfg.draft_vocab == ids.numel() == draft_vocab
        assert set(train_examples.end_token_ids(tok)) <= set(ids.tolist())
        assert counts[ids].min() >= counts.sort(descending=True).values[draft_vocab - 1]
        assert torch.equal(final.lm_head.weight, load_target(tiny_llama_dir).lm_head.weight[ids])
    else:
        assert final.d2t is None
    # The final drafter omits the frozen target copies and loads against the target.
    from safetensors import safe_open

    with safe_open(str(straight / "model.safetensors"), "pt") as f:
        assert not {"embed_tokens.weight", "lm_head.weight"} & set(f.keys())
    # A changed data setting would silently break exactness: refused with a clear message.
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, tmp_path / "x", "--steps", "6", "--resume", str(ckpt),
                                 "--seed", "1")) == 2


def test_top_layers_lr_scales_only_their_updates(tiny_llama_dir, chat_file, tmp_path):
    """--top-layers-lr 1:X: one AdamW step moves the top layer X times as far (Adam's first step and its weight
    decay are both linear in the learning rate) and every other weight exactly as at 1x."""
    weights = {}
    for mult in (1, 2, 4):
        out = tmp_path / f"x{mult}"
        assert trainer.main(cli_args(tiny_llama_dir, chat_file, out, "--layers", "2", "--steps", "1",
                                     "--top-layers-lr", f"1:{mult}")) == 0
        weights[mult] = load_drafter(out, tiny_llama_dir).state_dict()
    top = [k for k in weights[1] if k.startswith("layers.1.")]
    assert top and any(k.startswith("layers.0.") for k in weights[1])
    for k in weights[1]:
        w1, w2, w4 = (weights[m][k].double() for m in (1, 2, 4))
        if k in top:  # w_m = w_0 + m * delta: w4 - w1 = 3 (w2 - w1), and the step did move them
            assert (w2 - w1).abs().max() > 0 and torch.allclose(w4 - w1, 3 * (w2 - w1), atol=1e-6), k
        else:
            assert torch.equal(w1, w2) and torch.equal(w1, w4), k
    bad = trainer.build_parser().parse_args(cli_args(tiny_llama_dir, chat_file, tmp_path / "y", "--layers", "2",
                                                     "--top-layers-lr", "3:2"))
    with pytest.raises(ValueError, match=r"--top-layers-lr='3:2': expected 1 <= N <= 2 \(the drafter's layers\)"):
        trainer.train(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_match_one_process(tiny_llama_dir, chat_file, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ("--steps", "3", "--save-every", "0")
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, single, *common)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "vllm_dspark.train.trainer",
           *cli_args(tiny_llama_dir, chat_file, ddp, *common)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(ddp) == pytest.approx(losses(single), abs=1e-5, rel=0)
    print("loss differences", [x - y for x, y in zip(losses(ddp), losses(single))])
    # Adam divides by sqrt(v): float-rounding-level gradient differences move near-zero-gradient weights by up
    # to ~lr * 1e-2; an unsynchronised rank would be off by up to lr (3e-3) per step.
    a, b = (load_drafter(d, tiny_llama_dir).state_dict() for d in (single, ddp))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0)


def test_cache_only_shards_fill_the_cache_that_training_then_reads(tiny_llama_dir, chat_file, tmp_path):
    cache = tmp_path / "cache"
    for shard in ("0/2", "1/2"):
        assert trainer.main(cli_args(tiny_llama_dir, chat_file, tmp_path / "c", "--feature-cache", str(cache),
                                     "--cache-only", "--cache-shard", shard)) == 0
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 24 and not (tmp_path / "c" / "train_log.jsonl").exists()  # one per conversation
    stamps = [f.stat().st_mtime_ns for f in files]
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, tmp_path / "t", "--feature-cache", str(cache),
                                 "--steps", "2", "--save-every", "0")) == 0
    assert [f.stat().st_mtime_ns for f in sorted(cache.rglob("*.safetensors"))] == stamps  # read, not rewritten
    assert len(losses(tmp_path / "t")) == 2
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, tmp_path / "c", "--feature-cache", str(cache),
                                 "--cache-only", "--cache-shard", "2/2")) == 2


# ----------------------------------------------------------------------------- monitoring, warm starts
@torch.no_grad()
def teacher_forced_accuracy(m, model, target, examples, g: int, anchors_per_seq: int, seed: int) -> list[float]:
    """Independently of the monitor: one block per anchor through the inference path, the Markov head fed the
    true previous tokens, the draft's argmax against the target model's own argmax."""
    hits, count = [0] * g, [0] * g
    for i, ex in enumerate(examples):
        ids = torch.tensor(ex.ids)[None]
        mask = torch.tensor(ex.mask)[None]
        anchors = sample_anchors(mask, anchors_per_seq, [torch.Generator().manual_seed(seed + i)])[0]
        out = model(input_ids=ids).logits[0]
        feats = target(ids).features[0]
        for a in anchors.tolist():
            if a < 0:
                continue
            k_ctx, v_ctx = m.context_kv(feats[:a], torch.arange(a))
            h = m.block_hidden(m.query_ids(ids[0, a:a + 1], g), a + torch.arange(g)[None], k_ctx[None], v_ctx[None],
                               block_attention_mask(torch.tensor([a]), a, g))[0]
            for k in range(g):
                if a + 1 + k >= len(ex.ids) or not ex.mask[a + 1 + k]:
                    break
                z = m.base_logits(h[k]) + m.markov_head.bias(m.markov_head.embed(ids[0, a + k])).float()
                hits[k] += int(int(m.to_target_ids(z.argmax())) == int(out[a + k].argmax()))
                count[k] += 1
    return [h / c for h, c in zip(hits, count)]


def test_copied_target_layers_read_the_last_feature_layer_as_the_target_does(tiny_llama_dir):
    from vllm_dspark.checkpoint import new_drafter
    from vllm_dspark.train.warmstart import copy_target_layers

    model = load_target(tiny_llama_dir)
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    m = new_drafter(model, cfg, seed=0, num_layers=2, markov_rank=16, block_size=3, num_target_layer_ids=2)
    assert copy_target_layers(m, model) == [2, 3]
    layer = model.model.layers[3]
    assert torch.equal(m.layers[1].mlp.down_proj.weight, layer.mlp.down_proj.weight)
    assert torch.equal(m.layers[0].self_attn.k_proj.weight, model.model.layers[2].self_attn.k_proj.weight)
    ids = torch.randint(0, 500, (1, 9))
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    feats = torch.cat([hs[i + 1] for i in m.cfg.target_layer_ids], -1)[0]
    last = hs[m.cfg.target_layer_ids[-1] + 1][0]  # what layer 2's input norm reads in the target
    assert torch.allclose(m.project_context(feats), model.model.layers[2].input_layernorm(last), atol=1e-5)


def test_grown_drafter_drafts_what_it_did_and_its_new_layers_come_from_the_target(tiny_llama_dir):
    from vllm_dspark.checkpoint import new_drafter
    from vllm_dspark.train.warmstart import grow_layers

    model = load_target(tiny_llama_dir)
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    m = new_drafter(model, cfg, seed=0, num_layers=1, markov_rank=16, block_size=3, num_target_layer_ids=2)
    for p in m.parameters():  # a drafter with every weight non-trivial, as a trained one
        p.data.add_(0.05 * torch.randn_like(p))
    big = grow_layers(m, 3, model)
    assert big.cfg.num_hidden_layers == 3 and len(big.layers) == 3 and m.cfg.num_hidden_layers == 1
    assert torch.equal(big.layers[0].self_attn.q_proj.weight, m.layers[0].self_attn.q_proj.weight)
    assert torch.equal(big.layers[1].self_attn.k_proj.weight, model.model.layers[2].self_attn.k_proj.weight)
    assert torch.equal(big.layers[2].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    assert not big.layers[2].mlp.down_proj.weight.any() and not big.layers[1].self_attn.o_proj.weight.any()
    feats = torch.randn(7, m.fc.in_features)
    ids = torch.randint(0, 500, (1, 7))
    a, g = 5, m.cfg.block_size

    def hidden(d):
        k_ctx, v_ctx = d.context_kv(feats[:a], torch.arange(a))
        return d.block_hidden(d.query_ids(ids[0, a:a + 1], g), a + torch.arange(g)[None], k_ctx[None], v_ctx[None],
                              block_attention_mask(torch.tensor([a]), a, g))[0]
    torch.testing.assert_close(hidden(big), hidden(m), rtol=1e-5, atol=1e-6)
    big.layers[2].mlp.down_proj.weight.data.normal_()  # the check can fail: a live new layer changes the output
    assert not torch.allclose(hidden(big), hidden(m), atol=1e-3)
    with pytest.raises(ValueError, match=r"num_layers=1: expected more than the drafter's 1"):
        grow_layers(m, 1, model)


def test_feature_norm_heldout_and_curve_resume_exactly(tiny_llama_dir, chat_file, tmp_path):
    held = tmp_path / "held.jsonl"
    rows = chat_file.read_text().splitlines()
    held.write_text("\n".join(rows[:4]) + "\n")  # ids 0-3: evaluated, never trained on
    extra = ("--feature-norm", "--heldout", str(held), "--eval-every", "2", "--ce-labels", "target")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, straight, "--steps", "4", "--save-every", "2",
                                 *extra)) == 0
    ckpt = straight / "checkpoints" / "step_000002"
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, resumed, "--steps", "4", "--resume", str(ckpt),
                                 *extra)) == 0
    assert losses(resumed) == losses(straight)[2:]
    recs = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "heldout" in r] == [0, 2, 4] and again[-1]["heldout"] == recs[-1]["heldout"]
    assert recs[0]["blocks"] == 0 and recs[0]["hours"] == 0
    # A warm start's curve begins where the drafter it starts from ended (scale folded into fc at save).
    warm = tmp_path / "warm"
    assert trainer.main(cli_args(tiny_llama_dir, chat_file, warm, "--steps", "1", "--init", str(straight),
                                 "--heldout", str(held), "--eval-every", "1")) == 0
    first = json.loads((warm / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["heldout"] == recs[-1]["heldout"]
    assert recs[-1]["blocks"] == again[-1]["blocks"] > recs[1]["blocks"] > 0  # the curve's x axis goes on
    assert (straight / "learning_curve.png").stat().st_size > 10_000
    # The saved drafter holds the scale inside fc: on raw target features it projects as the trained one did.
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    scale = state["feature_scale"]
    assert scale is not None and not torch.allclose(scale, torch.ones_like(scale))
    saved = load_drafter(ckpt, tiny_llama_dir)
    trained = load_drafter(ckpt, tiny_llama_dir)
    trained.load_state_dict(state["model"], strict=False)  # unscaled fc, as trained
    x = torch.randn(5, saved.fc.in_features)
    assert torch.allclose(saved.project_context(x), trained.project_context(x * scale), atol=1e-2)


def test_examples_load_across_files_skip_heldout_ids_and_keep_unicode_line_separators(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    row = lambda i, text: json.dumps({"id": i, "messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": text}]},
                                     ensure_ascii=False) + "\n"
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(row("x", "one\u2028two") + row("y", "three"))  # U+2028 is a line break to str.splitlines()
    b.write_text(row("z", "four") + '{"id": "w", "messa')  # a line still being written by gen-data
    examples, dropped = train_examples.load_examples(f"{a},{b}", tok, 64, exclude={"y"})
    assert len(examples) == 2 and dropped == 0
    assert "one\u2028two" in tok.decode(examples[0].ids) and "four" in tok.decode(examples[1].ids)
    assert train_examples.read_ids(a) == {"x", "y"}


def test_packed_block_attention_equals_a_dense_mask():
    from vllm_dspark.train.loss import block_layout

    m = tiny_drafter().float()  # 4 query heads over 2 KV heads (GQA)
    B, T, g = 2, 13, 3
    anchors = torch.tensor([[0, 4, 9, 11], [6, 7, -1, -1]])  # -1 = padding block: no context at all
    ids = torch.randint(0, 100, (B, T))
    feats = torch.randn(B, T, m.fc.in_features)
    ctx_k, ctx_v = m.context_kv(feats.flatten(0, 1), torch.arange(T).repeat(B))
    ctx_k, ctx_v = ctx_k.unflatten(0, (B, T)), ctx_v.unflatten(0, (B, T))
    a = anchors.clamp(min=0)
    pos = (a[:, :, None] + torch.arange(g)).view(B, -1)
    q_ids = m.query_ids(ids.gather(1, a).flatten(), g).view(B, -1)
    # Dense: query row r of block r // g sees context j < its anchor and the g rows of its own block.
    Q = pos.shape[1]
    dense = torch.zeros(B, Q, T + Q, dtype=torch.bool)
    for b in range(B):
        for r in range(Q):
            i = r // g
            dense[b, r, : int(a[b, i])] = True
            dense[b, r, T + i * g: T + (i + 1) * g] = True
    want = m.block_hidden(q_ids, pos, ctx_k, ctx_v, dense)
    got = m.block_hidden(q_ids, pos, ctx_k, ctx_v, block_layout(anchors, T, g))
    assert torch.allclose(got, want, atol=1e-5)
