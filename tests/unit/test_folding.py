"""Folding per architecture: the transformed float model computes what the original did, for every family
in the table; the recipe's transforms run in its order on one view of the activations; other
architectures are refused for transforms and still work with RTN and GPTQ."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.schemes import QuantArgs
from quantize import folding
from quantize.folding import FAMILIES, LLAMA, apply_transforms, family_of
from quantize.methods import MethodError, parse_recipe

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=128, head_dim=16, max_position_embeddings=64)


def _config(model_type: str):
    from transformers import AutoConfig

    extra = {"query_pre_attn_scalar": 16} if model_type.startswith("gemma") else {}
    if model_type in ("gemma2", "gemma3_text"):
        extra.update(sliding_window=32, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if model_type == "gemma3_text":
        extra.pop("attn_logit_softcapping")
    if model_type == "phi3":
        extra["pad_token_id"] = 0  # its default (32000) is outside the tiny vocabulary
    return AutoConfig.for_model(model_type, **SMALL, **extra)


def _model(model_type: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(model_type), dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 0 (Gemma) or 1 (Llama): random weights make the offset matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.5, 0.5) if model_type.startswith("gemma") else param.uniform_(0.5, 1.5)
    return model


def _fold_random(model: torch.nn.Module, family, offset: float) -> None:
    """Folds random per-channel scales along every mapping of every layer, as a transform would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            modules = dict(layer.named_modules())
            for mapping in family.mappings:
                smooth, balance = modules[mapping.smooth], [modules[b] for b in mapping.balance]
                if isinstance(smooth, torch.nn.Linear) and smooth.out_features != balance[0].in_features:
                    continue
                s = torch.rand(balance[0].in_features) * 3 + 0.25
                folding.fold_scales(smooth, balance, s, offset)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_folding_keeps_every_familys_logits(model_type):
    model, family = _model(model_type), FAMILIES[model_type]
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _fold_random(model, family, family.norm_offset)
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-3 * before.abs().max(), model_type


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_llama_rules_on_gemma_would_change_its_function(model_type):
    """The table matters: Llama's norm semantics (offset 0) or norm placement on Gemma change the logits."""
    model = _model(model_type)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _fold_random(model, LLAMA if model_type == "gemma2" else FAMILIES[model_type], 0.0)
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 0.05 * before.abs().max()


def test_other_architectures_are_refused_for_transforms_only():
    other = SimpleNamespace(model_type="gpt_neox")
    with pytest.raises(MethodError, match=r"model types gemma, gemma2, gemma3_text, llama.*not 'gpt_neox'.*rtn\|gptq"):
        family_of(other, parse_recipe("smoothquant+gptq"))
    assert family_of(other, parse_recipe("gptq")) is None and family_of(other, parse_recipe("rtn")) is None


def _mapping_stats(x: torch.Tensor, names: tuple[str, ...]):
    samples = {n: x.clone() for n in names}
    return SimpleNamespace(samples_of=samples.__getitem__, absmax={n: x.abs().amax(dim=0) for n in names})


@pytest.mark.parametrize("method", ["smoothquant+awq", "awq+smoothquant"])
def test_transforms_run_in_recipe_order_on_the_activations_as_they_are(method, monkeypatch):
    """Each transform sees the samples the previous one rescaled (so AWQ after SmoothQuant searches on
    smoothed activations), in the order the recipe names them."""
    torch.manual_seed(2)
    norm = torch.nn.RMSNorm(32)
    linear = torch.nn.Linear(32, 16, bias=False)
    layer = torch.nn.ModuleDict({"input_layernorm": norm, "q": linear})
    family = folding.Family("one", 0.0, (folding.Mapping("input_layernorm", ("q",)),))
    x = torch.randn(256, 32)
    x[:, :4] *= 30  # salient channels: both transforms scale them
    stats = _mapping_stats(x, ("q",))
    seen = []  # (transform, what it was given, the scales it returned)
    real_sq, real_awq = folding.smoothquant_scales, folding.awq_scales

    def sq(absmax, weights, alpha):
        s = real_sq(absmax, weights, alpha)
        seen.append(("smoothquant", absmax.clone(), s))
        return s

    def awq(samples, weights, args):  # a fixed, clearly non-trivial scale: the search itself is tested elsewhere
        real_awq(samples, weights, args)
        s = torch.linspace(0.5, 2.0, samples.shape[1])
        seen.append(("awq", samples.clone(), s))
        return s

    monkeypatch.setattr(folding, "smoothquant_scales", sq)
    monkeypatch.setattr(folding, "awq_scales", awq)
    args = {"q": QuantArgs(num_bits=4, strategy="group", group_size=16)}
    apply_transforms(layer, family, stats, parse_recipe(method), args, alpha=0.5)
    assert [name for name, _, _ in seen] == method.split("+")
    (_, _, s1), (second, given, _) = seen
    assert not torch.allclose(s1, torch.ones_like(s1), atol=0.05)  # the first transform really rescaled
    expected = x / s1 if second == "awq" else (x / s1).abs().amax(dim=0)
    assert torch.allclose(given, expected, rtol=1e-5, atol=1e-6)


def test_awq_keeps_the_unclipped_weights_as_the_report_reference():
    """The per-layer report measures against the float function: the weights after AWQ's equivalent scaling
    but before its (lossy) clipping, and a smoothing linear's outputs mapped back by its row scale."""
    from quantize.report import LayerReport, report_linear

    torch.manual_seed(5)
    layer = torch.nn.ModuleDict({"input_layernorm": torch.nn.RMSNorm(64), "q": torch.nn.Linear(64, 32, bias=False)})
    original = layer["q"].weight.detach().clone()
    family = folding.Family("one", 0.0, (folding.Mapping("input_layernorm", ("q",)),))
    x = torch.randn(512, 64)
    x[:, 3] *= 20
    stats = _mapping_stats(x, ("q",))
    folded = apply_transforms(layer, family, stats, parse_recipe("awq"), {"q": QuantArgs(num_bits=3, strategy="group", group_size=32)}, alpha=0.5)
    s = x[0] / stats.samples_of("q")[0]  # the scale AWQ folded, read off the rescaled samples
    assert torch.allclose(folded.reference["q"], original * s, rtol=1e-5, atol=1e-6)
    clipped = layer["q"].weight.detach()
    assert not torch.equal(clipped, folded.reference["q"])  # clipping changed some groups
    report = LayerReport(0)
    stats.samples_of = lambda name: x / s
    report_linear("q", clipped, clipped, stats, folded, report)  # "quantized" to the clipped weights themselves
    expected = float((x @ (clipped / s).T - x @ original.T).norm() / (x @ original.T).norm())
    assert report.output_rel_error["q"] == pytest.approx(expected, rel=1e-4) and expected > 1e-3
