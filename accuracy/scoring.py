"""The arithmetic of evaluation, kept free of I/O so small hand-computed cases can test it.

Perplexity figures follow lm-evaluation-harness: token perplexity ``exp(NLL / tokens)``, word
perplexity ``exp(NLL / words)`` with words counted as whitespace-separated pieces of the original text,
and bits per byte ``NLL / (bytes · ln 2)`` over its UTF-8 bytes. Windows are "rolling": every token
of the text is scored exactly once, each window's first input being the token before its first
scored one (a prefix token for the very first), as lm-evaluation-harness's ``loglikelihood_rolling``
does with ``context_len=1``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class Window:
    """Token ids sent together; the last ``scored`` of them are the ones whose log-probabilities count."""

    ids: tuple[int, ...]
    scored: int


def rolling_windows(ids: Sequence[int], seq_len: int, prefix_token: int) -> list[Window]:
    """Windows of at most ``seq_len`` tokens that score every token of ``ids`` exactly once."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, not {seq_len}")
    windows, step = [], seq_len - 1
    for start in range(0, len(ids), step):
        context = prefix_token if start == 0 else ids[start - 1]
        chunk = tuple(ids[start:start + step])
        windows.append(Window((context, *chunk), len(chunk)))
    return windows


def count_words(text: str) -> int:
    """Whitespace-separated pieces, as lm-evaluation-harness counts words (``re.split(r"\\s+", text)``)."""
    return len(re.split(r"\s+", text))


@dataclass(frozen=True)
class PerplexityFigures:
    nll: float  # summed negative log-likelihood, natural log
    tokens: int
    words: int
    bytes: int

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2))

    def to_dict(self) -> dict[str, float]:
        return {"nll": self.nll, "tokens": self.tokens, "words": self.words, "bytes": self.bytes,
                "token_perplexity": self.token_perplexity, "word_perplexity": self.word_perplexity,
                "byte_perplexity": self.byte_perplexity, "bits_per_byte": self.bits_per_byte}


def perplexity_figures(logprobs: Sequence[float], text: str) -> PerplexityFigures:
    """Figures for ``text`` from the log-probabilities of its tokens (every token scored once)."""
    return PerplexityFigures(-math.fsum(logprobs), len(logprobs), count_words(text), len(text.encode("utf-8")))


def choice_metrics(loglikelihoods: Sequence[float], choices: Sequence[str], answer: int) -> dict[str, float]:
    """``acc`` (highest log-likelihood) and ``acc_norm`` (highest per character of the choice, as
    lm-evaluation-harness normalises) for one multiple-choice question."""
    best = max(range(len(choices)), key=lambda i: loglikelihoods[i])
    best_norm = max(range(len(choices)), key=lambda i: loglikelihoods[i] / max(len(choices[i]), 1))
    return {"acc": float(best == answer), "acc_norm": float(best_norm == answer)}


def token_agreement(base: dict[int, float], other: dict[int, float]) -> tuple[bool, float]:
    """Whether the two top-k distributions (token id -> log-probability) rank the same token first, and
    KL(base || other) over base's top-k tokens plus one bucket for the rest of the vocabulary.

    A token in base's top-k that ``other`` did not return gets ``other``'s smallest returned
    log-probability, an upper bound, so the KL is a lower bound when the lists differ.
    """
    agree = max(base, key=base.get) == max(other, key=other.get)
    floor = min(other.values())
    kl, base_mass, other_mass = 0.0, 0.0, 0.0
    for token, lp in base.items():
        other_lp = other.get(token, floor)
        p = math.exp(lp)
        kl += p * (lp - other_lp)
        base_mass += p
        other_mass += math.exp(other_lp)
    rest_base, rest_other = max(1.0 - base_mass, 0.0), max(1.0 - other_mass, 1e-12)
    if rest_base > 1e-12:
        kl += rest_base * math.log(rest_base / rest_other)
    return agree, max(kl, 0.0)


def extract_number(text: str) -> Optional[str]:
    """The final number of a GSM8K-style answer (after ``####`` when present), commas and ``$`` removed."""
    tail = text.split("####")[-1]
    numbers = re.findall(r"-?\$?\d[\d,]*(?:\.\d+)?", tail)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").replace("$", "")
    return value[:-2] if value.endswith(".0") else value.rstrip(".")


def disjoint_windows(ids: Sequence[int], seq_len: int, max_windows: Optional[int]) -> list[list[int]]:
    """Non-overlapping windows of exactly ``seq_len`` tokens, the first of each unscored (a shorter tail is
    dropped): the windowing of qserve's quantization benchmarks, kept so their figures stay comparable."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, not {seq_len}")
    windows = [list(ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return windows[:max_windows] if max_windows else windows


def windows_perplexity(model: Any, windows: list[list[int]]) -> tuple[float, int]:
    """Perplexity of a transformers causal LM over ``disjoint_windows`` (the first token of each unscored),
    and the number of tokens scored."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            x = torch.tensor([window])
            logits = model(x).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(window) - 1
    return math.exp(nll / count), count
