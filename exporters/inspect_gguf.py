"""``qserve inspect FILE.gguf``: tensor types, bits per weight, size, and a decode check, read with ``gguf``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from core.models import ModelError
from exporters.inspect import Inspection, LayerGroup


def inspect_gguf(path: Path) -> Inspection:
    """Groups the file's matrices by module (across blocks) and storage type, and decodes each one."""
    from gguf import GGUFReader, quants

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways; one message
        raise ModelError(f"{path} is not a GGUF file llama.cpp could read ({type(exc).__name__}: {exc})") from None
    arch = _string(reader, "general.architecture")
    report = Inspection(str(path), f"GGUF v{int(reader.fields['GGUF.version'].parts[-1][0])} ({arch})")
    groups: dict[tuple[str, str], LayerGroup] = {}
    for tensor in reader.tensors:
        nbytes, numel = int(tensor.n_bytes), int(tensor.n_elements)
        report.total_bytes += nbytes
        report.bf16_bytes += 2 * numel if len(tensor.shape) > 1 else nbytes
        if len(tensor.shape) < 2:
            report.other_bytes += nbytes
            continue
        try:
            weights = quants.dequantize(tensor.data, tensor.tensor_type)
            if weights.size != numel or not np.isfinite(weights).all():
                report.problems.append(f"{tensor.name}: decodes to {weights.size} values, non-finite or not {numel}")
        except NotImplementedError:
            report.problems.append(f"{tensor.name}: type {tensor.tensor_type.name} has no reference decoder in gguf")
        module = re.sub(r"^blk\.\d+\.", "", tensor.name)
        kind = tensor.tensor_type.name
        group = groups.setdefault((module, kind), LayerGroup(module, kind))
        group.layers += 1
        group.weights += numel
        group.stored_bytes += nbytes
    report.groups = sorted(groups.values(), key=lambda g: (g.module, g.scheme))
    return report


def _string(reader, key: str) -> str:
    field = reader.fields.get(key)
    return bytes(field.parts[field.data[0]]).decode() if field else "?"
