"""Tiny random Llama checkpoints for pipeline tests (seconds to build, no hub)."""

from __future__ import annotations

import torch


def make_tiny_llama(path, hidden=128, intermediate=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _add_tokenizer(path, vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained on the shared text, saved beside the tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from core.data import data_file

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([data_file("wikitext2-valid.tokens").read_text(encoding="utf-8")[:100_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def make_tiny_llama_with_tokenizer(path, tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=300, tie_word_embeddings=tie_word_embeddings)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    _add_tokenizer(path)
    return path


def make_tiny_sliding_window_model():
    """A random Gemma 3 text model (float32) whose layers attend within a 4-token sliding window, with 12
    token ids to run it on: longer than the window, so a lost mask changes the logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  sliding_window=4, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    return model, torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))


# Tiny Mixture-of-Experts models from the real configurations' shapes, scaled down (no hub): every field that
# picks a code path (top-k, shared experts, norm_topk_prob, q/k norms) as the released models set it.
MOE_CONFIGS = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                      head_dim=16, norm_topk_prob=True),  # Qwen3-30B-A3B: 128 experts, top-8
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),  # Mixtral-8x7B: top-2
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                      shared_expert_intermediate_size=64),  # Qwen1.5-MoE-A2.7B: 60 experts, top-4, shared
}


FAMILY_CONFIGS = {  # what the released models set where it picks a code path
    "qwen3": {}, "phi3": {}, "mistral": dict(sliding_window=16),
    # no staged or folding rules in qserve: the generic path (each layer run twice) for RTN and GPTQ
    "olmo2": {},  # norms after attention and MLP
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078),
    "gemma2": dict(query_pre_attn_scalar=16, sliding_window=16, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, tie_word_embeddings=True),
    "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=16, tie_word_embeddings=True),
    **MOE_CONFIGS,
}


def make_tiny_family(path, model_type: str, layers: int = 2, dtype=torch.bfloat16, tokenizer_from=None, **fields):
    """A random ``model_type`` checkpoint (hidden 64, head size 16) with a small BPE tokenizer (or the tokenizer
    of the model directory ``tokenizer_from``, its vocabulary size with it), saved as transformers saves the
    released checkpoints (MoE experts as per-expert tensors)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=300, tie_word_embeddings=False, pad_token_id=0)
    if tokenizer_from is not None:
        base["vocab_size"] = len(AutoTokenizer.from_pretrained(tokenizer_from))
    config = AutoConfig.for_model(model_type, **{**base, **FAMILY_CONFIGS[model_type], **fields})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(path)
    if tokenizer_from is None:
        _add_tokenizer(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if tokenizer_from is not None and (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, path / name)
    return path


def make_tiny_moe(path, model_type: str, layers: int = 2, dtype=torch.bfloat16, **fields):
    """A random ``model_type`` MoE checkpoint (hidden 64, 8 experts, top-2): ``make_tiny_family``."""
    return make_tiny_family(path, model_type, layers, dtype, **fields)
