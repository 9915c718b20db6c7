"""FP8 KV cache: the scales are the maxima of the keys (after RoPE) and values the quantized attention caches,
over the FP8 grid's half width; they are written where vLLM loads them, the config declares them the way
compressed-tensors reads it, and the engine is started with the matching cache dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from core.schemes import SchemeError, get_scheme
from exporters.compressed_tensors import scheme_from_config
from quantize.calibration import CalibrationSpec, load_calibration
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
from serving.engine import EngineConfig, checkpoint_kv_cache_dtype
from tests.unit.tiny import make_tiny_llama_with_tokenizer

SPEC = CalibrationSpec(num_samples=4, seq_len=32)


@pytest.fixture(scope="module")
def fp8_kv(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    src = make_tiny_llama_with_tokenizer(root / "src")
    out = root / "out"
    quantize_checkpoint(src, get_scheme("w4a16").with_kv_cache("fp8"), "rtn", out, progress=False,
                        log=lambda m: None, options=QuantizeOptions(calibration=SPEC))
    return src, out


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _layer0_keys_values(out, src):
    """Layer 0's cached keys (after RoPE) and values on the calibration samples, by hand, in float32 with
    the checkpoint's decoded weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from exporters.dequantize import dequantized_state_dict

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.load_state_dict(dequantized_state_dict(out), strict=False)
    samples, _ = load_calibration(SPEC, AutoTokenizer.from_pretrained(src))
    layer, cfg = model.model.layers[0], model.config
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(samples))
        hd = cfg.hidden_size // cfg.num_attention_heads
        k = layer.self_attn.k_proj(x).view(*x.shape[:2], -1, hd).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(*x.shape[:2], -1, hd).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(x.shape[1])[None].expand(x.shape[0], -1))
        _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    return k, k_rot, v


def test_scales_are_the_cached_maxima_over_448(fp8_kv):
    src, out = fp8_kv
    stored = _tensors(out)
    k, k_rot, v = _layer0_keys_values(out, src)
    k_scale, v_scale = stored["model.layers.0.self_attn.k_scale"], stored["model.layers.0.self_attn.v_scale"]
    assert k_scale.shape == (1,) and k_scale.dtype == torch.float32
    # the layers ran in bf16 where the CPU has bf16 units: 1 % covers that, not the maximum before RoPE
    # (measured: the stored k_scale is 0.3 % from the post-RoPE maximum, 4.6 % from the pre-RoPE one)
    assert float(k_scale) == pytest.approx(float(k_rot.abs().max()) / 448, rel=0.01)
    assert float(v_scale) == pytest.approx(float(v.abs().max()) / 448, rel=0.01)
    assert {f"model.layers.{i}.self_attn.{s}" for i in range(2) for s in ("k_scale", "v_scale")} <= set(stored)


def test_the_config_declares_the_kv_cache_as_compressed_tensors_reads_it(fp8_kv):
    from compressed_tensors.quantization import QuantizationConfig

    _, out = fp8_kv
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    kv = QuantizationConfig.model_validate(config).kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.symmetric, kv.dynamic) == (8, "float", "tensor", True, False)
    assert scheme_from_config(config).kv_cache == get_scheme("w4a16").with_kv_cache("fp8").kv_cache
    assert json.loads((out / "qserve.json").read_text())["scheme"]["kv_cache"]["type"] == "float"


def test_the_engine_starts_with_an_fp8_cache_for_such_a_checkpoint_only(fp8_kv, tmp_path):
    src, out = fp8_kv
    assert checkpoint_kv_cache_dtype(out) == "fp8" and checkpoint_kv_cache_dtype(src) is None

    def command(model_dir, extra=()):
        return EngineConfig(model_dir=model_dir, served_name="m", port=1, log_path=tmp_path / "log",
                            extra_args=extra).command()

    assert command(out)[command(out).index("--kv-cache-dtype") + 1] == "fp8"
    assert "--kv-cache-dtype" not in command(src)
    user = command(out, ("--kv-cache-dtype=auto",))  # the user's own choice wins, and is passed once
    assert [a for a in user if a.startswith("--kv-cache-dtype")] == ["--kv-cache-dtype=auto"]


def test_an_unknown_kv_cache_scheme_is_refused_in_one_line():
    with pytest.raises(SchemeError, match="--kv-cache 'int4' is not a KV-cache scheme vLLM serves; use one of: fp8"):
        get_scheme("w8a8").with_kv_cache("int4")


def test_inspect_reports_the_kv_cache(fp8_kv):
    from exporters.inspect import inspect_checkpoint

    report = inspect_checkpoint(fp8_kv[1])
    assert report.kv_cache == "float8 tensor sym scales (k_scale, v_scale) in 2 attention layers" and not report.problems
    assert "KV cache: float8 tensor sym" in report.markdown()


@pytest.mark.parametrize("layout, kept", [("compressed-tensors", True), ("gptq", False), ("dequantized", False)])
def test_export_keeps_the_kv_scales_only_where_the_layout_declares_them(fp8_kv, tmp_path, layout, kept):
    from exporters.convert import export_checkpoint

    said = []
    export_checkpoint(fp8_kv[1], layout, tmp_path / "out", log=said.append)
    names = set(_tensors(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text()).get("quantization_config") or {}
    assert ("model.layers.0.self_attn.k_scale" in names) == kept == bool(config.get("kv_cache_scheme"))
    assert any("KV-cache scales were left out" in line for line in said) != kept


def test_the_observing_attention_keeps_the_models_mask():
    """Gemma 3 attends within a sliding window on some layers: observing must not change what it computes."""
    from quantize.kv_cache import observing, use_observing_attention
    from tests.unit.tiny import make_tiny_sliding_window_model

    model, ids = make_tiny_sliding_window_model()
    with torch.no_grad():
        reference = model(ids).logits
        use_observing_attention(model)
        with observing(model.model.layers[0].self_attn) as kv:
            observed = model(ids).logits
    assert kv.calls == 1 and (observed - reference).abs().max() < 1e-5


def test_the_kv_cache_alone_leaves_every_linear_dense(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    from exporters.convert import export_checkpoint
    from quantize.methods import MethodError

    src = make_tiny_llama_with_tokenizer(tmp_path / "src")
    with pytest.raises(MethodError, match="--scheme none quantizes no weights: it takes --kv-cache fp8"):
        quantize_checkpoint(src, get_scheme("none"), "rtn", tmp_path / "nothing", progress=False, log=lambda m: None)
    assert not (tmp_path / "nothing").exists()
    out = tmp_path / "out"
    quantize_checkpoint(src, get_scheme("none").with_kv_cache("fp8"), "rtn", out, progress=False,
                        log=lambda m: None, options=QuantizeOptions(calibration=SPEC))
    stored, original = _tensors(out), _tensors(src)
    # every weight bit-identical to the source's; only the KV scales added
    assert set(stored) - set(original) == {f"model.layers.{i}.self_attn.{s}" for i in range(2)
                                           for s in ("k_scale", "v_scale")}
    assert all(torch.equal(stored[k], original[k]) for k in original)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.config_groups == {} and parsed.format == "dense" and parsed.kv_cache_scheme.type == "float"
    scheme = scheme_from_config(config)
    assert not scheme.quantizes_weights and scheme.kv_cache == get_scheme("none").with_kv_cache("fp8").kv_cache
    assert checkpoint_kv_cache_dtype(out) == "fp8"
    with pytest.raises(SchemeError, match="quantizes only the KV cache, and the gptq layout holds quantized weights"):
        export_checkpoint(out, "gptq", tmp_path / "gptq", log=lambda m: None)
    assert not (tmp_path / "gptq").exists()
