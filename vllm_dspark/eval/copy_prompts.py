"""The ``copy`` prompt set: requests whose answer mostly repeats the prompt (fix or rename code, correct typos,
rewrite or quote a paragraph), the workload where drafting by copying from the prompt pays most.

Sources are code blocks and paragraphs of ShareGPT *answers* (packaged, offline), never MT-Bench. Only answers
after a record's first one are used: ``gen-data --original-answers`` (part of the drafters' training mix) takes
first answers, so no source is a training answer.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from vllm_dspark.eval.prompts import Prompt

# The first SCAN records of the file, so the selection never depends on the rest (and stays fast).
SCAN = 3000
PER_CATEGORY = 16
TYPOS = 4  # misspelled words per paragraph-typos prompt
# Under ~350 target tokens a prompt, so a 1024-token engine still answers in full (code is ~3 chars a token).
MAX_CODE_CHARS = 900
MAX_PARAGRAPH_CHARS = 1400


@dataclass(frozen=True)
class CopyItem:
    prompt: Prompt  # id "category:record-id:turn-index" names the ShareGPT answer the source comes from
    source: str  # the text as found in that answer
    text: str  # what the prompt embeds: the source, with TYPOS misspellings in paragraph-typos


@dataclass(frozen=True)
class _Category:
    kind: str  # "code" or "paragraph": which source pool it draws from
    instruction: str
    accepts: Callable[[str], bool] = lambda source: True


_STOPWORDS = frozenset(
    "the a an and or of to in on for with is are was were be it that this as by at from can will you your they "
    "their we not has have".split()
)
_FENCE = re.compile(r"^```[\w+#.-]*\n(.*?)\n```", re.S | re.M)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_TYPO_WORD = re.compile(r"(?<![\w'-])[a-z]{6,}(?![\w'-])")  # lowercase words only: whitespace tokens stay put
_SNAKE = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")
_CAMEL = re.compile(r"\b[a-z][a-z0-9]*(?:[A-Z][a-z0-9]+)+\b")


def _sentences(text: str) -> int:
    return len(_SENTENCE_END.findall(text))


def _rename(code: str) -> tuple[str, str] | None:
    """(old, new): the most used snake_case or camelCase name that the code itself assigns or declares (not a
    library's), at least 3 uses, turned into the other style."""
    counts = Counter(_SNAKE.findall(code) + _CAMEL.findall(code))
    for name, n in counts.most_common():  # ties keep first occurrence
        if n < 3:
            break
        own = re.search(rf"(\b(def|function|let|const|var|val|int|float|double|string)\s+{name}\b)|"
                        rf"(\b{name}\s*=[^=])", code)
        new = (re.sub(r"_([a-z0-9])", lambda m: m[1].upper(), name) if "_" in name
               else re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), name))
        if own and not re.search(rf"\b{new}\b", code):
            return name, new
    return None


def _misspell(text: str) -> str:
    """TYPOS lowercase words, evenly spread, each changed by one edit: swap, drop or double a middle letter."""
    words = list(_TYPO_WORD.finditer(text))
    picks = [words[(2 * i + 1) * len(words) // (2 * TYPOS)] for i in range(TYPOS)]
    out, last = [], 0
    for i, m in enumerate(picks):
        w, mid = m[0], len(m[0]) // 2
        if i % 3 == 0 and w[mid - 1] != w[mid]:
            typo = w[: mid - 1] + w[mid] + w[mid - 1] + w[mid + 1:]
        elif i % 3 == 1:
            typo = w[:mid] + w[mid + 1:]
        else:
            typo = w[:mid] + w[mid] + w[mid:]
        out += [text[last: m.start()], typo]
        last = m.end()
    return "".join(out) + text[last:]


CATEGORIES = {
    "code-fix": _Category("code", "Fix any bugs in this code and return the full corrected code:"),
    "code-rename": _Category("code", "", accepts=lambda code: _rename(code) is not None),
    "paragraph-typos": _Category(
        "paragraph", "Correct the spelling in this paragraph and return it in full:",
        accepts=lambda p: len(_TYPO_WORD.findall(p)) >= 2 * TYPOS),
    "paragraph-rewrite": _Category(
        "paragraph", "Rewrite this paragraph in the present tense, keeping its wording wherever you can:",
        accepts=lambda p: len(re.findall(r"\b(was|were|had|did)\b", p)) >= 2),  # a past tense to change
    "summarize-quote": _Category(
        "paragraph", "Quote the three most important sentences of this paragraph verbatim, one per line:",
        accepts=lambda p: _sentences(p) >= 4),
}


def _english(text: str) -> bool:
    words = text.lower().split()
    ascii_share = sum(c.isascii() for c in text) / len(text)
    return ascii_share >= 0.99 and sum(w in _STOPWORDS for w in words) >= 0.2 * len(words)


def _code_ok(code: str) -> bool:
    lines = [line for line in code.splitlines() if line.strip()]
    return (
        200 <= len(code) <= MAX_CODE_CHARS and len(lines) >= 6 and max(map(len, lines)) <= 120
        and sum(c.isascii() for c in code) >= 0.99 * len(code)
        # code, not program output or prose: most lines carry syntax
        and sum(any(c in line for c in "=(){};:[]") for line in lines) >= 0.6 * len(lines)
        and not code.startswith("Traceback")
    )


def _paragraph_ok(p: str) -> bool:
    return (
        60 <= len(p.split()) <= 200 and len(p) <= MAX_PARAGRAPH_CHARS and "\n" not in p
        and p[0].isupper() and p.endswith(".") and _sentences(p) >= 3
        and not any(s in p for s in ("\\", "`", "*", "#", "|", "[", "http", "AI language model"))  # no markup
        and _english(p)
    )


def _sources(conversations: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """(id, text) candidates per kind in file order: at most one of each kind per original conversation (V3
    splits long ones into records ``X_0``, ``X_1``, ...), so the set spreads over many."""
    pools: dict[str, list[tuple[str, str]]] = {"code": [], "paragraph": []}
    seen: set[tuple[str, str]] = set()
    texts: set[str] = set()
    for conv in conversations:
        base = conv["id"].rsplit("_", 1)[0]
        for t, turn in enumerate(conv["conversations"]):
            if t < 3 or turn["from"] != "gpt":  # skip each record's first answer (see the module docstring)
                continue
            found = {
                "code": [m[1] for m in _FENCE.finditer(turn["value"]) if _code_ok(m[1])],
                "paragraph": [p.strip() for p in turn["value"].split("\n\n") if _paragraph_ok(p.strip())],
            }
            for kind, candidates in found.items():
                for text in candidates:
                    if (base, kind) not in seen and text not in texts:
                        seen.add((base, kind))
                        texts.add(text)
                        pools[kind].append((f"{conv['id']}:{t}", text))
    return pools


def copy_items() -> list[CopyItem]:
    """PER_CATEGORY items per category, round-robin over CATEGORIES (so any prefix covers them evenly)."""
    from vllm_dspark.assets import load_sharegpt

    pools = _sources(load_sharegpt(limit=SCAN))
    chosen: dict[str, list[tuple[str, str]]] = {name: [] for name in CATEGORIES}
    for kind, pool in pools.items():
        names = [n for n, c in CATEGORIES.items() if c.kind == kind]
        for source in pool:  # each source to the emptiest category of its kind that wants it
            for name in sorted(names, key=lambda n: len(chosen[n])):  # stable: ties in CATEGORIES order
                if len(chosen[name]) < PER_CATEGORY and CATEGORIES[name].accepts(source[1]):
                    chosen[name].append(source)
                    break
    short = {n: len(c) for n, c in chosen.items() if len(c) < PER_CATEGORY}
    if short:
        raise RuntimeError(f"copy prompts: too few ShareGPT sources in the first {SCAN} records: {short}")
    by_category = {name: [_item(name, sid, text) for sid, text in chosen[name]] for name in CATEGORIES}
    return [items[i] for i in range(PER_CATEGORY) for items in by_category.values()]


def _item(category: str, source_id: str, source: str) -> CopyItem:
    instruction, text = CATEGORIES[category].instruction, source
    if category == "code-rename":
        old, new = _rename(source)
        instruction = f"Rename `{old}` to `{new}` everywhere in this code and return the full code:"
    elif category == "paragraph-typos":
        text = _misspell(source)
    body = f"```\n{text}\n```" if CATEGORIES[category].kind == "code" else text
    return CopyItem(Prompt(f"{category}:{source_id}", category, [f"{instruction}\n\n{body}"]), source, text)


def copy_prompts() -> list[Prompt]:
    return [item.prompt for item in copy_items()]
