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
    path: Optional[Path | str] = None  # default: the shared WikiText-2 validation text; or hf:NAME[:CONFIG]:SPLIT
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


HUB_PREFIX = "hf:"


def _hub_text(spec: str, text_field: str) -> str:
    """``hf:NAME[:CONFIG]:SPLIT``, e.g. ``hf:wikitext:wikitext-2-raw-v1:validation``, through ``datasets``."""
    parts = spec[len(HUB_PREFIX):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise CalibrationError(f"{spec!r}: write a hub dataset as hf:NAME[:CONFIG]:SPLIT "
                               f"(e.g. hf:wikitext:wikitext-2-raw-v1:validation)")
    try:
        import datasets
    except ImportError:
        raise CalibrationError("hub calibration data needs the 'datasets' package (pip install datasets); "
                               "or pass a local text or JSONL file") from None
    name, config, split = parts if len(parts) == 3 else (parts[0], None, parts[1])
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, auth, unknown name: the library's own message says which
        raise CalibrationError(f"could not load {spec}: {exc}") from None
    if text_field not in rows.column_names:
        raise CalibrationError(f"{spec} has no {text_field!r} column (columns: {', '.join(rows.column_names)})")
    return "\n\n".join(t for t in rows[text_field] if t)


def load_calibration(spec: CalibrationSpec, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids ``[num_samples, seq_len]`` from disjoint windows of a local file (text or JSONL) or a hub
    dataset (``hf:NAME[:CONFIG]:SPLIT``), and a report of which."""
    from core.data import data_file

    if spec.path is not None and str(spec.path).startswith(HUB_PREFIX):
        text = _hub_text(str(spec.path), spec.text_field)
        path, raw = str(spec.path), text.encode()
    else:
        path = Path(spec.path) if spec.path else data_file("wikitext2-valid.tokens")
        if not path.exists():
            raise CalibrationError(f"calibration file {path} not found; pass --calib-file with a local text or "
                                   f"JSONL file, or hf:NAME[:CONFIG]:SPLIT where a network exists")
        raw = path.read_bytes()
        text = _read_text(path, spec.text_field)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
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
