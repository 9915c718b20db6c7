"""Quantized checkpoints of ``qserve bench`` cells, cached by what determines them.

The key hashes the source model (its weight files' fingerprint, as ``qserve.json`` records it), the cell's
recipe (scheme, method and options; not its name or target) and the calibration text's bytes, so a rerun or a
second matrix sharing a recipe reuses the checkpoint, and a changed calibration file does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

from workflows.bench.matrix import Cell

KEY_VERSION = 1  # bump when what a checkpoint holds for the same inputs changes


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _calibration_digest(cell: Cell) -> Optional[str]:
    """The calibration text's content hash (a hub dataset: its name); None for a recipe that reads no data."""
    from core.data import data_file

    source = cell.calibration.source()
    if source and source.startswith("hf:"):
        return source
    return _file_digest(Path(source) if source else data_file("wikitext2-valid.tokens"))


def recipe_key(model_dir: Path, cell: Cell) -> str:
    """The cache key of ``cell``'s quantization of ``model_dir``."""
    from core.checkpoint import weight_files
    from quantize.methods import parse_recipe
    from quantize.pipeline import source_fingerprint

    calibrated = parse_recipe(cell.method).needs_calibration or cell.kv_cache is not None or cell.rotate == "learned"
    parts = {"version": KEY_VERSION, "model": source_fingerprint(weight_files(model_dir)), "recipe": cell.recipe(),
             "calibration": _calibration_digest(cell) if calibrated else None}
    if not calibrated:
        parts["recipe"] = {k: v for k, v in parts["recipe"].items() if k != "calibration"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cached_checkpoint(model_dir: Path, cell: Cell, cache_dir: Path, quantize: Callable[[Path], None],
                      log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """``cell``'s checkpoint under ``cache_dir``: reused when its key is there (a finished quantization writes
    its directory atomically), else made by ``quantize(out_dir)``. Returns the path and whether it was reused."""
    out = cache_dir / recipe_key(model_dir, cell)
    if (out / "qserve.json").exists():
        log(f"[{cell.name}] reusing {out}")
        return out, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    quantize(out)
    return out, False


def quantize_cell(model_dir: Path, cell: Cell, out: Path, log: Callable[[str], None] = print) -> None:
    """Writes ``cell``'s compressed-tensors checkpoint of ``model_dir`` to ``out`` (``qserve quantize`` with the
    cell's options); the target's export comes afterwards."""
    from core.schemes import compose_scheme
    from quantize.calibration import CalibrationSpec
    from quantize.pipeline import QuantizeOptions, quantize_checkpoint

    scheme = compose_scheme(cell.scheme, cell.group_size, cell.asym, cell.observer, cell.overrides, cell.kv_cache)
    c = cell.calibration
    options = QuantizeOptions(calibration=CalibrationSpec(num_samples=c.num_samples, seq_len=c.seq_len, seed=c.seed,
                                                          path=c.source()), rotate=cell.rotate,
                              device=cell.device)
    quantize_checkpoint(model_dir, scheme, cell.method, out, progress=False, log=log, options=options)
