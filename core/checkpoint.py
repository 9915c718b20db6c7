"""What a checkpoint directory holds besides quantized weights: weight files, auxiliary files, tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from core.client import EndpointError
from core.models import ModelError

if TYPE_CHECKING:  # torch loads in the functions that read tensors, not on import
    import torch

# Files a checkpoint carries besides its weights and config, copied as they are.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json")


def qserve_version() -> str:
    """The installed qserve version ("unknown" when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qserve")
    except PackageNotFoundError:
        return "unknown"


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, sorted; a clear error when there are none."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} has no .safetensors weights; convert the checkpoint to safetensors first")
    for path in files:
        check_safetensors(path)
    return files


def check_safetensors(path: Path) -> None:
    """A clear error, before any heavy work, for a weight file that is truncated or corrupt: the safetensors
    library checks that its header parses and that its tensors' byte ranges cover the file exactly."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); it is truncated "
                         f"or corrupt: download or convert it again") from None


def check_weights_fit_config(model: "torch.nn.Module", shapes: dict[str, list[int]], model_dir: Path) -> None:
    """A clear error when ``config.json`` does not describe the weights beside it (``model``: built from the
    config on the meta device; ``shapes``: the weight files' tensor shapes): another number of decoder layers,
    or a tensor of another shape. Names the model and its checkpoint both use are compared; transformers may
    rename others on loading (GPT-NeoX's ``embed_out`` is its ``lm_head``)."""
    expected = {name: list(p.shape) for name, p in model.named_parameters()}
    wrong = [f"{n} is {shapes[n]} in the weights, {expected[n]} by the config" for n in expected
             if n in shapes and shapes[n] != expected[n]]
    layers_by_config, layers_in_weights = _layer_counts(expected), _layer_counts(shapes)
    for stack in sorted(set(layers_by_config) & set(layers_in_weights)):
        if layers_by_config[stack] != layers_in_weights[stack]:
            wrong.insert(0, f"it gives {stack} {layers_by_config[stack]} layers, the weights hold "
                            f"{layers_in_weights[stack]}")
    if wrong:
        raise ModelError(f"{model_dir}/config.json does not match its weights: {wrong[0]}; use the config.json "
                         f"the weights were saved with")


def _layer_counts(names: Iterable[str]) -> dict[str, int]:
    """``stack -> layers`` for the numbered stacks among tensor names (``model.layers`` -> 1 + highest index)."""
    counts: dict[str, int] = {}
    for name in names:
        found = re.match(r"(.*?\.layers)\.(\d+)\.", name)
        if found:
            counts[found.group(1)] = max(counts.get(found.group(1), 0), int(found.group(2)) + 1)
    return counts


def load_tokenizer(source: str):
    """The tokenizer of a checkpoint directory (or hub id), with one message for every loader failure."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - many loader errors, one message
        raise EndpointError(f"cannot load a tokenizer from {source!r} ({type(exc).__name__}); "
                            f"pass --tokenizer with the model's checkpoint directory") from None


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the files, one at a time (nothing else held in memory)."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def layer_loader(files: list[Path], layer_prefix: str = "model.layers.") -> Callable[[int], dict[str, torch.Tensor]]:
    """``load(i)``: the tensors of decoder layer ``i`` read from disk; ``load(-1)``: everything outside the layers."""
    from safetensors import safe_open

    def load(index: int) -> dict[str, torch.Tensor]:
        prefix = f"{layer_prefix}{index}."
        out = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    inside = key.startswith(layer_prefix)
                    if (index < 0 and not inside) or (index >= 0 and key.startswith(prefix)):
                        out[key] = f.get_tensor(key)
        return out

    return load
