"""The quantization pipeline on a tiny random Llama: layout, fidelity, group-size errors, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open

from quantize import pipeline
from quantize.pipeline import quantize_checkpoint
from core.schemes import SchemeError, get_scheme
from tests.unit.tiny import make_tiny_llama


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
    with pytest.raises(SchemeError, match=r"group size does not divide .*q_proj \(96 inputs, group 64\).*fit every layer: 32, 16.*--group-size auto"):
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


def _logits(model_dir, state=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state, strict=False)
    torch.manual_seed(5)
    return model(torch.randint(0, 300, (2, 32))).logits


@pytest.mark.parametrize("scheme, method", [("w4a16", "gptq"), ("w4a16", "awq"), ("w8a8", "smoothquant+gptq"),
                                            ("w8a8", "smoothquant")])
def test_calibrated_recipes(tiny_with_tokenizer, tmp_path, scheme, method):
    from exporters.dequantize import dequantized_state_dict
    from quantize.calibration import CalibrationSpec
    from quantize.pipeline import QuantizeOptions

    png = method == "smoothquant"  # one recipe draws the figure too: it has kurtosis before and after
    options = QuantizeOptions(calibration=CalibrationSpec(num_samples=8, seq_len=64), report_png=png)
    out = tmp_path / "out"
    report = quantize_checkpoint(tiny_with_tokenizer, get_scheme(scheme), method, out, progress=False,
                                 log=lambda m: None, options=options)
    figure = out / "quantization_report.png"
    assert figure.exists() == png and (not png or figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
    assert report.method.startswith(method.split("+")[0]) and report.calibration["num_samples"] == 8
    assert len(report.calibration["window_starts"]) == 8
    layers = json.loads((out / "quantization_report.json").read_text())["layers"]
    assert [layer["index"] for layer in layers] == [0, 1]
    assert all(cos > 0.9 for layer in layers for cos in layer["output_cosine"].values())
    if "gptq" in method:
        assert all(layer["dampening"] for layer in layers)
    assert (out / "quantization_report.md").read_text().count("\n|") >= 14
    # the transformed, quantized model still computes nearly the float model's function
    ref, got = _logits(tiny_with_tokenizer), _logits(tiny_with_tokenizer, dequantized_state_dict(out))
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.95


def test_calibration_text_too_short_fails_before_any_work(tiny_with_tokenizer, tmp_path):
    from quantize.calibration import CalibrationError, CalibrationSpec
    from quantize.pipeline import QuantizeOptions

    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    options = QuantizeOptions(calibration=CalibrationSpec(num_samples=4, seq_len=64, path=short))
    with pytest.raises(CalibrationError, match="fewer samples"):
        quantize_checkpoint(tiny_with_tokenizer, get_scheme("w4a16"), "gptq", tmp_path / "out", progress=False,
                            log=lambda m: None, options=options)
    assert not (tmp_path / "out").exists()


def test_jsonl_calibration_names_the_bad_line(tiny_with_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from quantize.calibration import CalibrationError, CalibrationSpec, load_calibration

    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(CalibrationError, match=r"calib.jsonl:2: .*'text'"):
        load_calibration(CalibrationSpec(path=bad), AutoTokenizer.from_pretrained(tiny_with_tokenizer))


def test_asymmetric_w4a16_zero_points_round_trip(tiny, tmp_path):
    from dataclasses import replace

    from exporters.dequantize import dequantized_state_dict

    scheme = get_scheme("w4a16")
    scheme = replace(scheme, weights=replace(scheme.weights, symmetric=False))
    quantize_checkpoint(tiny, scheme, "rtn", tmp_path / "out", progress=False, log=lambda m: None)
    name = "model.layers.0.mlp.down_proj"
    stored = _tensors(tmp_path / "out")
    assert stored[f"{name}.weight_zero_point"].dtype == torch.int32
    assert stored[f"{name}.weight_zero_point"].shape == (128 // 8, 256 // 64)  # packed along the outputs
    weight = _tensors(tiny)[f"{name}.weight"].float()
    decoded = dequantized_state_dict(tmp_path / "out")[f"{name}.weight"]
    scale = stored[f"{name}.weight_scale"].float().repeat_interleave(64, dim=1)
    assert (decoded - weight).abs().max() <= scale.max() * 0.51 + 1e-3


@pytest.mark.parametrize("spec, message", [("hf:wikitext", "hf:NAME"), ("hf:wikitext:x:y:z", "hf:NAME"),
                                           ("hf:wikitext:wikitext-2-raw-v1:validation", "needs the 'datasets'")])
def test_hub_calibration_spec_errors_are_clear(tiny_with_tokenizer, spec, message, monkeypatch):
    import sys

    from transformers import AutoTokenizer

    from quantize.calibration import CalibrationError, CalibrationSpec, load_calibration

    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without it: import fails

    with pytest.raises(CalibrationError, match=message):
        load_calibration(CalibrationSpec(path=spec), AutoTokenizer.from_pretrained(tiny_with_tokenizer))


def test_two_pass_path_for_other_architectures(tiny_with_tokenizer, tmp_path, monkeypatch):
    """Layers that cannot be calibrated stage by stage go through the generic two-pass path: a GPTQ result
    close to the staged one, the same report rows."""
    from exporters.dequantize import dequantized_state_dict
    from quantize import layerwise
    from quantize.calibration import CalibrationSpec
    from quantize.pipeline import QuantizeOptions

    options = QuantizeOptions(calibration=CalibrationSpec(num_samples=8, seq_len=64))
    runs = {}
    for path, is_staged in (("staged", True), ("two-pass", False)):
        monkeypatch.setattr(layerwise, "staged", lambda _config, _layer, s=is_staged: s)
        out = tmp_path / path
        quantize_checkpoint(tiny_with_tokenizer, get_scheme("w8a8"), "gptq", out, progress=False,
                            log=lambda m: None, options=options)
        runs[path] = (dequantized_state_dict(out), json.loads((out / "quantization_report.json").read_text())["layers"])
    staged_gptq, two_pass_gptq = runs["staged"], runs["two-pass"]
    assert [sorted(r["output_cosine"]) for r in staged_gptq[1]] == [sorted(r["output_cosine"]) for r in two_pass_gptq[1]]
    for name, tensor in staged_gptq[0].items():
        assert torch.nn.functional.cosine_similarity(tensor.flatten().float(),
                                                     two_pass_gptq[0][name].flatten().float(), dim=0) > 0.99, name


def test_smoothquant_alpha_auto_is_searched_per_layer_and_reported(tiny_with_tokenizer, tmp_path):
    from quantize.calibration import CalibrationSpec
    from quantize.pipeline import QuantizeOptions
    from quantize.transforms import SMOOTHQUANT_ALPHAS

    options = QuantizeOptions(calibration=CalibrationSpec(num_samples=4, seq_len=64), smoothquant_alpha=None)
    quantize_checkpoint(tiny_with_tokenizer, get_scheme("w8a8"), "smoothquant", tmp_path / "out", progress=False,
                        log=lambda m: None, options=options)
    layers = json.loads((tmp_path / "out" / "quantization_report.json").read_text())["layers"]
    for layer in layers:  # the norm-fed mappings, each with its own choice from the grid
        assert set(layer["smoothquant_alpha"]) == {"self_attn.q_proj", "mlp.gate_proj"}
        assert all(a in SMOOTHQUANT_ALPHAS for a in layer["smoothquant_alpha"].values())


def test_report_figure_series_group_linears_by_kind_across_layers():
    from quantize.report_figure import _series

    layers = [{"index": i, "output_rel_error": {"self_attn.q_proj": 0.01 * (i + 1), "mlp.down_proj": 0.02},
               "input_kurtosis_before": {"self_attn.q_proj": 50.0}} for i in range(3)]
    errors = _series(layers, "output_rel_error")
    assert sorted(errors) == ["down_proj", "q_proj"] and errors["q_proj"] == ([0, 1, 2], [0.01, 0.02, 0.03])
    assert list(_series(layers, "input_kurtosis_before")) == ["q_proj"]
    assert _series(layers, "weight_kurtosis_before") == {}
