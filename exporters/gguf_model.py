"""What a GGUF file says about the model besides its tensors: architecture, hyper-parameters, tokenizer.

Architectures are a registry: a Hugging Face ``model_type`` maps to llama.cpp's architecture, whether
the query/key rows are permuted (llama.cpp's ``llama`` graph applies RoPE to interleaved pairs where
Hugging Face rotates halves) and the hyper-parameter keys. Tensor names come from the ``gguf``
library's own name map. Tokenizers are read from the checkpoint directory (byte-level BPE only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from core.models import ModelError


@dataclass(frozen=True)
class GGUFArch:
    """How one Hugging Face model family is written for llama.cpp."""

    gguf_name: str  # the ``gguf.MODEL_ARCH`` member, e.g. "LLAMA"
    permute_qk: bool  # rows of q_proj/k_proj reordered from rotate-half to interleaved RoPE


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LLAMA", permute_qk=True),
    "mistral": GGUFArch("LLAMA", permute_qk=True),
    "qwen2": GGUFArch("QWEN2", permute_qk=False),
    "qwen3": GGUFArch("QWEN3", permute_qk=False),
}


def arch_for(config: dict[str, Any], where: str) -> GGUFArch:
    """The registry entry for the checkpoint's ``model_type``; a clear refusal for the others."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ModelError(f"{where}: model_type {model_type!r} has no GGUF export in qserve yet; supported: "
                         f"{', '.join(sorted(ARCHS))}")
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or (config.get("rope_parameters") or {}).get("rope_type")
    if rope_type not in (None, "default"):
        raise ModelError(f"{where}: rope scaling {rope_type!r} is not written to GGUF by qserve yet; only models "
                         f"with plain RoPE export")
    return ARCHS[model_type]


def rope_theta(config: dict[str, Any]) -> float:
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders the rows of a q/k projection (or of its per-row scales) from Hugging Face's rotate-half RoPE
    layout to the interleaved pairs llama.cpp's llama graph rotates; rows move whole, so integers, scales and
    zero points stay exact."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def write_hparams(writer, config: dict[str, Any], file_type: int) -> None:
    """The architecture's hyper-parameters, as llama.cpp reads them."""
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(file_type)


# Hugging Face pre-tokenizer (the regexes of its Split steps, digits split one by one, byte-level regex on)
# -> llama.cpp's name for the same pre-tokenization (tokenizer.ggml.pre)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS: dict[tuple[tuple[str, ...], bool, bool], str] = {
    ((), False, True): "gpt-2",
    ((), True, True): "smollm",
    ((_LLAMA3_REGEX,), False, False): "llama-bpe",
    ((_QWEN2_REGEX,), False, False): "qwen2",
}


def _pre_tokenizer_key(pre: Optional[dict[str, Any]]) -> tuple[tuple[str, ...], bool, bool]:
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    regexes = tuple(s["pattern"].get("Regex", s["pattern"].get("String", "")) for s in steps if s["type"] == "Split")
    digits = any(s["type"] == "Digits" and s.get("individual_digits") for s in steps)
    byte_regex = any(s["type"] == "ByteLevel" and s.get("use_regex", True) for s in steps)
    return regexes, digits, byte_regex


@dataclass(frozen=True)
class BPETokenizer:
    """A byte-level BPE tokenizer as llama.cpp takes it: pre-tokenizer name, tokens by id and their types."""

    model_dir: Path
    pre: str
    tokens: list[str]
    types: list[int]


def read_tokenizer(model_dir: Path, vocab_size: int) -> BPETokenizer:
    """The checkpoint's ``tokenizer.json`` as llama.cpp takes it; a clear refusal for what it cannot take."""
    import gguf

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{model_dir} has no tokenizer.json: a GGUF carries the tokenizer, so copy the model's "
                         f"tokenizer files into the checkpoint directory and export again")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(data):
        raise ModelError(f"{path}: a {model.get('type')} tokenizer; qserve writes byte-level BPE tokenizers to GGUF "
                         f"(Llama 3, Qwen2/3, SmolLM), not SentencePiece ones yet")
    pre = PRE_TOKENIZERS.get(_pre_tokenizer_key(data.get("pre_tokenizer")))
    if pre is None:
        raise ModelError(f"{path}: its pre-tokenizer matches none llama.cpp names in qserve's table "
                         f"({', '.join(sorted(PRE_TOKENIZERS.values()))}); llama.cpp would split text differently")
    tokens = [""] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i, text in enumerate(tokens):
        if not text:
            tokens[i] = f"[PAD{i}]"
    return BPETokenizer(Path(model_dir), pre, tokens, [int(t) for t in types])


def write_tokenizer(writer, tokenizer: BPETokenizer) -> None:
    """Vocabulary, merges, special tokens and chat template (the last three read by ``gguf.SpecialVocab``)."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.types)
    gguf.SpecialVocab(tokenizer.model_dir, load_merges=True, n_vocab=len(tokenizer.tokens)).add_to_gguf(writer, quiet=True)


def _is_byte_level(data: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))
