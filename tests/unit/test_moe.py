"""Mixture-of-Experts models: every routed expert quantized under its checkpoint name, calibrated on the tokens
the model routes to it (or rounded to nearest, said, when it got too few), the router kept in float; the
expert-by-expert replay computes what transformers computes."""

from __future__ import annotations

import json

import pytest
import torch

from core.schemes import get_scheme
from exporters.dequantize import read_tensors
from quantize.calibration import CalibrationSpec, load_calibration
from quantize.methods import MethodError
from quantize.moe import MoEError
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
from tests.unit.tiny import make_tiny_moe

W4 = get_scheme("w4a16", 32)  # the tiny experts' widths (64, 32) take groups of 32
CALIB = CalibrationSpec(num_samples=8, seq_len=64)  # 512 tokens, 1,024 expert slots (top-2) over 8 experts
STORED = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
          "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
          "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


@pytest.fixture(scope="module", params=list(STORED))
def moe_model(request, tmp_path_factory):
    return request.param, make_tiny_moe(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _quantize(src, out, method="gptq", **options):
    return quantize_checkpoint(src, W4, method, out, progress=False, log=lambda _: None,
                               options=QuantizeOptions(calibration=CALIB, **options))


def test_every_expert_is_quantized_under_its_checkpoint_name_and_the_router_stays_float(moe_model, tmp_path):
    model_type, src = moe_model
    block, projections = STORED[model_type]
    _quantize(src, tmp_path / "q")
    stored = read_tensors(tmp_path / "q")
    for layer in range(2):
        for e in range(8):
            for p in projections:
                name = f"model.layers.{layer}.{block}.experts.{e}.{p}"
                assert f"{name}.weight_packed" in stored and f"{name}.weight" not in stored
        router = stored[f"model.layers.{layer}.{block}.gate.weight"]
        assert router.dtype == torch.bfloat16 and router.shape == (8, 64)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert any("gate$" in pattern for pattern in config["ignore"])  # vLLM reads the router as a float linear
    if model_type == "qwen2_moe":  # the shared expert is quantized, its gate is not
        assert "model.layers.0.mlp.shared_expert.down_proj.weight_packed" in stored
        assert stored["model.layers.0.mlp.shared_expert_gate.weight"].dtype == torch.bfloat16
    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())["layers"]
    # top-2 routing: each of the 512 calibration tokens reaches two experts in every layer
    assert [sum(layer["expert_tokens"]) for layer in report] == [1024, 1024]
    for layer in report:  # the default threshold (128 tokens) splits these experts both ways
        assert layer["expert_fallback"] == [e for e, n in enumerate(layer["expert_tokens"]) if n < 128]
    assert 0 < sum(len(layer["expert_fallback"]) for layer in report) < 16


def test_calibration_replays_the_float_model_expert_by_expert(moe_model):
    """Nothing quantized: the staged replay (attention, then the sparse block through per-expert linears loaded
    from the checkpoint's names) must give transformers' own hidden states (which loads the fused experts)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from core.checkpoint import layer_loader, weight_files
    from quantize import layerwise
    from quantize import shell as shell_module
    from quantize.methods import parse_recipe
    from quantize.moe import moe_family

    model_type, src = moe_model
    config = AutoConfig.from_pretrained(src)
    samples, _ = load_calibration(CalibrationSpec(num_samples=4, seq_len=32), AutoTokenizer.from_pretrained(src))
    load = layer_loader(weight_files(src))
    embed = load(-1)["model.embed_tokens.weight"].float()
    plan = layerwise._Plan(config, W4, parse_recipe("gptq"), lambda _: False, None, None, False,
                           torch.device("cpu"), None, moe_family(config))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        expected = model(samples[:4], output_hidden_states=True).hidden_states
    block, projections = STORED[model_type]

    def replay(state: dict) -> torch.Tensor:
        shell = shell_module.catch_inputs(embed, config, samples, torch.device("cpu"))
        shell.dtype = shell.store_dtype = torch.float32
        job = layerwise._LayerJob(plan, shell, 0, {k: v.float() for k, v in state.items()})
        job.quantize(propagate=True)
        assert job.sparse and not job.quantized
        return torch.cat([h for h, _ in shell.inputs])

    state = load(0)
    got = replay(state)
    assert torch.allclose(got, expected[1], atol=1e-5, rtol=1e-4), (got - expected[1]).abs().max()
    # the control: two experts' weights exchanged, as a replay that misroutes tokens would compute
    swap = {f"model.layers.0.{block}.experts.{a}.{p}.weight": f"model.layers.0.{block}.experts.{b}.{p}.weight"
            for a, b in ((0, 1), (1, 0)) for p in projections}
    wrong = replay({swap.get(k, k): v for k, v in state.items()})
    assert (wrong - expected[1]).abs().max() > 100 * (got - expected[1]).abs().max()


def test_experts_short_of_tokens_fall_back_to_round_to_nearest(tmp_path):
    src = make_tiny_moe(tmp_path / "model", "qwen3_moe")
    _quantize(src, tmp_path / "rtn", method="rtn")
    _quantize(src, tmp_path / "starved", min_expert_tokens=10**6)  # every expert short: all round to nearest
    _quantize(src, tmp_path / "gptq", min_expert_tokens=0)
    rtn, starved, gptq = (read_tensors(tmp_path / n) for n in ("rtn", "starved", "gptq"))
    experts = [k for k in rtn if ".experts." in k and k.endswith("weight_packed")]
    assert len(experts) == 2 * 8 * 3
    assert all(torch.equal(rtn[k], starved[k]) for k in experts)
    assert sum(not torch.equal(rtn[k], gptq[k]) for k in experts) == len(experts)  # GPTQ used each Hessian
    attention = "model.layers.0.self_attn.q_proj.weight_packed"
    assert torch.equal(starved[attention], gptq[attention]) and not torch.equal(rtn[attention], gptq[attention])
    report = json.loads((tmp_path / "starved" / "quantization_report.json").read_text())["layers"]
    assert report[0]["expert_fallback"] == list(range(8))


def test_bad_moe_inputs_are_refused_before_any_work(tmp_path):
    no_experts = make_tiny_moe(tmp_path / "none", "qwen3_moe", num_experts=0)
    with pytest.raises(MoEError, match="at least one expert"):
        _quantize(no_experts, tmp_path / "a")
    src = make_tiny_moe(tmp_path / "model", "mixtral")
    with pytest.raises(MoEError, match="static activation"):
        quantize_checkpoint(src, get_scheme("w8a8-static"), "rtn", tmp_path / "b", progress=False,
                            log=lambda _: None)
    with pytest.raises(MethodError, match="llama"):  # the transforms' error names the families they fold into
        _quantize(src, tmp_path / "c", method="awq+gptq")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_zero_padded_chunks_give_the_statistics_of_the_rows_alone():
    """Experts are calibrated in fixed-size zero-padded chunks (bounded matmul shapes): the Hessian, count and
    samples must be those of the real rows; counting the padding would shrink the Hessian by 256/100."""
    from quantize.moe import _pad_rows
    from quantize.stats import Stats

    x = torch.randn(100, 16)
    plain, padded = Stats(True, True, 64, 100), Stats(True, True, 64, 100)
    plain.record("a", x)
    padded.record("a", _pad_rows(x, 256), valid=100)
    assert _pad_rows(x, 256).shape == (256, 16) and padded.count["a"] == 100
    assert torch.allclose(plain.hessian_of("a"), padded.hessian_of("a"), atol=1e-6)
    assert torch.equal(plain.samples_of("a"), padded.samples_of("a")) and torch.equal(plain.absmax["a"], padded.absmax["a"])
