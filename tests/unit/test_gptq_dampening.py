"""GPTQ says where it had to raise dampening, and a Hessian that never factors is one clear error."""

from __future__ import annotations

import pytest
import torch

from core.schemes import QuantArgs, get_scheme
from quantize.calibration import CalibrationSpec
from quantize.gptq import gptq_quantize
from quantize.methods import MethodError
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
from quantize.stats import Stats

OPTIONS = QuantizeOptions(calibration=CalibrationSpec(num_samples=4, seq_len=32))


def _indefinite(h: torch.Tensor) -> torch.Tensor:
    """``h`` shifted down by 5 % of its mean diagonal: rank-deficient inputs make it indefinite, so dampening
    0.01 does not factor and 0.1 does."""
    return h - 0.05 * torch.diag(h).mean() * torch.eye(h.shape[0])


def test_gptq_raises_dampening_tenfold_until_the_hessian_factors():
    torch.manual_seed(0)
    x = torch.randn(16, 64)  # 16 tokens, 64 inputs: X^T X has rank 16
    _, _, _, damp = gptq_quantize(torch.randn(8, 64), _indefinite(x.T @ x), QuantArgs(num_bits=4, strategy="channel"))
    assert damp == pytest.approx(0.1)


def test_raised_dampening_is_reported_with_the_layers(tiny_with_tokenizer, tmp_path, monkeypatch):
    real = Stats.hessian_of
    monkeypatch.setattr(Stats, "hessian_of", lambda self, name: _indefinite(real(self, name))
                        if name.endswith("down_proj") else real(self, name))
    logs: list[str] = []
    quantize_checkpoint(tiny_with_tokenizer, get_scheme("w8a16"), "gptq", tmp_path / "out", progress=False,
                        log=logs.append, options=OPTIONS)
    raised = [line for line in logs if line.startswith("GPTQ raised dampening")]
    assert len(raised) == 1
    assert "model.layers.0.mlp.down_proj 0.1" in raised[0] and "model.layers.1.mlp.down_proj 0.1" in raised[0]
    assert "q_proj" not in raised[0]


def test_a_hessian_that_never_factors_is_one_line_and_writes_nothing(tiny_with_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(Stats, "hessian_of", lambda self, name: -torch.eye(self.samples[name].shape[1]))
    with pytest.raises(MethodError, match=r"GPTQ cannot use the calibration Hessian of model\.layers\.0\.self_attn"
                                          r"\.q_proj/.*not positive definite.*--dampening.*--method rtn") as err:
        quantize_checkpoint(tiny_with_tokenizer, get_scheme("w8a16"), "gptq", tmp_path / "out", progress=False,
                            log=lambda m: None, options=OPTIONS)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
