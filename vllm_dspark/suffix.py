"""Suffix drafts: continuations copied from a request's own text and from recent finished outputs.

SuffixDecoding (arXiv 2411.04975): find the longest suffix of the text that occurred before, read what followed
its occurrences, and draft the most frequent continuation token by token. Copying costs no drafter time, and on
text that repeats (code edits, summaries, this project's looping SmolLM2) it drafts long and well. Each draft
token comes with its count statistics; :class:`SuffixCalibration` turns them into a survival per position,
learned online from what verification accepted, which the load-aware policy plans with next to the drafter's
confidences. Numpy and Python only; imports no vLLM.

Convention: ``tokens`` is a request's prompt and output so far, the newest token last (the draft anchor).
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SuffixCalibration", "SuffixDraft", "SuffixDrafter", "TokenIndex"]

SEP = -1  # between texts in the shared cache: matches nothing, ends every continuation
OWN, OUTPUTS, CORPUS = "own", "outputs", "corpus"  # where a suffix draft was copied from
ORIGINS = (OWN, OUTPUTS, CORPUS)


class TokenIndex:
    """Token texts and, for each bigram, the positions of its second token: where a pattern ending in that
    bigram occurred and what followed it. Tokens are a Python list: lookups read single tokens, which a list
    serves several times faster than a numpy array (every request, every step)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.where: dict[int, list[int]] = {}

    @property
    def n(self) -> int:
        return len(self.tokens)

    def extend(self, new) -> None:
        new = [int(t) for t in new]
        t, where = self.tokens, self.where
        prev = t[-1] if t else SEP
        for i, x in enumerate(new, start=len(t)):
            if prev != SEP and x != SEP:
                where.setdefault((prev << 32) | x, []).append(i)
            prev = x
        t.extend(new)

    def matches(self, pattern: list[int], depth: int, recent: int) -> tuple[list[int], int]:
        """(starts, m): where the continuations of the longest suffix of ``pattern`` (newest last, 2..``depth``
        tokens) that occurred here begin, newest first, and its length m (0 and [] when even the last bigram
        never occurred). Only the ``recent`` newest occurrences of that bigram are looked at."""
        if len(pattern) < 2:
            return [], 0
        hits = self.where.get((pattern[-2] << 32) | pattern[-1])
        if not hits:
            return [], 0
        t, n, best, starts = self.tokens, len(self.tokens), 0, []
        for i in reversed(hits[-recent:]):
            if i + 1 >= n:  # the text's last token: nothing followed it yet
                continue
            m, lim = 2, min(depth, len(pattern), i + 1)
            while m < lim and t[i - m] == pattern[-1 - m]:
                m += 1
            if m > best:
                best, starts = m, [i + 1]
            elif m == best:
                starts.append(i + 1)
        return starts, best

    def rebuild_from(self, keep_from: int) -> None:
        """Keep tokens[keep_from:] only (the oldest go), re-indexed."""
        rest = self.tokens[keep_from:]
        self.tokens, self.where = [], {}
        self.extend(rest)


@dataclass
class SuffixDraft:
    """One suffix draft: tokens, the count statistics behind each, and where they came from."""

    tokens: list[int]
    ratio: list[float]  # per token: its count / the candidates still agreeing with the draft before it
    support: list[int]  # per token: those candidates
    match: int  # length of the matched suffix
    origin: str  # OWN (the request's text), OUTPUTS (recent finished outputs) or CORPUS (text loaded at start)
    sampled: bool  # drafted for a request that samples (temperature > 0)
    survival: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [len(tokens)], set by the calibration


def walk(index: TokenIndex, starts: list[int], k: int,
         own_end: int | None = None) -> tuple[list[int], list[float], list[int]]:
    """The most frequent continuation of ``starts`` (newest first; ties go to the newest), up to ``k`` tokens.

    ``own_end``: the index is the request's own text, ``own_end`` tokens long; a continuation that reaches the
    end reads on into the draft itself (a loop of period p drafts beyond p tokens)."""
    t, n = index.tokens, index.n
    draft, ratio, support = [], [], []
    cur = starts
    for d in range(k):
        if len(cur) == 1:  # one candidate left: copy it on (most drafts end as one; the loop below, unrolled)
            c = cur[0]
            for i in range(c + d, c + k):
                if i < n:
                    x = t[i]
                elif own_end is not None and i - own_end < len(draft):
                    x = draft[i - own_end]
                else:
                    break
                if x == SEP:
                    break
                draft.append(x)
                ratio.append(1.0)
                support.append(1)
            break
        if own_end is None:
            toks = [t[c + d] if c + d < n else SEP for c in cur]
        else:
            toks = []
            for c in cur:
                i = c + d
                if i < n:
                    toks.append(t[i])
                elif i - own_end < len(draft):
                    toks.append(draft[i - own_end])
                else:
                    toks.append(SEP)
        live = [(c, x) for c, x in zip(cur, toks) if x != SEP]
        if not live:
            break
        if len(live) == 1:
            best, count = live[0][1], 1
        else:
            counts: dict[int, int] = {}
            for _, x in live:
                counts[x] = counts.get(x, 0) + 1
            best = max(counts, key=counts.__getitem__)  # first seen = newest among equals
            count = counts[best]
        draft.append(best)
        ratio.append(count / len(live))
        support.append(len(live))
        cur = [c for c, x in live if x == best]
    return draft, ratio, support


class SuffixCalibration:
    """P(suffix draft token accepted | the ones before it accepted), per bin of its statistics, learned online.

    Bins: the token's count ratio, its support, the matched suffix's length, its depth in the draft, where it was
    copied from (a request's own text repeats more reliably than other texts), and whether the request samples (a
    copied token is accepted with probability p(x) at temperature > 0, not 0 or 1). Each bin starts at the counts'
    own estimate, ratio * support / (support + 1), worth ``prior`` observations."""

    RATIO = (0.5, 0.8, 0.999)
    SUPPORT = (1, 2, 5)
    MATCH = (2, 4, 8)
    DEPTH = (1, 3)

    def __init__(self, prior: float = 4.0, decay: float = 0.999):
        self.prior, self.decay = prior, decay
        self.shape = (len(self.RATIO) + 1, len(self.SUPPORT) + 1, len(self.MATCH) + 1, len(self.DEPTH) + 1,
                      len(ORIGINS), 2)
        self._strides = [int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape))]
        # Flat Python lists, read and written a few cells per draft (numpy's per-call cost was most of a lookup's).
        # Decay is lazy: true count = stored * scale; each observation divides its increments by the scale.
        size = int(np.prod(self.shape))
        self._acc, self._dra = [0.0] * size, [0.0] * size
        self._scale = 1.0

    @property
    def accepted(self) -> np.ndarray:
        return np.array(self._acc).reshape(self.shape) * self._scale

    @property
    def drafted(self) -> np.ndarray:
        return np.array(self._dra).reshape(self.shape) * self._scale

    def bins(self, draft: SuffixDraft) -> list[int]:
        """Per token of ``draft``: its flat bin index."""
        si, sj, sm, sd, so, _ = self._strides
        m = bisect_left(self.MATCH, draft.match) * sm + ORIGINS.index(draft.origin) * so + int(draft.sampled)
        return [bisect_left(self.RATIO, r) * si + bisect_left(self.SUPPORT, s) * sj + m + bisect_left(self.DEPTH, d + 1)
                * sd for d, (r, s) in enumerate(zip(draft.ratio, draft.support))]

    def conditional(self, draft: SuffixDraft) -> np.ndarray:
        acc, dra, scale, prior = self._acc, self._dra, self._scale, self.prior
        return np.array([(acc[b] * scale + prior * r * s / (s + 1.0)) / (dra[b] * scale + prior)
                         for b, r, s in zip(self.bins(draft), draft.ratio, draft.support)])

    def survival(self, draft: SuffixDraft) -> np.ndarray:
        """[len(draft.tokens)] probability that each draft token and all before it are accepted."""
        return np.cumprod(self.conditional(draft))

    def observe(self, draft: SuffixDraft, verified: int, accepted: int) -> None:
        """The first ``verified`` tokens of ``draft`` went to the target; the first ``accepted`` were accepted."""
        reached = min(verified, accepted + 1)
        if reached <= 0:
            return
        self._scale *= self.decay  # every count decays once per observation
        if self._scale < 1e-150:  # fold the scale into the counts before it underflows
            self._acc = [x * self._scale for x in self._acc]
            self._dra = [x * self._scale for x in self._dra]
            self._scale = 1.0
        unit = 1.0 / self._scale
        for d, b in enumerate(self.bins(draft)[:reached]):
            self._dra[b] += unit
            if d < accepted:
                self._acc[b] += unit


class _Own:
    __slots__ = ("index", "output_start")

    def __init__(self, tokens: np.ndarray):
        self.index = TokenIndex()
        self.output_start = len(tokens) - 1  # the first output token is the anchor of the first proposal


class SuffixDrafter:
    """Suffix drafts per request, from its own text (indexed as it grows), a shared cache of recent finished
    outputs (``cache_tokens`` at most; the oldest half goes when full) and a corpus: text the target wrote
    before, loaded once (:meth:`load_corpus`) and never evicted, as a server's earlier traffic would be."""

    def __init__(self, depth: int = 24, cache_tokens: int = 1 << 18, recent: int = 64, corpus_recent: int = 16):
        if depth < 2:
            raise ValueError(f"SuffixDrafter: depth={depth}: expected >= 2 (patterns are matched from bigrams)")
        self.depth, self.cache_tokens, self.recent = depth, cache_tokens, recent
        # A big corpus has many occurrences of a common bigram: 16 give the same drafts as 64 (SmolLM2, MT-Bench)
        # at 60% of the lookup time.
        self.corpus_recent = corpus_recent
        self.own: dict[str, _Own] = {}
        self.cache = TokenIndex()
        self.corpus = TokenIndex()
        self.calibration = SuffixCalibration()

    def load_corpus(self, texts) -> None:
        """Index ``texts`` (token id sequences, each as the target wrote it after its prompt) as the corpus."""
        flat: list[int] = []
        for t in texts:
            flat.append(SEP)
            flat.extend(t.tolist() if isinstance(t, np.ndarray) else map(int, t))
        self.corpus.extend(flat)

    def propose(self, req_id: str, tokens: np.ndarray, k: int, sampled: bool = False) -> SuffixDraft | None:
        """The best of the request's own, the shared cache's and the corpus's draft (by expected accepted tokens),
        with its calibrated survival; None when no text has the last two tokens before."""
        own = self.own.get(req_id)
        if own is None:
            own = self.own[req_id] = _Own(tokens)
        if own.index.n < len(tokens):  # a request's text only grows (vLLM recomputes a preempted one in full)
            own.index.extend(tokens[own.index.n:].tolist())
        if k <= 0:
            return None
        pattern = np.asarray(tokens[-self.depth:]).tolist()
        best, best_score = None, 0.0
        for index, origin, recent in ((own.index, OWN, self.recent), (self.cache, OUTPUTS, self.recent),
                                      (self.corpus, CORPUS, self.corpus_recent)):
            starts, m = index.matches(pattern, self.depth, recent)
            if not starts:
                continue
            toks, ratio, support = walk(index, starts, k, index.n if origin == OWN else None)
            if not toks:
                continue
            draft = SuffixDraft(toks, ratio, support, m, origin, sampled)
            draft.survival = self.calibration.survival(draft)
            score = float(draft.survival.sum())
            if score > best_score:
                best, best_score = draft, score
        return best

    def observe(self, draft: SuffixDraft, verified: int, accepted: int) -> None:
        self.calibration.observe(draft, verified, accepted)

    def forget_outputs(self) -> None:
        """Empty the shared cache of outputs, not the corpus (benchmarks that repeat prompts: an answer seen before
        drafts itself)."""
        self.cache = TokenIndex()

    def finish(self, req_id: str) -> None:
        """The request is done: its output joins the shared cache."""
        own = self.own.pop(req_id, None)
        if own is None or own.index.n - own.output_start < 2:
            return
        self.cache.extend([SEP] + own.index.tokens[own.output_start:])
        if self.cache.n > self.cache_tokens:
            cut = self.cache.n - self.cache_tokens // 2
            rest = self.cache.tokens[cut:]
            self.cache.rebuild_from(cut + rest.index(SEP) if SEP in rest else self.cache.n)
