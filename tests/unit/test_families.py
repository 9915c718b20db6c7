"""Each supported family, as a tiny random model from its real configuration: RTN, GPTQ and (where the family's
folding rules exist) AWQ quantize every linear the engines expect quantized, and the compressed-tensors
library decodes each stored weight to what qserve's own decoder gives."""

from __future__ import annotations

import json

import pytest
import torch

from core.schemes import get_scheme, matches
from exporters.dequantize import dequantized_state_dict
from quantize.calibration import CalibrationSpec
from quantize.folding import FAMILIES
from quantize.moe import expert_linears
from quantize.pipeline import QuantizeOptions, meta_model, quantize_checkpoint
from tests.unit.test_stored_numerics import _library_weights
from tests.unit.tiny import FAMILY_CONFIGS, make_tiny_family

TYPES = ["qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "olmo2", "granite"]
CASES = [(t, m) for t in TYPES for m in ("rtn", "gptq")] + [(t, "awq+gptq") for t in TYPES if t in FAMILIES]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {t: make_tiny_family(root / t, t) for t in TYPES}


@pytest.mark.parametrize("model_type, method", CASES)
def test_family_quantizes_every_linear_and_the_library_decodes_it(tiny_models, tmp_path, model_type, method):
    src, out = tiny_models[model_type], tmp_path / "q"
    scheme = get_scheme("w4a16", 16)
    quantize_checkpoint(src, scheme, method, out, progress=False, log=lambda _: None,
                        options=QuantizeOptions(calibration=CalibrationSpec(num_samples=8, seq_len=64)))
    model = meta_model(src)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not matches(n, tuple(ignore))}
    expected |= set(expert_linears(model))
    theirs = _library_weights(out)
    assert set(theirs) == expected and len(expected) >= 8  # 4 per layer at least (Phi-3 fuses), experts beside
    ours = dequantized_state_dict(out)
    for name, weight in theirs.items():
        assert torch.equal(weight, ours[f"{name}.weight"].to(weight.dtype)), name  # the library decodes to bf16
    assert "lm_head" in ignore and not any("norm" in n for n in expected)


def test_the_family_table_covers_the_families_tested():
    assert set(TYPES) <= set(FAMILY_CONFIGS)


def test_a_model_without_replayable_layers_is_refused_for_calibration_before_any_work(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantize.methods import MethodError

    config = AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "neox")  # layers at gpt_neox.layers
    with pytest.raises(MethodError, match=r"model\.layers\.N.*--method rtn"):
        quantize_checkpoint(tmp_path / "neox", get_scheme("w4a16", 16), "gptq", tmp_path / "q", progress=False,
                            log=lambda _: None)
    assert not (tmp_path / "q").exists()
    quantize_checkpoint(tmp_path / "neox", get_scheme("w4a16", 16), "rtn", tmp_path / "q", progress=False,
                        log=lambda _: None)
    assert len(_library_weights(tmp_path / "q")) == 2 * 4  # RTN streams any architecture's linears
