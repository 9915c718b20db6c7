"""Rotations: Hadamard matrices of real models' sizes are orthogonal; a rotated checkpoint computes what the
original did (tied and untied heads, every family that folds); rotation spreads outliers so that a 4-bit
grid loses less; architectures whose norms cannot fold are refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

from core import numerics
from core.schemes import QuantArgs
from quantize.hadamard import hadamard, random_hadamard
from quantize.methods import MethodError
from quantize.rotation import ROTATIONS, rotate_checkpoint, rotation_family

SMALL = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, head_dim=12, max_position_embeddings=64)


@pytest.mark.parametrize("n", [2, 4, 12, 20, 28, 36, 64, 576, 896, 960, 1536])
def test_hadamard_matrices_of_real_sizes_are_orthogonal(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [576, 100])  # 100 has no construction here: a random orthogonal matrix instead
def test_random_rotations_are_orthogonal(n):
    q = random_hadamard(n, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert (n == 100) != torch.allclose(q.abs(), torch.full_like(q, n ** -0.5))


def _checkpoint(path, model_type: str, tied: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"query_pre_attn_scalar": 12} if model_type == "gemma" else {}
    if model_type in ("qwen2", "llama"):
        extra["attention_bias"] = True  # qwen2 has q/k/v biases anyway; llama's option adds o_proj's too
    config = AutoConfig.for_model(model_type, **SMALL, **extra, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms far from their identity value, biases non-zero: folding must be exact
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("mistral", False),
                                             ("qwen2", True), ("qwen3", False), ("gemma", True)])
@pytest.mark.parametrize("kind", sorted(ROTATIONS))
def test_a_rotated_checkpoint_computes_the_same_logits(tmp_path, model_type, tied, kind):
    from transformers import AutoModelForCausalLM

    original = _checkpoint(tmp_path / "src", model_type, tied)
    (tmp_path / "rot").mkdir()
    report = rotate_checkpoint(tmp_path / "src", tmp_path / "rot", kind, seed=3)
    rotated = AutoModelForCausalLM.from_pretrained(tmp_path / "rot", dtype=torch.float32).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    before, after = _logits(original, ids), _logits(rotated, ids)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    # the weights really moved, and a tied head is written on its own
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert (rotated.state_dict()[q0] - original.state_dict()[q0]).abs().max() > 0.1 * original.state_dict()[q0].abs().max()
    assert report["untied_lm_head"] == tied
    assert json.loads((tmp_path / "rot" / "config.json").read_text()).get("tie_word_embeddings", False) is False


def test_rotation_spreads_outliers_so_a_4bit_grid_loses_less():
    """A weight with a few outlier columns (as real LLMs have): per-channel INT4 after rotation, rotated
    back, is closer to the original than INT4 of the original (measured: 21.3 dB against 10.7 dB here)."""
    torch.manual_seed(0)
    w = torch.randn(256, 576)
    w[:, :4] *= 40
    q = random_hadamard(576, torch.Generator().manual_seed(0)).float()
    args = QuantArgs(num_bits=4, strategy="channel")
    plain = numerics.sqnr_db(w, numerics.fake_quantize(w, args))
    rotated = numerics.sqnr_db(w, numerics.fake_quantize(w @ q, args) @ q.T)
    assert rotated > plain + 5


def test_rotation_is_refused_where_norms_cannot_fold():
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma2", **SMALL, query_pre_attn_scalar=12)
    with pytest.raises(MethodError, match="defined for model types .*llama.*not 'gemma2'.*without --rotate"):
        rotation_family(config, "hadamard")
    with pytest.raises(MethodError, match="unknown rotation 'spin'; use one of: hadamard, orthogonal"):
        rotation_family(AutoConfig.for_model("llama", **SMALL), "spin")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_with_rotation_writes_a_plain_checkpoint_that_keeps_the_function(tmp_path, method):
    """Rotated then quantized to W8A16 (streamed and calibrated paths), decoded by the library: the logits
    stay as close to the float model's as without the rotation, the tied head is stored on its own, and
    the rotated copy made on the way is gone."""
    from transformers import AutoModelForCausalLM

    from exporters.dequantize import dequantized_state_dict
    from quantize.calibration import CalibrationSpec
    from quantize.pipeline import QuantizeOptions, quantize_checkpoint
    from core.schemes import get_scheme
    from tests.unit.tiny import make_tiny_llama_with_tokenizer

    src = make_tiny_llama_with_tokenizer(tmp_path / "src", tie_word_embeddings=True)
    options = QuantizeOptions(calibration=CalibrationSpec(num_samples=4, seq_len=32), rotate="hadamard")
    errors = {}
    for rotate in (None, "hadamard"):
        out = tmp_path / f"out-{rotate}"
        report = quantize_checkpoint(src, get_scheme("w8a16"), method, out, progress=False, log=lambda m: None,
                                     options=QuantizeOptions(calibration=options.calibration, rotate=rotate))
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        model.load_state_dict(dequantized_state_dict(out), strict=False)
        model.tie_weights()
        reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        errors[rotate] = float((_logits(model, ids) - _logits(reference, ids)).abs().max() / _logits(reference, ids).abs().max())
    assert report.rotation["untied_lm_head"] and report.rotation["kind"] == "hadamard"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert errors["hadamard"] < 2 * errors[None], errors  # measured: 0.0057 against 0.0066 (rtn), 0.0082 against 0.0077
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-None", "out-hadamard", "src"]
