"""``export_gguf``: a checkpoint (quantized or float) as one GGUF file that llama.cpp loads on its own.

Quantized linears whose groups match a llama.cpp block type (``exporters.gguf_blocks``) carry their
integers and scales over unchanged; everything else is written as float. Every tensor's type, shape and
size is decided (and every refusal raised) before the file is opened; tensors then stream one at a
time, and the file appears atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from core.atomic import atomic_output_file
from core.checkpoint import qserve_version
from core.progress import progress as progress_bar
from core.models import ModelError
from core.schemes import Scheme, SchemeError
from exporters.dequantize import checkpoint_layout, is_layer_tensor, load_tensors, quantized_prefixes, tensor_locations
from exporters.gguf_blocks import BLOCK, BlockType, block_type_for, pack_weight
from exporters.gguf_model import arch_for, permute_rows, read_tokenizer, write_hparams, write_tokenizer
from exporters.layouts import KV_SCALE_SUFFIXES, Layout

FLOAT_TYPES = ("bf16", "f16", "f32", "q8_0")  # for float tensors of two dimensions (q8_0: llama.cpp's own rounding)
# llama.cpp's general.file_type: what most of the weights are
_FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output: where it comes from and how it is stored."""

    gguf_name: str
    source: str  # the checkpoint prefix (quantized linear) or tensor name (float)
    kind: str  # a BlockType name for a quantized linear, else one of FLOAT_TYPES
    shape: tuple[int, ...]  # [rows, cols] (the logical shape, as llama.cpp reports it reversed)
    permute_heads: Optional[int] = None  # q/k rows reordered for llama.cpp's RoPE, over this many heads


def export_gguf(src: Path, out_file: Path, force: bool = False, float_type: Optional[str] = None,
                embedding_type: Optional[str] = None, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Writes checkpoint ``src`` as the GGUF file ``out_file``; returns the provenance stored in its metadata.
    ``progress`` shows the tensors being written (a bar on a terminal, a line every 10 % in a log)."""
    import gguf

    start = time.perf_counter()
    src, out_file = Path(src), Path(out_file)
    config = json.loads((src / "config.json").read_text())
    arch = arch_for(config, str(src))
    layout, scheme = checkpoint_layout(src)
    _check_scheme(scheme, src)
    where = tensor_locations(src)
    source_dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    float_type = float_type or {"float16": "f16", "float32": "f32"}.get(source_dtype, "bf16")
    for name, value in (("--gguf-float", float_type), ("--gguf-embeddings", embedding_type)):
        if value is not None and value not in FLOAT_TYPES:
            raise SchemeError(f"{name} {value!r}: choose one of {', '.join(FLOAT_TYPES)}")
    plan, blocks = _plan(config, arch, layout, scheme, where, float_type, embedding_type or float_type, src)
    tokenizer = read_tokenizer(src, int(config["vocab_size"]))
    main_type = next(iter(blocks.values())).name if blocks else float_type
    provenance = _provenance(src, layout, scheme, main_type)
    with atomic_output_file(out_file, force=force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
        writer.add_type("model")
        writer.add_name(config.get("_model_name_or_path") or src.name)
        write_hparams(writer, config, _FILE_TYPES[main_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer)
        for key, value in provenance.items():
            writer.add_string(f"qserve.{key}", value if isinstance(value, str) else json.dumps(value))
        for t in plan:
            data_shape, nbytes, raw = _storage(t)
            writer.add_tensor_info(t.gguf_name, data_shape, np.dtype(np.uint8) if raw else _np_dtype(t.kind),
                                   nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in progress_bar(plan, desc=f"write GGUF {main_type}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_tensor_data(t, where, layout, scheme, blocks))
        writer.close()
        size = tmp.stat().st_size
    log(f"wrote {out_file}: GGUF {main_type}, {len(plan)} tensors, {size / 2**20:.1f} MiB "
        f"in {time.perf_counter() - start:.1f} s")
    return {**provenance, "size_bytes": size}


def check_exportable(model_dir: Path, scheme: Scheme) -> None:
    """Raises now, before quantizing, if ``model_dir`` quantized with ``scheme`` could not be written as GGUF."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    arch_for(config, str(model_dir))
    read_tokenizer(model_dir, int(config["vocab_size"]))
    _check_scheme(scheme, model_dir)
    for args in (scheme.weights, *(o.weights for o in scheme.overrides)):
        block_type_for(args, f"--scheme {scheme.name}")


def _check_scheme(scheme: Optional[Scheme], src: Path) -> None:
    if scheme is None:
        return
    if not scheme.quantizes_weights or scheme.kv_cache is not None:
        raise SchemeError(f"{src}: GGUF holds quantized weights, not KV-cache scales; llama.cpp quantizes its cache "
                          f"itself (--cache-type-k/v), so export a weight scheme without --kv-cache")
    if scheme.input_activations is not None:
        raise SchemeError(f"{src} quantizes activations ({scheme.name}); a GGUF holds weights only and llama.cpp "
                          f"chooses its own activation precision: export a weight-only scheme (gguf-q4_0, gguf-q4_1, "
                          f"gguf-q8_0)")


def _plan(config, arch, layout: Optional[Layout], scheme: Optional[Scheme], where: dict[str, Path],
          float_type: str, embedding_type: str, src: Path) -> tuple[list[PlannedTensor], dict[str, BlockType]]:
    """Every output tensor with its storage, and the block type of each quantized linear; raises before any write."""
    import gguf

    n_layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name], n_layers)
    prefixes = quantized_prefixes(list(where), layout) if layout else []
    blocks = {p: block_type_for(scheme.weights_for(p), f"{src}: {p}") for p in prefixes}
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    tied = bool(config.get("tie_word_embeddings"))
    shapes = _shapes(where)
    plan, quantized = [], set(prefixes)
    for key in where:
        if layout and (is_layer_tensor(key, quantized, layout) or key.endswith(KV_SCALE_SUFFIXES)):
            continue
        if tied and key == "lm_head.weight":
            continue
        plan.append(_float_plan(key, shapes[key], names, float_type, embedding_type, src))
    for prefix in prefixes:
        gguf_name = names.get_name(f"{prefix}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ModelError(f"{src}: no llama.cpp tensor for {prefix}")
        rows, cols = _quantized_shape(shapes, prefix, layout)
        plan.append(PlannedTensor(gguf_name, prefix, blocks[prefix].name, (rows, cols)))
    if arch.permute_qk:
        plan = [_with_permutation(t, heads, kv_heads) for t in plan]
    return sorted(plan, key=_order), blocks


def _float_plan(key, shape, names, float_type, embedding_type, src) -> PlannedTensor:
    gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ModelError(f"{src}: tensor {key} has no place in llama.cpp's graph for this architecture")
    if len(shape) == 1:
        return PlannedTensor(gguf_name, key, "f32", tuple(shape))
    kind = embedding_type if gguf_name in ("token_embd.weight", "output.weight") else float_type
    if kind == "q8_0" and shape[-1] % BLOCK:
        kind = "f16"  # llama.cpp's blocks need whole groups of 32 columns
    return PlannedTensor(gguf_name, key, kind, tuple(shape))


def _with_permutation(t: PlannedTensor, heads: int, kv_heads: int) -> PlannedTensor:
    if t.gguf_name.endswith("attn_q.weight") or t.gguf_name.endswith("attn_q.bias"):
        return replace(t, permute_heads=heads)
    if t.gguf_name.endswith("attn_k.weight") or t.gguf_name.endswith("attn_k.bias"):
        return replace(t, permute_heads=kv_heads)
    return t


def _order(t: PlannedTensor) -> tuple[int, int, str]:
    """Embeddings first, then the blocks in layer order, then the output: the order llama.cpp's converter uses."""
    if t.gguf_name.startswith("blk."):
        return 1, int(t.gguf_name.split(".")[1]), t.gguf_name
    return (0 if t.gguf_name.startswith("token_embd") else 2), 0, t.gguf_name


def _shapes(where: dict[str, Path]) -> dict[str, list[int]]:
    from safetensors import safe_open

    out = {}
    for path in sorted(set(where.values())):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return out


def _quantized_shape(shapes, prefix: str, layout: Layout) -> tuple[int, int]:
    """[out, in] of a quantized linear whose groups are blocks, from its scales (packed weights hide the columns)."""
    scale = next((shapes[f"{prefix}{s}"] for s in layout.suffixes if s.endswith(("weight_scale", "scales"))
                  and f"{prefix}{s}" in shapes), None)
    if scale is None or len(scale) != 2:
        raise ModelError(f"{prefix}: cannot tell the weight's shape from its {layout.name} tensors")
    rows, groups = (scale[1], scale[0]) if layout.scales_transposed else (scale[0], scale[1])
    return int(rows), int(groups) * BLOCK


def _storage(t: PlannedTensor):
    """(shape to declare, bytes, raw ggml type or None) of a planned tensor."""
    import gguf

    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    cols = t.shape[-1]
    if t.kind in ("f32", "f16"):
        return t.shape, rows * cols * (4 if t.kind == "f32" else 2), None
    qtype = gguf.GGMLQuantizationType[t.kind.upper()]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    byte_shape = (*t.shape[:-1], cols // block * type_size)
    return byte_shape, rows * (cols // block) * type_size, qtype


def _np_dtype(kind: str):
    return np.dtype(np.float32 if kind == "f32" else np.float16)


def _tensor_data(t: PlannedTensor, where, layout, scheme, blocks: dict[str, BlockType]) -> np.ndarray:
    """The bytes (or floats) of one planned tensor, read and converted now."""
    from gguf import quants

    if t.source in blocks:
        raw = load_tensors(where, [k for k in where if is_layer_tensor(k, {t.source}, layout)])
        qw = layout.read(raw, t.source, scheme.weights_for(t.source))
        if t.permute_heads:
            qw = replace(qw, q=permute_rows(qw.q, t.permute_heads), scale=permute_rows(qw.scale, t.permute_heads),
                         zero=permute_rows(qw.zero, t.permute_heads))
        return pack_weight(qw, blocks[t.source], t.source)
    tensor = load_tensors(where, [t.source])[t.source]
    if t.permute_heads:
        tensor = permute_rows(tensor, t.permute_heads)
    if t.kind == "f32":
        return tensor.float().numpy()
    if t.kind == "f16":
        return tensor.half().numpy()
    if t.kind == "bf16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return quants.quantize(tensor.float().numpy(), quants.GGMLQuantizationType.Q8_0)


def _provenance(src: Path, layout: Optional[Layout], scheme: Optional[Scheme], main_type: str) -> dict:
    """What the file's ``qserve.*`` metadata keys say about where it came from."""
    info = {"qserve_version": qserve_version(), "source": str(src), "source_layout": layout.name if layout else "float",
            "weight_type": main_type}
    qserve_json = src / "qserve.json"
    if qserve_json.exists():
        made = json.loads(qserve_json.read_text())
        made = made.get("source_provenance", made)
        info.update({k: made[k] for k in ("method", "source_sha256") if k in made})
        calib = made.get("calibration")
        if calib:
            info["calibration"] = {k: calib[k] for k in ("file", "sha256", "num_samples", "seq_len", "seed") if k in calib}
    if scheme is not None:
        info["scheme"] = scheme.to_dict()
    return info
