"""KV-cache methods no engine serves, measured in transformers and labelled so: ``simulated_kv_perplexity``.

The checkpoint's weights are decoded (quantized linears dequantized as the engine would compute with
them); activations stay in float32. Each method's rows say "simulated, not served", so that they are never
read beside served figures as if an engine had produced them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from core.models import ModelError
from quantize.methods import MethodError

SIMULATED = "simulated, not served (transformers)"


def _load_decoded(checkpoint: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from exporters.dequantize import dequantized_state_dict

    config = AutoConfig.from_pretrained(checkpoint)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are decoded here, not run by a quantized kernel
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, _ = model.load_state_dict(dequantized_state_dict(checkpoint, torch.float32), strict=False)
    if any("lm_head" not in name for name in missing):
        raise ModelError(f"{checkpoint}: weights missing from the checkpoint: {missing[:3]}")
    model.tie_weights()
    return model


def simulated_kv_perplexity(checkpoint: Path, methods: list[str], seq_len: int = 2048, max_windows: int = 20,
                            log: Callable[[str], None] = print, text: Optional[Path] = None) -> list[dict]:
    """WikiText-2 test perplexity (or ``text``'s) with the bf16 cache and with each simulated KV method."""
    from transformers import AutoTokenizer

    from accuracy.scoring import disjoint_windows, windows_perplexity
    from accuracy.simulated_kv import SIMULATED_KV, pre_rope_problem, use_simulated_kv
    from core.data import data_file

    unknown = [m for m in methods if m not in SIMULATED_KV]
    if unknown:
        raise MethodError(f"unknown simulated KV method {unknown[0]!r}; use one of: {', '.join(SIMULATED_KV)}")
    model = _load_decoded(Path(checkpoint))
    problem = pre_rope_problem(model) if any(SIMULATED_KV[m].pre_rope for m in methods) else None
    if problem:  # before the baseline is scored
        raise MethodError(f"{checkpoint}: {problem}")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer((text or data_file("wikitext2-test.raw")).read_text(encoding="utf-8"),
                    add_special_tokens=False)["input_ids"]
    windows = list(disjoint_windows(ids, seq_len, max_windows))
    rows = []
    for method in ["bf16", *methods]:
        if method != "bf16":
            use_simulated_kv(model, method)
        perplexity, count = windows_perplexity(model, windows)
        rows.append({"kv_cache": method, "perplexity": perplexity, "tokens": count, "how": SIMULATED})
        log(f"{method}: perplexity {rows[-1]['perplexity']:.3f} ({SIMULATED})")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| KV cache | perplexity | tokens | how |", "|---|---|---|---|"]
    lines += [f"| {r['kv_cache']} | {r['perplexity']:.3f} | {r['tokens']:,} | {r['how']} |" for r in rows]
    return "\n".join(lines)
