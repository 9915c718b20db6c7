"""quantize refuses, before any work, checkpoints vLLM's compressed-tensors loader would reject."""

from __future__ import annotations

import dataclasses

import pytest

from core.schemes import PRESETS, SchemeError, get_scheme, parse_override
from exporters.compressed_tensors import check_fits
from quantize.pipeline import quantize_checkpoint


def _asym(name: str):
    scheme = get_scheme(name)
    return dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, symmetric=False))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fits(name):
    check_fits(get_scheme(name))
    check_fits(get_scheme(name, 64)) if PRESETS[name].weight_only else None


@pytest.mark.parametrize("scheme, message", [
    (_asym("w8a8"), r"asymmetric weights with quantized activations \(drop --asym"),
    (_asym("w8a8-static"), "asymmetric weights with quantized activations"),
    (get_scheme("w8a8-static", 64), r"group weight scales with quantized activations \(drop --group-size"),
    (get_scheme("fp8", 64), "group weight scales with quantized activations"),
    (dataclasses.replace(get_scheme("w8a8"), overrides=(parse_override("down_proj=w4a16"),)),
     r"int4 weights beside int8 activations in override \['down_proj'\]"),
])
def test_schemes_vllm_cannot_load_are_refused_before_any_work(tiny, tmp_path, scheme, message):
    with pytest.raises(SchemeError, match=f"vLLM cannot load .*{message}"):
        quantize_checkpoint(tiny, scheme, "rtn", tmp_path / "out", progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_asymmetric_weight_only_schemes_fit():
    check_fits(_asym("w4a16"))
    check_fits(_asym("w8a16"))


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_fp16_scale_layouts_refuse_a_scale_fp16_cannot_hold(tiny, tmp_path, layout):
    """bf16 scales convert to the GPTQ/AWQ layouts' fp16 exactly only inside fp16's normal range: a tiny
    weight row (scale ~1e-7) would become a subnormal or zero, so the export is refused, not rounded."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from exporters.convert import export_checkpoint

    src = tmp_path / "src"
    src.mkdir()
    tensors = load_file(str(tiny / "model.safetensors"))
    tensors["model.layers.1.self_attn.q_proj.weight"][5] *= 1e-5  # one row of tiny weights
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text((tiny / "config.json").read_text())
    scheme = get_scheme("w4a16")
    if layout == "awq":
        scheme = _asym("w4a16")
    quantize_checkpoint(src, scheme, "rtn", tmp_path / "ct", progress=False, log=lambda m: None)
    scales = load_file(str(tmp_path / "ct" / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight_scale"]
    assert float(scales[5].float().min()) < 6e-5 < float(scales.float().max())
    with pytest.raises(SchemeError, match=r"model\.layers\.1\.self_attn\.q_proj: a scale of .*e-0[6-9] cannot be stored "
                                          rf"exactly as float16, the {layout.upper()} layout"):
        export_checkpoint(tmp_path / "ct", layout, tmp_path / layout, log=lambda m: None)
    assert not (tmp_path / layout).exists()
    export_checkpoint(tmp_path / "ct", "dequantized", tmp_path / "float", log=lambda m: None)
    assert json.loads((tmp_path / "float" / "qserve.json").read_text())["layout"] == "dequantized"
    assert torch.isfinite(load_file(str(tmp_path / "float" / "model.safetensors"))[
        "model.layers.1.self_attn.q_proj.weight"]).all()
