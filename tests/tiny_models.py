"""Tiny models, tokenizers and corpora the tests build (imported by conftest.py and by test modules as
``from tiny_models import ...``: a plain module, since several folders have a ``conftest``)."""
from __future__ import annotations

from pathlib import Path


# CPU attention supports head sizes 32, 64, 80, ... (not 16), hence 2 heads of 64 for hidden 128.
TINY_SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=256,
    vocab_size=512,
    max_position_embeddings=512,
)
# Same ids as SmolLM2: 0 = <|endoftext|> (unk/pad), 1 = <|im_start|> (bos), 2 = <|im_end|> (eos).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_WORDS = (
    "the a of and to in is was he she it they we you that for on with as at by from this have not but what all "
    "were when there can an your which their said if do will each about how up out them then many some so "
    "these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where "
    "most know get through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end along while "
    "might next sound below saw something thought both few those always looked show large often together asked"
).split()


def _tiny_corpus(n_sentences: int = 2000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        lines.append(" ".join(words).capitalize() + rng.choice(".?!,;:") + " " + str(rng.randint(0, 999)))
    return lines


def build_tiny_tokenizer(out: Path, vocab_size: int = TINY_SHAPE["vocab_size"]):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens (any text encodes), saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    # The model's vocab must equal the tokenizer's: pad with reserved tokens if training stopped short.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
        model_max_length=TINY_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: Path, architecture: str, seed: int = 0) -> Path:
    """Save a random ``architecture`` ("llama" or "qwen3") model of ``TINY_SHAPE`` plus tokenizer to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[
        architecture
    ]
    config = config_cls(
        **TINY_SHAPE,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        # 20x the usual 0.02: at 0.02 a random model's greedy output collapses into repeating one token and
        # top-2 logit gaps fall to ~1e-4 (argmax then hinges on float rounding that differs between batch
        # shapes). At 0.4, 64 greedy tokens hold ~50-60 distinct ids and top-2 gaps stay around 0.005-0.08.
        initializer_range=0.4,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    model.save_pretrained(out)
    build_tiny_tokenizer(out)
    return out


def build_smooth_llama(logit_scale: float = 1.0):
    """A random TINY_SHAPE Llama at init range 0.08, seeded (the same weights every call).

    The 0.4 of ``build_tiny_model`` gives a target whose greedy next token is chaotic in its context: no small
    drafter generalises it to unseen prompts within minutes of CPU; at 0.08 answers still hold ~19 distinct
    tokens per 48 but depend on context smoothly. Its T=1 distributions are nearly flat (perplexity ~360 of
    512): ``logit_scale`` multiplies the LM head (4 gives perplexity ~10-16, top token ~0.38 on average) for
    tests that sample at temperature 1.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                      initializer_range=0.08)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    if logit_scale != 1.0:
        model.lm_head.weight.mul_(logit_scale)
    return model


def own_answers(model, tokenizer, n: int, seed: int, new_tokens: int = 48, temperature: float = 0.0):
    """The target's answers to ``n`` random chat prompts, kept as token ids (no text round trip), as
    ``trainer.Example`` rows (loss mask on the answer). Greedy by default; ``temperature`` > 0 samples
    (no top-k/top-p, seeded by ``seed``)."""
    import random

    import torch
    from vllm_dspark.train import trainer

    rng = random.Random(seed)
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": " ".join(rng.choices(_WORDS, k=rng.randint(3, 8)))}],
        tokenize=True, add_generation_prompt=True)["input_ids"] for _ in range(n)]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # left-padded for generate
    sampling = dict(do_sample=False)
    if temperature > 0:
        torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=new_tokens,
                             pad_token_id=0, **sampling)
    return [trainer.Example(p + out[i, T:].tolist(), [False] * len(p) + [True] * new_tokens)
            for i, p in enumerate(prompts)]


def train_in_memory(drafter, target, data, *, steps: int, lr: float = 3e-3, batch: int = 8):
    """The trainer's own pieces (get_lr, batch_indices, train_step) in a loop, without files: for tests that
    need a drafter that learned something. Returns the last step's stats."""
    import torch

    from vllm_dspark.train import trainer

    args = trainer.build_parser().parse_args(["--target", "-", "--data", "-", "--out", "-",
                                              "--anchors-per-seq", "16", "--batch-size", str(batch)])
    module = trainer.LossModule(drafter, "dspark")
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    stats = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = trainer.get_lr(step, steps, lr, 0.04)
        idx = trainer.batch_indices(step, batch, len(data), seed=0)
        _, stats, _, _ = trainer.train_step(module, target, [data[i] for i in idx],
                                         [step * batch + j for j in range(batch)], args=args, pad_id=0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    return stats

