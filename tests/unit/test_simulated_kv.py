"""Simulated KIVI cache: the group round trip equals hand-computed values, keys group along tokens and values
along channels, and a query reads only positions older than the residual window quantized."""

from __future__ import annotations

import pytest
import torch

from accuracy import simulated_kv
from accuracy.simulated_kv import KIVI, fake_quant_groups, kivi_cache, use_simulated_kv


def test_group_round_trip_equals_a_hand_computed_case():
    x = torch.tensor([[0.0, 0.4, 1.0, 3.0], [10.0, 10.0, 10.0, 16.0]])
    # 2 bits, one group of 4: [0, 3] in steps of 1 -> 0, 0, 1, 3; [10, 16] in steps of 2 -> 10, 10, 10, 16
    assert torch.equal(fake_quant_groups(x, 2, dim=1, group=4), torch.tensor([[0.0, 0.0, 1.0, 3.0],
                                                                              [10.0, 10.0, 10.0, 16.0]]))
    # 1 bit, groups of 2: each pair keeps its own min and max
    assert torch.equal(fake_quant_groups(x, 1, dim=1, group=2), torch.tensor([[0.0, 0.4, 1.0, 3.0],
                                                                              [10.0, 10.0, 10.0, 16.0]]))


def test_keys_group_along_tokens_and_values_along_channels():
    t = torch.zeros(1, 1, 6, 4)  # [batch, heads, tokens, channels]
    t[0, 0, 1, 0], t[0, 0, 1, 2], t[0, 0, 2, 0] = 100.0, 10.0, 10.0
    key, value = kivi_cache(t, t, KIVI("k", bits=2, group=3))
    # keys: channel 0 over tokens 0-2 is [0, 100, 10], and 10 falls to 0 on its 2-bit grid; channel 2's
    # [0, 10, 0] is exact. values: token 1 over channels 0-2 is [100, 0, 10], and 10 falls; token 2 is exact
    assert (key != t).nonzero()[:, 2:].tolist() == [[2, 0]]
    assert (value != t).nonzero()[:, 2:].tolist() == [[1, 2]]


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).eval()


def _reference_and_simulated(model, ids, method: KIVI, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits with sdpa, then through the simulated cache of ``method``."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(ids).logits
        monkeypatch.setitem(simulated_kv.SIMULATED_KV, method.name, method)
        use_simulated_kv(model, method.name)
        return reference, model(ids).logits


def test_a_query_reads_full_precision_within_the_residual_window(tiny_model, monkeypatch):
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    reference, simulated = _reference_and_simulated(tiny_model, ids, KIVI("test2", bits=2, group=8, residual=16),
                                                    monkeypatch)
    error = (simulated - reference).abs().amax(dim=-1)[0]
    # positions 0..15 see only the 16-token window; later ones read 2-bit keys and values from further back
    assert error[:16].max() < 1e-4 and error[16:].min() > 1e-3, error


def test_a_sliding_window_model_keeps_its_window(monkeypatch):
    """Gemma 3 attends within a sliding window on some layers: with a window covering everything in full
    precision, the simulated cache computes what sdpa does (the model's mask is kept)."""
    from tests.unit.tiny import make_tiny_sliding_window_model

    model, ids = make_tiny_sliding_window_model()
    reference, simulated = _reference_and_simulated(model, ids, KIVI("wide", bits=2, group=8, residual=64), monkeypatch)
    assert (simulated - reference).abs().max() < 1e-4


def test_simulate_kv_command_labels_every_row(tmp_path):
    """`qserve simulate-kv` on a quantized checkpoint: a bf16-cache row and one per method, each labelled
    simulated; with a window covering every position in full precision the figure equals the bf16 cache's
    (KIVI's 128-token window leaves 128 positions of each 256-token window reading the 2-bit cache)."""
    import json

    from typer.testing import CliRunner

    from core.schemes import get_scheme
    from qserve.cli import app
    from quantize.pipeline import quantize_checkpoint
    from tests.unit.tiny import make_tiny_llama_with_tokenizer

    src = make_tiny_llama_with_tokenizer(tmp_path / "src")
    quantize_checkpoint(src, get_scheme("w4a16"), "rtn", tmp_path / "q", progress=False, log=lambda m: None)
    simulated_kv.SIMULATED_KV["wide"] = KIVI("wide", bits=2, group=8, residual=4096)
    try:
        result = CliRunner().invoke(app, ["simulate-kv", str(tmp_path / "q"), "--method", "kivi2", "--method", "wide",
                                          "--seq-len", "256", "--max-windows", "2", "--json", str(tmp_path / "r.json")])
    finally:
        del simulated_kv.SIMULATED_KV["wide"]
    assert result.exit_code == 0, result.output
    rows = {r["kv_cache"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert list(rows) == ["bf16", "kivi2", "wide"] and all(r["how"].startswith("simulated, not served") for r in rows.values())
    assert rows["wide"]["perplexity"] == pytest.approx(rows["bf16"]["perplexity"], rel=1e-4)
    assert rows["kivi2"]["perplexity"] != pytest.approx(rows["bf16"]["perplexity"], rel=1e-4)
    assert "| kivi2 |" in result.output and "simulated, not served" in result.output


def test_simulate_kv_refuses_an_unknown_method_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from qserve.cli import app

    result = CliRunner().invoke(app, ["simulate-kv", str(tmp_path), "--method", "kivi3"])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: unknown simulated KV method 'kivi3'; use one of: kivi4, kivi2, prerope4, "
                                     "prerope2")


def _rope(positions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(positions)[:, None] * (10000.0 ** (-torch.arange(0, dim, 2) / dim))[None, :]
    angles = torch.cat([angles, angles], dim=-1)[None]  # [1, seq, dim], the halves as transformers lays them
    return angles.cos(), angles.sin()


def test_pre_rope_keys_are_quantized_before_their_rotation():
    """Pre-RoPE keys constant along tokens in each channel sit exactly on any per-channel grid: quantized
    before RoPE they come back exactly (to float error); quantized after RoPE, which varies them along the
    tokens, they do not. A wrong inverse rotation would lose the first property."""
    cos, sin = _rope(8, 4)
    pre = torch.tensor([3.0, -1.0, 0.5, 2.0]).expand(1, 1, 8, 4)
    rotated = pre * cos[:, None] + simulated_kv._rotate_half(pre) * sin[:, None]
    method = KIVI("p", bits=2, group=8, residual=8, pre_rope=True)
    key_pre_q, _ = kivi_cache(rotated, rotated, method, (cos, sin))
    key_post_q, _ = kivi_cache(rotated, rotated, method)
    assert (key_pre_q - rotated).abs().max() < 1e-5
    assert (key_post_q - rotated).abs().max() > 0.1


def test_pre_rope_runs_on_a_model_through_its_rotary_embedding(tiny_model, monkeypatch):
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    method = KIVI("pre2", bits=2, group=8, residual=16, pre_rope=True)
    reference, pre = _reference_and_simulated(tiny_model, ids, method, monkeypatch)
    _, post = _reference_and_simulated(tiny_model, ids, KIVI("post2", bits=2, group=8, residual=16), monkeypatch)
    error = (pre - reference).abs().amax(dim=-1)[0]
    assert error[:16].max() < 1e-4 and error[16:].min() > 1e-4  # the same window; another cache further back
    assert not torch.allclose(pre, post)


def test_pre_rope_quantization_equals_quantizing_the_models_own_pre_rope_keys(tiny_model):
    """With the cos/sin the model's rotary embedding returns and its k_proj output: quantizing the post-RoPE
    keys `pre_rope` gives RoPE(quantize(k_proj output)), as transformers applies RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured = {}
    hooks = [tiny_model.model.rotary_emb.register_forward_hook(lambda _m, _a, out: captured.setdefault("rope", out)),
             tiny_model.model.layers[0].self_attn.k_proj.register_forward_hook(
                 lambda _m, _a, out: captured.setdefault("k", out))]
    tiny_model.set_attn_implementation("sdpa")
    with torch.no_grad():
        tiny_model(torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(3)))
    for hook in hooks:
        hook.remove()
    cos, sin = captured["rope"]
    k = captured["k"].view(1, 24, -1, tiny_model.config.head_dim).transpose(1, 2)
    _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    method = KIVI("p", bits=3, group=8, residual=8, pre_rope=True)
    expected, _ = apply_rotary_pos_emb(fake_quant_groups(k, 3, dim=2, group=8), k, cos, sin)
    got, _ = kivi_cache(k_rot, k_rot, method, (cos, sin))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(kivi_cache(k_rot, k_rot, KIVI("q", bits=3, group=8, residual=8))[0], expected, atol=1e-3)
