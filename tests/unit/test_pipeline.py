"""The quantization pipeline on a tiny random Llama: layout, fidelity, group-size errors, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open

from quantize import pipeline
from quantize.pipeline import quantize_checkpoint
from quantize.schemes import SchemeError, get_scheme


def make_tiny_llama(path, hidden=128, intermediate=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_w8a8_checkpoint_layout_and_fidelity(tiny, tmp_path):
    report = quantize_checkpoint(tiny, get_scheme("w8a8"), "rtn", tmp_path / "out", progress=False, log=lambda m: None)
    assert report.quantized_layers == 2 * 7 and report.skipped == ["lm_head"]
    source, out = _tensors(tiny), _tensors(tmp_path / "out")
    name = "model.layers.1.mlp.down_proj"
    assert out[f"{name}.weight"].dtype == torch.int8 and out[f"{name}.weight_scale"].shape == (128, 1)
    restored = out[f"{name}.weight"].float() * out[f"{name}.weight_scale"].float()
    assert torch.allclose(restored, source[f"{name}.weight"].float(), atol=float(out[f"{name}.weight_scale"].max()))
    assert out["lm_head.weight"].dtype == torch.bfloat16  # ignored layers stay as they were
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"


def test_w4a16_packed_weights_decode_with_the_library(tiny, tmp_path):
    quantize_checkpoint(tiny, get_scheme("w4a16"), "rtn", tmp_path / "out", progress=False, log=lambda m: None)
    out = _tensors(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj"
    shape = torch.Size(out[f"{name}.weight_shape"].tolist())
    q = unpack_from_int32(out[f"{name}.weight_packed"], 4, shape)
    scale = out[f"{name}.weight_scale"].float().repeat_interleave(64, dim=1)
    weight = _tensors(tiny)[f"{name}.weight"].float()
    assert (q.float() * scale - weight).abs().max() <= scale.max() / 2 + 1e-3


def test_group_size_that_does_not_fit_lists_layers_and_fits(tmp_path):
    model = make_tiny_llama(tmp_path / "odd", hidden=96, intermediate=160)
    with pytest.raises(SchemeError, match=r"group size 64 does not divide .*q_proj \(96 inputs\).*fit every layer: 32, 16"):
        quantize_checkpoint(model, get_scheme("w4a16"), "rtn", tmp_path / "out", progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_no_output(tiny, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pipeline.quantize_weight

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_weight", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_checkpoint(tiny, get_scheme("w8a8"), "rtn", tmp_path / "out", progress=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
