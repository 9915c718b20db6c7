"""The model shell layer-by-layer calibration runs in: the embeddings run once over the calibration samples,
and catchers in place of the decoder layers record what each kind of layer receives (hidden states, masks,
rotary tables); the layers themselves stay on the meta device until each is loaded in turn."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from quantize.capture import StopForward
from quantize.kv_cache import use_observing_attention

BATCH = 4  # samples per forward: 8 gave the same speed with ~400 MiB more peak RSS (allocator high water)


def compute_dtype(device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The dtype decoder layers run in: the checkpoint's on GPUs and on CPUs with bf16 matrix units; float32
    on other CPUs, where bf16 matmuls run ~3x slower than float32 (measured on AVX-512 without BF16)."""
    if device.type != "cpu" or checkpoint_dtype == torch.float32:
        return checkpoint_dtype
    cpu = torch.cpu
    fast = getattr(cpu, "_is_amx_tile_supported", lambda: False)() or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return checkpoint_dtype if fast else torch.float32


@dataclass
class Shell:
    """The meta-device model shell, the calibration hidden states (stored in the checkpoint dtype) and
    the keyword arguments its layers take: per kind of layer (``config.layer_types``: Gemma 2/3 alternate
    sliding-window and full attention, with their own masks and, in Gemma 3, their own RoPE tables), per batch."""

    layers: torch.nn.ModuleList
    inputs: list[tuple[torch.Tensor, dict]]
    dtype: torch.dtype
    store_dtype: torch.dtype
    device: torch.device
    kinds: list[str] = field(default_factory=list)  # each layer's kind
    kwargs: dict[str, list[dict]] = field(default_factory=dict)  # kind -> each batch's keyword arguments

    def enter(self, index: int) -> None:
        """Gives the stored batches the keyword arguments layer ``index`` receives in the model."""
        kwargs = self.kwargs[self.kinds[index]]
        self.inputs = [(hidden, kwargs[b]) for b, (hidden, _) in enumerate(self.inputs)]


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer while the embeddings run: hands its call to ``on_call`` and its input on."""

    def __init__(self, index: int, on_call: Callable[[int, torch.Tensor, dict], None]) -> None:
        super().__init__()
        self.index, self.on_call = index, on_call

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.on_call(self.index, hidden, kwargs)
        return hidden


@torch.no_grad()
def catch_inputs(embed: torch.Tensor, config: Any, samples: torch.Tensor, device: torch.device,
                  observe_kv: bool = False) -> Shell:
    """Runs the embeddings over the samples; catchers in place of the first layer of each kind record what
    those layers receive (layer 0 its hidden states too), then the forward stops."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(device, embed.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    base = model.model
    base.embed_tokens.to_empty(device=device)
    # to_empty leaves buffers built in __init__ uninitialised: Gemma's embedding scale (sqrt(hidden)) among them;
    # the model's own initialiser sets them (and a random weight, replaced at once)
    model._init_weights(base.embed_tokens)
    base.embed_tokens.weight.copy_(embed)
    with torch.device(device):  # rotary tables are buffers built in __init__
        base.rotary_emb = type(base.rotary_emb)(config=config)
    layers, count = list(base.layers), len(base.layers)
    kinds = list(getattr(config, "layer_types", None) or ["decoder"] * count)[:count]
    first = {kind: kinds.index(kind) for kind in kinds}
    shell = Shell(base.layers, [], dtype, embed.dtype, device, kinds, {kind: [] for kind in first})
    if observe_kv:
        use_observing_attention(model)

    def record(index: int, hidden: torch.Tensor, kwargs: dict) -> None:  # the real layers never run here
        if index == 0:
            shell.inputs.append((hidden.to(shell.store_dtype), {}))
        if first[kinds[index]] == index:
            shell.kwargs[kinds[index]].append({k: v for k, v in kwargs.items() if k != "past_key_values"})
        if index == max(first.values()):
            raise StopForward

    for i in range(max(first.values()) + 1):
        base.layers[i] = _Catcher(i, record)
    try:
        for batch in samples.split(BATCH):
            with contextlib.suppress(StopForward):
                base(input_ids=batch.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(layers):
            base.layers[i] = layer
    del base.embed_tokens
    return shell
