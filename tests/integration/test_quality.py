"""End-to-end quality on the real demo model: every calibrated recipe beats RTN of its scheme.

Each recipe quantizes SmolLM2-135M with a small calibration (16 x 256 tokens of the WikiText-2 validation
text, the default file) and is scored by perplexity over a few held-out WikiText-2 test windows, computed
locally with transformers on the decoded weights (float32; for W8A8 the linears' inputs are fake-quantized
per token, as vLLM's dynamic int8 kernels do), not through vLLM. One RTN baseline per scheme is shared.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from core.schemes import get_scheme

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
WINDOWS = 4  # x 2048 held-out tokens
CALIBRATION = dict(num_samples=16, seq_len=256)

# (scheme label, recipe, options): the README's method table
RECIPES = [
    ("w4a16", "gptq", {}), ("w4a16", "awq", {}), ("w4a16", "awq+gptq", {}), ("w4a16", "rtn", {"observer": "mse"}),
    ("w4a16-asym", "gptq", {"actorder": True}), ("w4a16-asym", "awq+gptq", {"actorder": True}),
    ("w8a8", "smoothquant", {}), ("w8a8", "gptq", {}), ("w8a8", "smoothquant+gptq", {}),
]


def _scheme(label: str, observer: str | None = None):
    scheme = get_scheme(label.removesuffix("-asym"))
    weights = replace(scheme.weights, symmetric=not label.endswith("-asym"))
    if observer:
        weights = replace(weights, observer=observer)
    return replace(scheme, weights=weights)


def _perplexity(model_dir: Path, checkpoint: Path, scheme_label: str) -> float:
    """The project's local perplexity (benchmarks/quantize_methods.py) of the checkpoint's decoded weights."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from quantize_methods import perplexity
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return perplexity(model_dir, checkpoint, WINDOWS, act_quant=scheme_label == "w8a8", dtype_name="float32")


def _quantize(model_dir: Path, out: Path, label: str, method: str, options: dict) -> Path:
    from quantize.calibration import CalibrationSpec
    from quantize.gptq import GPTQConfig
    from quantize.pipeline import QuantizeOptions, quantize_checkpoint

    opts = QuantizeOptions(calibration=CalibrationSpec(**CALIBRATION),
                           gptq=GPTQConfig(actorder=options.get("actorder", False)))
    quantize_checkpoint(model_dir, _scheme(label, options.get("observer")), method, out, progress=False,
                        log=lambda m: None, options=opts)
    return out


@pytest.fixture(scope="module")
def rtn_perplexity(demo_model, tmp_path_factory):
    """RTN perplexity per scheme, computed once."""
    cache: dict[str, float] = {}

    def get(label: str) -> float:
        if label not in cache:
            out = _quantize(demo_model, tmp_path_factory.mktemp("rtn") / label, label, "rtn", {})
            cache[label] = _perplexity(demo_model, out, label)
        return cache[label]

    return get


@pytest.mark.parametrize("label, method, options", RECIPES,
                         ids=[f"{s}-{m}{''.join('-' + k for k in o)}" for s, m, o in RECIPES])
def test_calibrated_recipe_has_lower_perplexity_than_rtn(demo_model, rtn_perplexity, tmp_path, label, method,
                                                         options):
    baseline = rtn_perplexity(label)
    ppl = _perplexity(demo_model, _quantize(demo_model, tmp_path / "out", label, method, options), label)
    print(f"\n{label} {method} {options}: ppl {ppl:.3f} vs rtn {baseline:.3f}")
    assert ppl < baseline, (ppl, baseline)
