"""What a checkpoint directory holds besides quantized weights: weight files, auxiliary files, tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

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
    return files


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
