"""The layer-by-layer calibration replays each family's float model exactly: the hidden states it hands from
layer to layer (inputs, masks, position embeddings per kind of layer) are transformers' own. Gemma 3's
sliding-window layers take their own RoPE table and mask; replaying a full-attention layer with the first
layer's arguments (what a single catcher at layer 0 records) fails here."""

from __future__ import annotations

import pytest
import torch

from core.schemes import get_scheme
from quantize import layerwise
from quantize import shell as shell_module
from quantize.methods import parse_recipe
from quantize.moe import moe_family

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=128, num_hidden_layers=3)
FAMILIES = {  # real configurations' code paths at small widths
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen3": {},  # q/k norms inside attention
    "phi3": dict(pad_token_id=0),  # fused qkv_proj and gate_up_proj
    "gemma2": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        query_pre_attn_scalar=16, rope_local_base_freq=10.0),  # local RoPE far from global
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmo2": {},  # not in qserve's tables: the generic two-pass path
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078),
}


def _replayed_hidden_states(model_type: str, tmp_path) -> tuple[list[torch.Tensor], tuple, torch.nn.Module]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.checkpoint import layer_loader, weight_files

    config = AutoConfig.for_model(model_type, **{**SMALL, **FAMILIES[model_type]}, initializer_range=0.1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(0))  # longer than the window
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
    config = model.config
    load = layer_loader(weight_files(tmp_path))
    shell = shell_module.catch_inputs(load(-1)["model.embed_tokens.weight"], config, ids, torch.device("cpu"))
    shell.dtype = shell.store_dtype = torch.float32
    plan = layerwise._Plan(config, get_scheme("w4a16", 16), parse_recipe("gptq"), lambda _: False, None, None, False,
                           torch.device("cpu"), None, moe_family(config))
    got = []
    for index in range(config.num_hidden_layers):
        layerwise._LayerJob(plan, shell, index, load(index)).quantize(propagate=True)
        got.append(torch.cat([h for h, _ in shell.inputs]))
    return got, expected, model


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_layer_by_layer_replay_gives_transformers_hidden_states(model_type, tmp_path):
    got, expected, model = _replayed_hidden_states(model_type, tmp_path)
    with torch.no_grad():
        got[-1] = model.model.norm(got[-1])  # transformers' last hidden state is after the final norm
    for index, (ours, theirs) in enumerate(zip(got, expected[1:])):
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (index, (ours - theirs).abs().max())


def test_a_gemma3_full_attention_layer_replayed_with_the_sliding_layers_arguments_differs(tmp_path, monkeypatch):
    """The control for the test above: with every layer handed layer 0's arguments, layer 1 (full attention,
    global RoPE) comes out different."""
    enter = shell_module.Shell.enter
    monkeypatch.setattr(shell_module.Shell, "enter", lambda shell, index: enter(shell, 0))
    got, expected, _ = _replayed_hidden_states("gemma3_text", tmp_path)
    assert torch.allclose(got[0], expected[1], atol=1e-4, rtol=1e-4)
    assert (got[1] - expected[2]).abs().max() > 0.01
