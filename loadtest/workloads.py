"""What the load tester sends: synthetic prompts cut from real text, prompt files, ShareGPT conversations."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

WORDS_PER_TOKEN = 0.75  # English text, used only when no tokenizer is given; the server's usage is exact


class WorkloadError(ValueError):
    """A workload option or file is unusable; the message says how to fix it."""


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: ``N`` (fixed), ``uniform:LO:HI`` or ``normal:MEAN:STD`` (clipped at 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        parts = str(text).split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", float(parts[0]))
            elif len(parts) == 3 and parts[0] in ("uniform", "normal"):
                dist = cls(parts[0], float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise WorkloadError(f"length {text!r} is not N, uniform:LO:HI or normal:MEAN:STD "
                                f"(e.g. 512, uniform:256:768, normal:512:64)") from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or dist.b < 0:
            raise WorkloadError(f"length {text!r} must be at least 1 token (and LO <= HI)")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.a, self.b)))
        return int(self.a)

    def __str__(self) -> str:
        return str(int(self.a)) if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: its text, its token ids where they are known exactly, its output budget."""

    text: str
    max_tokens: int
    token_ids: Optional[tuple[int, ...]] = None


Tokenizer = Any  # a transformers tokenizer: encode(text, add_special_tokens=False) and decode(ids)


def _text_units(path: Path, tokenizer: Optional[Tokenizer]) -> list:
    if not path.exists():
        raise WorkloadError(f"text file {path} not found; pass --text-file with any local text file")
    text = path.read_text(errors="replace")
    units = tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else text.split()
    if not units:
        raise WorkloadError(f"{path} holds no text to cut prompts from")
    return units


def synthetic(path: Path, input_len: LengthDist, output_len: LengthDist, shared_prefix: float = 0.0,
              tokenizer: Optional[Tokenizer] = None, seed: int = 0) -> Iterator[RequestSpec]:
    """Prompts of ``input_len`` real tokens cut at seeded offsets of the text file ``path``.

    A ``shared_prefix`` fraction of each prompt is the same text for every request (prefix caching).
    Without a tokenizer the lengths are words scaled by 0.75 words per token (then approximate).
    """
    if not 0.0 <= shared_prefix < 1.0:
        raise WorkloadError(f"--shared-prefix {shared_prefix} must be a fraction in [0, 1)")
    units, rng = _text_units(path, tokenizer), random.Random(seed)
    scale = 1.0 if tokenizer is not None else WORDS_PER_TOKEN

    def cut(n: int, offset: int) -> list:
        return [units[(offset + i) % len(units)] for i in range(n)]

    def stream() -> Iterator[RequestSpec]:
        while True:
            n = max(1, round(input_len.sample(rng) * scale))
            n_prefix = int(n * shared_prefix)
            piece = cut(n_prefix, 0) + cut(n - n_prefix, rng.randrange(len(units)))
            max_tokens = output_len.sample(rng)
            if tokenizer is None:
                yield RequestSpec(" ".join(piece), max_tokens)
            else:
                yield RequestSpec(tokenizer.decode(piece), max_tokens, tuple(piece))

    return stream()


def prompt_file(path: Path, output_len: LengthDist, seed: int = 0, shared_prefix: float = 0.0, **_: Any) -> Iterator[RequestSpec]:
    """Prompts from a text file (one per line) or JSONL (``{"prompt": ..., "max_tokens"?: N}``), in turn."""
    _no_shared_prefix(shared_prefix)
    if not path.exists():
        raise WorkloadError(f"prompt file {path} not found")
    prompts: list[tuple[str, Optional[int]]] = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append((line, None))
            continue
        try:
            row = json.loads(line)
            prompts.append((str(row["prompt"]), int(row["max_tokens"]) if "max_tokens" in row else None))
        except (ValueError, KeyError, TypeError):
            raise WorkloadError(f"{path}:{lineno}: expected a JSON object with a \"prompt\" string "
                                f"(and optionally \"max_tokens\")") from None
    if not prompts:
        raise WorkloadError(f"{path} holds no prompts")
    rng = random.Random(seed)
    return (RequestSpec(text, max_tokens or output_len.sample(rng))
            for _ in itertools.count() for text, max_tokens in prompts)


def _no_shared_prefix(shared_prefix: float) -> None:
    if shared_prefix:
        raise WorkloadError("--shared-prefix applies to the synthetic workload only; prompts from files "
                            "are sent as they are")


def _conversation_pairs(path: Path) -> list[tuple[str, str]]:
    try:
        rows = json.loads(path.read_text(errors="replace"))
    except ValueError as exc:
        raise WorkloadError(f"{path} is not JSON ({exc}); ShareGPT files are a JSON list of "
                            f"{{\"conversations\": [{{\"from\": \"human\", \"value\": ...}}, ...]}}") from None
    pairs = []
    for row in rows if isinstance(rows, list) else []:
        turns = (row.get("conversations") or row.get("messages") or []) if isinstance(row, dict) else []
        texts = [(t.get("from") or t.get("role"), t.get("value") or t.get("content")) for t in turns
                 if isinstance(t, dict)]
        for (who, ask), (_, answer) in zip(texts, texts[1:]):
            if who in ("human", "user") and ask and answer:
                pairs.append((str(ask), str(answer)))
                break
    if not pairs:
        raise WorkloadError(f"{path} holds no human/assistant turn pairs; expected a JSON list of "
                            f"{{\"conversations\": [{{\"from\": \"human\", \"value\": ...}}, {{\"from\": \"gpt\", ...}}]}}")
    return pairs


def sharegpt(path: Path, output_len: Optional[LengthDist] = None, tokenizer: Optional[Tokenizer] = None,
             seed: int = 0, shared_prefix: float = 0.0, **_: Any) -> Iterator[RequestSpec]:
    """ShareGPT conversations: the first human turn is the prompt, the reply's length the output budget
    (unless ``output_len`` is given)."""
    _no_shared_prefix(shared_prefix)
    if not path.exists():
        raise WorkloadError(f"ShareGPT file {path} not found")
    pairs = _conversation_pairs(path)
    random.Random(seed).shuffle(pairs)

    def reply_tokens(answer: str) -> int:
        if tokenizer is not None:
            return len(tokenizer.encode(answer, add_special_tokens=False))
        return round(len(answer.split()) / WORDS_PER_TOKEN)

    budgets = [max(1, reply_tokens(answer)) for _, answer in pairs]
    rng = random.Random(seed)
    return (RequestSpec(ask, output_len.sample(rng) if output_len else budget)
            for _ in itertools.count() for (ask, _), budget in zip(pairs, budgets))


WORKLOADS: dict[str, Callable[..., Iterator[RequestSpec]]] = {"synthetic": synthetic, "file": prompt_file,
                                                               "sharegpt": sharegpt}
