"""Per-layer overrides, --group-size auto, static activation scales, FP8 and bad input, on tiny Llamas."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from exporters.compressed_tensors import scheme_from_config
from exporters.dequantize import dequantized_state_dict
from quantize.calibration import CalibrationSpec
from quantize.methods import MethodError
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
from core.schemes import Scheme, SchemeError, get_scheme, parse_override
from tests.unit.tiny import make_tiny_llama

QUIET = {"progress": False, "log": lambda m: None}
SMALL_CALIBRATION = CalibrationSpec(num_samples=4, seq_len=32)


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _config(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


def test_override_puts_down_proj_at_8_bits_in_a_w4a16_model(tiny, tmp_path):
    from dataclasses import replace

    scheme = replace(get_scheme("w4a16"), overrides=(parse_override(r"re:.*mlp\.down_proj$=w8a16"),))
    assert Scheme.from_dict(scheme.to_dict()) == scheme
    quantize_checkpoint(tiny, scheme, "rtn", tmp_path / "out", **QUIET)
    config = _config(tmp_path / "out")
    assert config["config_groups"]["group_1"]["targets"] == [r"re:.*mlp\.down_proj$"]
    assert config["config_groups"]["group_1"]["weights"]["num_bits"] == 8
    assert scheme_from_config(config).weights_for("model.layers.0.mlp.down_proj").num_bits == 8
    stored = _tensors(tmp_path / "out")
    # 8-bit packs 4 values per int32 word, 4-bit packs 8
    assert stored["model.layers.0.mlp.down_proj.weight_packed"].shape == (128, 256 // 4)
    assert stored["model.layers.0.mlp.up_proj.weight_packed"].shape == (256, 128 // 8)
    source = _tensors(tiny)["model.layers.0.mlp.down_proj.weight"].float()
    decoded = dequantized_state_dict(tmp_path / "out")["model.layers.0.mlp.down_proj.weight"]
    scale = stored["model.layers.0.mlp.down_proj.weight_scale"].float()
    assert (decoded - source).abs().max() <= scale.max() * 0.5 + source.abs().max() * 2**-8  # + bf16 rounding


def test_group_size_auto_picks_the_largest_fit_per_layer(tmp_path):
    model = make_tiny_llama(tmp_path / "odd", hidden=96, intermediate=128)
    lines = []
    options = QuantizeOptions(auto_group_size=True)
    report = quantize_checkpoint(model, get_scheme("w4a16"), "rtn", tmp_path / "out", progress=False,
                                 log=lines.append, options=options)
    assert "group size auto: 128 for 2 layers; 32 for 12 layers" in lines
    scheme = scheme_from_config(_config(tmp_path / "out"))
    assert scheme.weights.group_size == 32 and scheme.weights_for("model.layers.1.mlp.down_proj").group_size == 128
    assert report.scheme["overrides"][0]["targets"] == [r"re:.*\.mlp\.down_proj$"]
    stored = _tensors(tmp_path / "out")
    assert stored["model.layers.1.mlp.down_proj.weight_scale"].shape == (96, 1)
    assert stored["model.layers.1.mlp.up_proj.weight_scale"].shape == (128, 3)


def test_override_that_splits_a_fused_layer_is_refused(tiny, tmp_path):
    from dataclasses import replace

    scheme = replace(get_scheme("w4a16"), overrides=(parse_override("q_proj=w8a16"),))
    with pytest.raises(SchemeError, match="vLLM fuses them"):
        quantize_checkpoint(tiny, scheme, "rtn", tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [("down_proj", "PATTERN=PRESET"), ("down_proj=w9", "unknown scheme"),
                                           ("re:(=w8a16", "bad regular expression"), ("x=w4a16:64", "gN")])
def test_bad_overrides_say_how_to_write_them(text, message):
    with pytest.raises(SchemeError, match=message):
        parse_override(text)


@pytest.mark.parametrize("scheme_name, weight_dtype, fmt", [("w8a8-static", torch.int8, "int-quantized"),
                                                            ("fp8", torch.float8_e4m3fn, "float-quantized")])
def test_static_activation_schemes_store_calibrated_input_scales(tiny_with_tokenizer, tmp_path, scheme_name,
                                                                 weight_dtype, fmt):
    options = QuantizeOptions(calibration=SMALL_CALIBRATION)
    quantize_checkpoint(tiny_with_tokenizer, get_scheme(scheme_name), "rtn", tmp_path / "out", progress=False,
                        log=lambda m: None, options=options)
    stored = _tensors(tmp_path / "out")
    name = "model.layers.1.self_attn.o_proj"
    assert stored[f"{name}.weight"].dtype == weight_dtype and stored[f"{name}.input_scale"].shape == (1,)
    assert float(stored[f"{name}.input_scale"]) > 0
    config = _config(tmp_path / "out")
    assert config["format"] == fmt and config["config_groups"]["group_0"]["input_activations"]["dynamic"] is False


def test_fp8_weights_decode_close_to_the_source(tiny, tmp_path):
    quantize_checkpoint(tiny, get_scheme("fp8-dynamic"), "rtn", tmp_path / "out", **QUIET)
    name = "model.layers.0.mlp.gate_proj.weight"
    source = _tensors(tiny)[name].float()
    decoded = dequantized_state_dict(tmp_path / "out")[name]
    rel = (decoded - source).norm() / source.norm()
    assert rel < 0.05  # E4M3 has 3 mantissa bits: ~2-3 % relative error


def test_missing_gpu_is_a_clear_error_before_any_work(tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from core.models import ModelError

    with pytest.raises(ModelError, match="no CUDA GPU"):
        quantize_checkpoint(tiny, get_scheme("w4a16"), "gptq", tmp_path / "out", progress=False, log=lambda m: None,
                            options=QuantizeOptions(device="cuda"))
    assert not (tmp_path / "out").exists()


def test_calibrated_method_on_a_non_llama_architecture_says_what_it_needs(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(MethodError, match=r"awq.*model.layers.N.*GPT2LMHeadModel.*--method rtn"):
        quantize_checkpoint(tmp_path / "gpt2", get_scheme("w4a16"), "awq", tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_inspect_reports_bits_per_weight_and_decodes_every_layer(tiny, tmp_path):
    from dataclasses import replace

    from exporters.inspect import inspect_checkpoint

    scheme = replace(get_scheme("w4a16"), overrides=(parse_override(r"re:.*mlp\.down_proj$=w8a16"),))
    quantize_checkpoint(tiny, scheme, "rtn", tmp_path / "out", **QUIET)
    report = inspect_checkpoint(tmp_path / "out")
    assert report.format == "compressed-tensors (pack-quantized)" and not report.problems
    by_module = {g.module: g for g in report.groups}
    # int4 + one bf16 scale per 64 weights = 4.25 bits; int8 per channel + one bf16 scale per 256 = 8.06
    assert by_module["self_attn.q_proj"].bits_per_weight == pytest.approx(4.25, abs=0.01)
    assert by_module["mlp.down_proj"].bits_per_weight == pytest.approx(8 + 16 / 256, abs=0.01)
    assert by_module["mlp.down_proj"].scheme == "int8 channel sym" and by_module["mlp.down_proj"].layers == 2
    assert report.total_bytes < report.bf16_bytes
    float_report = inspect_checkpoint(tiny)
    assert float_report.format.startswith("float") and float_report.total_bytes == float_report.bf16_bytes


def test_inspect_flags_a_layer_that_does_not_decode(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from exporters.inspect import inspect_checkpoint

    quantize_checkpoint(tiny, get_scheme("w4a16"), "rtn", tmp_path / "out", **QUIET)
    path = tmp_path / "out" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = torch.full_like(
        tensors["model.layers.0.mlp.up_proj.weight_scale"], float("inf"))
    save_file(tensors, str(path))
    report = inspect_checkpoint(tmp_path / "out")
    assert report.problems == ["model.layers.0.mlp.up_proj: decodes to non-finite values"]
