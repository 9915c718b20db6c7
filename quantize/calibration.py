"""Calibration samples: ``num_samples`` windows of ``seq_len`` tokens from a local text or JSONL file, seeded."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch


class CalibrationError(ValueError):
    """Calibration data that cannot give the requested samples; the message says what to change."""


@dataclass(frozen=True)
class CalibrationSpec:
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    path: Optional[Path] = None  # default: the shared WikiText-2 validation text
    text_field: str = "text"


def _read_text(path: Path, text_field: str) -> str:
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[text_field])
            except (ValueError, KeyError, TypeError):
                raise CalibrationError(f"{path}:{n}: expected a JSON object with a {text_field!r} field") from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8", errors="replace")


def load_calibration(spec: CalibrationSpec, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids ``[num_samples, seq_len]`` from disjoint windows of the file, and a report of which."""
    from loadtest.data import data_file

    path = Path(spec.path) if spec.path else data_file("wikitext2-valid.tokens")
    if not path.exists():
        raise CalibrationError(f"calibration file {path} not found; pass --calib-file with a local text or JSONL file")
    raw = path.read_bytes()
    ids = tokenizer(_read_text(path, spec.text_field), add_special_tokens=False)["input_ids"]
    windows = len(ids) // spec.seq_len
    if windows < spec.num_samples:
        raise CalibrationError(f"{path} has {len(ids):,} tokens: {windows} samples of {spec.seq_len}, "
                               f"not {spec.num_samples}; ask for fewer samples, a shorter --calib-seq-len, "
                               f"or a longer file")
    starts = sorted(random.Random(spec.seed).sample(range(windows), spec.num_samples))
    samples = torch.tensor([ids[w * spec.seq_len:(w + 1) * spec.seq_len] for w in starts], dtype=torch.long)
    report = {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "file_tokens": len(ids),
              "num_samples": spec.num_samples, "seq_len": spec.seq_len, "seed": spec.seed,
              "window_starts": [w * spec.seq_len for w in starts]}
    return samples, report
