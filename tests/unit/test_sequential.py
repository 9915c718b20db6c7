"""Stage-by-stage calibration of a decoder layer: the same inputs and outputs as the layer's own forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from quantize import sequential
from quantize.gptq import gptq_quantize
from core.schemes import QuantArgs
from quantize.sequential import GROUPS, calibrate_staged, staged


def _layer_and_inputs(batches: int = 3):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    positions = torch.arange(16)[None].expand(2, 16)
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(config)(torch.zeros(1), positions), "attention_mask": None,
              "position_ids": positions}
    return config, layer, [(torch.randn(2, 16, 64), kwargs) for _ in range(batches)]


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30], ids=["gate-up-rerun", "down-input-kept"])
def test_staged_passes_record_and_return_what_the_layer_forward_does(keep_bytes, monkeypatch):
    monkeypatch.setattr(sequential, "KEEP_MLP_INPUT_BYTES", keep_bytes)
    config, layer, inputs = _layer_and_inputs()
    assert staged(config, layer)
    expected_out = [layer(h, **kw) for h, kw in inputs]
    expected_in: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: expected_in.setdefault(n, []).append(a[0]))
               for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    for h, kw in inputs:
        layer(h, **kw)
    for handle in handles:
        handle.remove()

    recorded: dict[str, list[torch.Tensor]] = {}
    quantized_after: list[tuple[tuple[str, ...], int]] = []
    shell = SimpleNamespace(inputs=list(inputs), dtype=torch.float32, store_dtype=torch.float32)
    calibrate_staged(layer, shell, lambda n, x: recorded.setdefault(n, []).append(x),
                     lambda group: quantized_after.append((group, sum(map(len, recorded.values())))), propagate=True)

    # each group is quantized once all its inputs, and none of a later group's, are recorded
    assert [g for g, _ in quantized_after] == list(GROUPS)
    assert [seen for _, seen in quantized_after] == [9, 12, 18, 21]
    for name, batches in expected_in.items():
        for got, want in zip(recorded[name], batches):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (got, _), want in zip(shell.inputs, expected_out):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30], ids=["gate-up-rerun", "down-input-kept"])
def test_quantized_down_proj_makes_the_propagated_outputs(keep_bytes, monkeypatch):
    """The next layer's inputs come from the quantized down_proj (here zeroed), whether its inputs were kept
    or gate/up ran again: the outputs are then the attention residual alone."""
    monkeypatch.setattr(sequential, "KEEP_MLP_INPUT_BYTES", keep_bytes)
    _, layer, inputs = _layer_and_inputs(batches=2)
    residual = [h + layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0] for h, kw in inputs]

    def quantize_group(group: tuple[str, ...]) -> None:
        if group == GROUPS[3]:
            layer.mlp.down_proj.weight.data.zero_()

    shell = SimpleNamespace(inputs=list(inputs), dtype=torch.float32, store_dtype=torch.float32)
    with torch.no_grad():
        calibrate_staged(layer, shell, lambda n, x: None, quantize_group, propagate=True)
    for (got, _), want in zip(shell.inputs, residual):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quantized_groups_feed_the_later_stages():
    """Zeroing q/k/v's outputs (v = 0) when they are quantized must show in o_proj's recorded inputs."""
    _, layer, inputs = _layer_and_inputs(batches=1)
    recorded: dict[str, torch.Tensor] = {}

    def quantize_group(group: tuple[str, ...]) -> None:
        if group == GROUPS[0]:
            layer.self_attn.v_proj.weight.data.zero_()

    shell = SimpleNamespace(inputs=list(inputs), dtype=torch.float32, store_dtype=torch.float32)
    calibrate_staged(layer, shell, recorded.__setitem__, quantize_group, propagate=False)
    assert torch.count_nonzero(recorded["self_attn.o_proj"]) == 0


def test_non_llama_layers_take_the_two_pass_path():
    config, layer, _ = _layer_and_inputs(batches=1)
    assert not staged(SimpleNamespace(model_type="gemma"), layer)
    del layer.mlp.down_proj
    assert not staged(config, layer)


def test_stacked_rows_quantize_as_one_by_one():
    """GPTQ treats rows independently given the Hessian: q/k/v stacked give each linear's own result."""
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs
    hessian = 2 * x.T @ x / len(x)
    weights = [torch.randn(rows, 64) for rows in (64, 32, 32)]
    args = QuantArgs(num_bits=4, strategy="group", group_size=16, symmetric=False)
    q, scale, zero, _ = gptq_quantize(torch.cat(weights), hessian, args)
    first = 0
    for w in weights:
        q1, s1, z1, _ = gptq_quantize(w, hessian, args)
        rows = slice(first, first + len(w))
        assert torch.equal(q[rows], q1) and torch.equal(zero[rows], z1)
        torch.testing.assert_close(scale[rows], s1)
        first = rows.stop


def test_smooth_linears_folds_up_proj_into_down_proj_and_keeps_the_layer_function():
    from quantize.folding import LLAMA, apply_transforms
    from quantize.methods import parse_recipe

    _config, layer, inputs = _layer_and_inputs(batches=1)
    hidden, kwargs = inputs[0]
    with torch.no_grad():
        layer.mlp.up_proj.weight[:7] *= 40  # outlier channels at down_proj's input
        seen = {}
        handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
                   for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        before = layer(hidden, **kwargs)
        down_in = seen["mlp.down_proj"].clone()
        stats = SimpleNamespace(absmax={n: x.abs().amax(dim=0) for n, x in seen.items()},
                                samples_of=lambda n: seen[n])
        for handle in handles:
            handle.remove()
        args = {n: QuantArgs(num_bits=8, strategy="channel") for n in seen}
        down_before = layer.mlp.down_proj.weight.clone()
        apply_transforms(layer, LLAMA, stats, parse_recipe("smoothquant"), args, alpha=0.5)
        assert torch.equal(layer.mlp.down_proj.weight, down_before)  # norms only, by default
        apply_transforms(layer, LLAMA, stats, parse_recipe("smoothquant"), args, alpha=0.5, smooth_linears=True)
        after = layer(hidden, **kwargs)
        spread = lambda x: float(x.abs().amax(dim=0).max() / x.abs().amax(dim=0).median())  # noqa: E731
        assert torch.allclose(after, before, atol=1e-4)
        assert spread(stats.absmax["mlp.down_proj"][None]) < spread(down_in) / 3
