"""The quantization pipeline on a tiny random Llama: layout, fidelity, group-size errors, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open

from quantize import pipeline
from quantize.methods import parse_recipe
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


@pytest.fixture(scope="module")
def outlier_tiny(tiny_with_tokenizer, tmp_path_factory):
    """The tiny model with four RMSNorm channels scaled 20x in every layer: the activation outliers real LLMs
    have and that SmoothQuant and AWQ exist for (on the plain random model there is nothing to protect)."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("outlier") / "model"
    shutil.copytree(tiny_with_tokenizer, path)
    state = load_file(path / "model.safetensors")
    for name, tensor in state.items():
        if name.endswith("layernorm.weight"):
            tensor[:4] *= 20
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _text_ids(model_dir, n: int = 4, length: int = 256) -> torch.Tensor:
    """Held-out real text (the test split; calibration reads the validation split)."""
    from transformers import AutoTokenizer

    from core.data import data_file

    ids = AutoTokenizer.from_pretrained(model_dir)(data_file("wikitext2-test.raw").read_text(encoding="utf-8")[:20000],
                                                  add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[i * length:(i + 1) * length] for i in range(n)])


def _logits(model_dir, state=None, act_per_token: bool = False):
    """Logits in float32 on held-out text; ``act_per_token`` fake-quantizes the linears' inputs per token to
    int8, as vLLM's dynamic W8A8 kernels do (without it SmoothQuant's gain is invisible)."""
    from transformers import AutoModelForCausalLM

    from core import numerics
    from core.schemes import QuantArgs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if act_per_token:
        per_token = QuantArgs(num_bits=8, strategy="channel")
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.register_forward_pre_hook(lambda _m, inp: (numerics.fake_quantize(
                    inp[0].reshape(-1, inp[0].shape[-1]), per_token).reshape(inp[0].shape),))
    with torch.no_grad():
        return model(_text_ids(model_dir)).logits


def _logit_error(model_dir, out, scheme: str) -> float:
    """Relative error of the quantized checkpoint's logits against the float model's."""
    from exporters.dequantize import dequantized_state_dict

    ref = _logits(model_dir)
    got = _logits(model_dir, dequantized_state_dict(out), act_per_token=scheme == "w8a8")
    return float((got - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def rtn_logit_error(outlier_tiny, tmp_path_factory):
    """RTN's logit error per scheme on the outlier model, computed once: the baseline every method must beat."""
    errors = {}
    for scheme in ("w4a16", "w8a8"):
        out = tmp_path_factory.mktemp("rtn") / scheme
        quantize_checkpoint(outlier_tiny, get_scheme(scheme), "rtn", out, progress=False, log=lambda m: None)
        errors[scheme] = _logit_error(outlier_tiny, out, scheme)
    return errors


# Relative logit error on the outlier model, 4 x 256 held-out tokens, 8 x 64 calibration tokens, measured
# at commit 4dfa0cf (scales rounded to bf16): RTN w4a16 0.295, w8a8 0.0422. Method / RTN ratios measured:
# gptq 0.31, awq 0.81, awq+gptq 0.41, smoothquant 0.64, smoothquant+gptq 0.48, w8a8 gptq 0.90. Each bound sits between the
# measured ratio and 1 (a method that silently does RTN, or transforms without protecting, gives >= 1).
@pytest.mark.parametrize("scheme, method, max_ratio", [
    ("w4a16", "gptq", 0.6), ("w4a16", "awq", 0.93), ("w4a16", "awq+gptq", 0.7),
    ("w8a8", "smoothquant+gptq", 0.75), ("w8a8", "smoothquant", 0.85), ("w8a8", "gptq", 0.97)])
def test_calibrated_recipes_beat_rtn(outlier_tiny, rtn_logit_error, tmp_path, scheme, method, max_ratio):
    from quantize.calibration import CalibrationSpec
    from quantize.pipeline import QuantizeOptions

    png = method == "smoothquant"  # one recipe draws the figure too: it has kurtosis before and after
    options = QuantizeOptions(calibration=CalibrationSpec(num_samples=8, seq_len=64), report_png=png)
    out = tmp_path / "out"
    report = quantize_checkpoint(outlier_tiny, get_scheme(scheme), method, out, progress=False,
                                 log=lambda m: None, options=options)
    figure = out / "quantization_report.png"
    assert figure.exists() == png and (not png or figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
    assert report.method == parse_recipe(method).name and report.calibration["num_samples"] == 8
    assert len(report.calibration["window_starts"]) == 8
    layers = json.loads((out / "quantization_report.json").read_text())["layers"]
    assert [layer["index"] for layer in layers] == [0, 1]
    assert all(len(layer["output_rel_error"]) == 7 for layer in layers)
    if "gptq" in method:
        assert all(len(layer["dampening"]) == 7 for layer in layers)
    assert (out / "quantization_report.md").read_text().count("\n|") >= 14
    error = _logit_error(outlier_tiny, out, scheme)
    assert error < max_ratio * rtn_logit_error[scheme], (error, rtn_logit_error[scheme])


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
    """Layers that cannot be calibrated stage by stage go through the generic two-pass path. Layer 0's q/k/v
    read the same inputs on both paths (the embeddings through the first norm), so their integers must be
    identical; later linears see inputs made by quantized (staged) or float (two-pass) upstream linears, which
    moved 2-28 % of the integers by at most 3 steps (measured); a wrong Hessian moves most of them."""
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
        runs[path] = (_tensors(out), json.loads((out / "quantization_report.json").read_text())["layers"])
    (staged_q, staged_report), (two_pass_q, two_pass_report) = runs["staged"], runs["two-pass"]
    assert [sorted(r["output_cosine"]) for r in staged_report] == [sorted(r["output_cosine"]) for r in two_pass_report]
    ints = [name for name, t in staged_q.items() if t.dtype == torch.int8]
    assert len(ints) == 14
    for name in ints:
        diff = (staged_q[name].int() - two_pass_q[name].int()).abs()
        if name.startswith("model.layers.0.self_attn.") and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(staged_q[name], two_pass_q[name]), name
            assert torch.equal(staged_q[f"{name}_scale"], two_pass_q[f"{name}_scale"]), name
        else:
            assert int(diff.max()) <= 4 and float((diff > 0).float().mean()) < 0.4, name


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
