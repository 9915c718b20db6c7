"""``export_checkpoint``: a qserve (compressed-tensors) checkpoint rewritten in another layout.

Conversions are lossless: the stored integers and scales are carried over as they are (``gptq``), or
decoded to the float weights the engine computes with (``dequantized``: loadable by anything that
loads a plain model, the way to check a backend's numerics against ours). Tensors stream one
quantized layer at a time; the output appears atomically.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from exporters import gptq
from exporters.atomic import atomic_output_dir
from exporters.dequantize import QUANT_SUFFIXES, checkpoint_scheme, decode_layer, load_tensors, read_quantized
from exporters.models import ModelError
from exporters.shards import ShardWriter
from quantize.pipeline import AUX_FILES
from quantize.schemes import Scheme, SchemeError

LAYOUTS = ("gptq", "dequantized")


def _check(layout: str, scheme: Scheme | None, src: Path) -> None:
    if layout not in LAYOUTS:
        raise SchemeError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)} "
                          f"(qserve quantize already writes compressed-tensors)")
    if scheme is None:
        raise ModelError(f"{src} has no compressed-tensors quantization_config: export converts checkpoints that "
                         f"qserve quantize wrote")
    if layout == "gptq":
        gptq.check_fits(scheme)


def _tensors_by_layer(src: Path) -> tuple[dict[str, Path], list[str]]:
    from safetensors import safe_open

    where = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update({k: path for k in f.keys()})
    return where, sorted({k.removesuffix(".weight_scale") for k in where if k.endswith(".weight_scale")})


def export_checkpoint(src: Path, layout: str, out_dir: Path, force: bool = False,
                      log: Callable[[str], None] = print) -> dict:
    """Writes ``src`` in ``layout`` to ``out_dir``; returns the provenance written to ``qserve.json``."""
    start = time.perf_counter()
    src = Path(src)
    scheme = checkpoint_scheme(src)
    _check(layout, scheme, src)
    config = json.loads((src / "config.json").read_text())
    dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    where, prefixes = _tensors_by_layer(src)
    quantized = set(prefixes)
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardWriter(tmp)
        for prefix in prefixes:
            raw = load_tensors(where, [k for k in where if k.rsplit(".", 1)[0] == prefix])
            args = scheme.weights_for(prefix)
            if layout == "gptq":
                writer.add(gptq.layer_tensors(prefix, read_quantized(raw, prefix, args)))
            else:
                writer.add({f"{prefix}.weight": decode_layer(raw, prefix, args).to(dtype)})
            bias = raw.get(f"{prefix}.bias")
            if bias is not None:
                writer.add({f"{prefix}.bias": bias})
        for key in where:
            owner = key.rsplit(".", 1)[0]
            if owner in quantized and (key.endswith(QUANT_SUFFIXES) or key.endswith((".weight", ".bias"))):
                continue
            writer.add(load_tensors(where, [key]))
        writer.close()
        for name in AUX_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        if layout == "gptq":
            config["quantization_config"] = gptq.quantization_config(scheme)
        else:
            config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        provenance = {"layout": layout, "source": str(src), "scheme": scheme.to_dict(),
                      "seconds": round(time.perf_counter() - start, 2), "size_bytes": writer.total_bytes}
        if (src / "qserve.json").exists():
            provenance["source_provenance"] = json.loads((src / "qserve.json").read_text())
        (tmp / "qserve.json").write_text(json.dumps(provenance, indent=2))
    log(f"wrote {out_dir}: {layout}, {writer.total_bytes / 2**20:.1f} MiB")
    return provenance
