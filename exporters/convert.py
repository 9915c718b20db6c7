"""``export_checkpoint``: a quantized checkpoint rewritten in another layout.

Conversions are lossless: the stored integers, zero points and scales are carried over as they are
(compressed-tensors, GPTQ and AWQ in any direction the target can hold), or decoded to the float weights
the engine computes with (``dequantized``: loadable by anything that loads a plain model, the way to
check a backend's numerics against ours). Tensors stream one quantized layer at a time; the output
appears atomically, and a scheme the target cannot hold is refused before anything is written.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from core.atomic import atomic_output_dir
from exporters.dequantize import checkpoint_layout, is_layer_tensor, load_tensors, quantized_prefixes, tensor_locations
from exporters.gguf_file import export_gguf
from exporters.layouts import KV_SCALE_SUFFIXES, LAYOUTS, Layout
from core.models import ModelError
from core.shards import ShardWriter
from core.checkpoint import AUX_FILES, qserve_version
from exporters.compressed_tensors import has_group_index
from core.schemes import Scheme, SchemeError

DEQUANTIZED = "dequantized"
# layouts written as one file by their own exporter (float checkpoints included)
FILE_TARGETS: dict[str, Callable[..., dict]] = {"gguf": export_gguf}
TARGETS = (*LAYOUTS, DEQUANTIZED, *FILE_TARGETS)


def _target(layout: str, source: Optional[Layout], scheme: Optional[Scheme], src: Path) -> Optional[Layout]:
    """The target layout (None for dequantized), once it is known to hold the source's scheme."""
    if layout not in TARGETS:
        raise SchemeError(f"unknown layout {layout!r}; choose one of: {', '.join(TARGETS)}")
    if source is None or scheme is None:
        raise ModelError(f"{src} has no quantization_config: export converts quantized checkpoints "
                         f"(compressed-tensors, gptq or awq); quantize it first with qserve quantize")
    target = LAYOUTS.get(layout)
    if target is not None and not scheme.quantizes_weights and not target.holds_kv_cache:
        raise SchemeError(f"{src} quantizes only the KV cache, and the {layout} layout holds quantized weights "
                          f"alone; serve it as it is, or export --layout {DEQUANTIZED} for plain weights")
    if target is not None:
        target.check_fits(scheme)
    return target


def export_checkpoint(src: Path, layout: str, out_dir: Path, force: bool = False,
                      log: Callable[[str], None] = print, **file_options) -> dict:
    """Writes ``src`` in ``layout`` to ``out_dir`` (a file for the single-file layouts, e.g. gguf); returns the
    provenance written beside it. ``file_options`` go to a single-file layout's exporter."""
    start = time.perf_counter()
    src = Path(src)
    if layout in FILE_TARGETS:
        return FILE_TARGETS[layout](src, out_dir, force=force, log=log, **file_options)
    source, scheme = checkpoint_layout(src)
    target = _target(layout, source, scheme, src)
    config = json.loads((src / "config.json").read_text())
    if target is not None and has_group_index(config["quantization_config"]):
        raise SchemeError(f"{src} stores act-order groups (actorder: group, a weight_g_idx per linear), which qserve "
                          f"does not rewrite; serve it as it is, or export --layout {DEQUANTIZED}")
    dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    where = tensor_locations(src)
    prefixes = quantized_prefixes(list(where), source)
    quantized = set(prefixes)
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardWriter(tmp)
        for prefix in prefixes:
            raw = load_tensors(where, [k for k in where if is_layer_tensor(k, {prefix}, source)])
            qw = source.read(raw, prefix, scheme.weights_for(prefix))
            writer.add(target.write(prefix, qw, scheme) if target else {f"{prefix}.weight": qw.dequantize().to(dtype)})
        drop_kv = scheme is not None and scheme.kv_cache is not None and not (target and target.holds_kv_cache)
        for key in where:
            if not is_layer_tensor(key, quantized, source) and not (drop_kv and key.endswith(KV_SCALE_SUFFIXES)):
                writer.add(load_tensors(where, [key]))
        writer.close()
        for name in AUX_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        config.pop("quantization_config", None)
        if target:
            config["quantization_config"] = target.config_for(scheme)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        provenance = {"layout": layout, "source": str(src), "source_layout": source.name, "scheme": scheme.to_dict(),
                      "seconds": round(time.perf_counter() - start, 2), "size_bytes": writer.total_bytes,
                      "qserve_version": qserve_version()}
        if (src / "qserve.json").exists():
            provenance["source_provenance"] = json.loads((src / "qserve.json").read_text())
        (tmp / "qserve.json").write_text(json.dumps(provenance, indent=2))
    if drop_kv:
        log(f"the KV-cache scales were left out: the {layout} layout cannot declare a quantized KV cache (the engine "
            f"would run a bf16 cache); keep the compressed-tensors layout to serve the FP8 cache")
    log(f"wrote {out_dir}: {layout}, {writer.total_bytes / 2**20:.1f} MiB")
    return provenance
