"""`qserve eval` end to end through the command line (typer's runner, in process) against real HTTP servers on
127.0.0.1 that answer like vLLM with scripted log-probabilities (tests/fake_scorer.py): the figures it prints
and writes (perplexity, baseline deltas, top-1 agreement and KL) are checked against values computed here by
hand from the script, and the files of ``-o``, ``--json`` and ``--markdown`` against what was printed."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from typer.testing import CliRunner

from tests.fake_backend import running_app
from tests.fake_scorer import logprob, make_fake_scorer
from tests.unit.test_accuracy import CharTokenizer

SHIFT = -0.5  # the scorer's "shifted" model scores every token this much below "scorer"
# Every character here has a scripted log-probability low enough that the two returned top log-probabilities
# of a position sum to less than one (code point mod 10 in {4, 6, 7, 8, 9}): the rest-of-vocabulary bucket of
# the KL is then a real probability, so the expected KL below is the textbook one, with no clamping.
TEXT = "track\tblack\tchalk\tmath"
# item 1: " ddd" beats " b" on "scorer" (-0.40 vs -1.10), but the 0.5-per-token shift costs the longer choice
# more, so "shifted" picks " b" (-2.40 vs -2.10): acc 1 vs 0. Item 2: equal lengths, both pick " b".
# acc_norm (per character) picks the right one on both.
MC_ITEMS = [{"question": "Q:", "choices": ["b", "ddd"], "answer": 1},
            {"question": "Q:", "choices": ["b", "c"], "answer": 0}]


def _counted(app: FastAPI, seen: Counter) -> FastAPI:
    """``app`` counting the requests it answers per path, so a test can tell which server was asked."""

    @app.middleware("http")
    async def count(request: Request, call_next):
        seen[request.url.path] += 1
        return await call_next(request)

    return app


@pytest.fixture(scope="module")
def servers():
    """Two separate scripted servers (candidate, baseline): their URLs and request counts."""
    seen_candidate, seen_baseline = Counter(), Counter()
    with running_app(_counted(make_fake_scorer(), seen_candidate)) as candidate, \
            running_app(_counted(make_fake_scorer(), seen_baseline)) as baseline:
        yield {"candidate": candidate, "baseline": baseline, "seen_candidate": seen_candidate,
               "seen_baseline": seen_baseline}


@pytest.fixture()
def tokenizers(monkeypatch) -> list[str]:
    """``--tokenizer chars`` loads a one-token-per-character tokenizer; returns the sources asked for."""
    from accuracy import agreement
    from core import checkpoint

    asked: list[str] = []

    def load(source):
        asked.append(str(source))
        return CharTokenizer()

    monkeypatch.setattr(checkpoint, "load_tokenizer", load)
    monkeypatch.setattr(agreement, "load_tokenizer", load)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return asked


def _invoke(*args: str):
    from qserve.cli import app

    return CliRunner().invoke(app, list(args))


def _scripted_nll(text: str, shift: float = 0.0) -> float:
    """Summed negative log-likelihood the scripted server gives ``text`` (one token per character)."""
    return -sum(logprob(ord(c)) + shift for c in text)


def _expected_mean_kl(text: str, shift: float) -> float:
    """KL(baseline || candidate) per position, averaged: the baseline returns {token: lp, rival}, the candidate
    the same two shifted by ``shift``; the rest of the vocabulary is one bucket on each side."""
    total = 0.0
    for c in text:
        lp = logprob(ord(c))
        rival = lp - 1.0 if ord(c) % 2 == 0 else lp + 0.01  # as tests/fake_scorer.py scripts the runner-up
        mass = math.exp(lp) + math.exp(rival)
        assert mass < 1  # TEXT is chosen so (see above)
        rest, rest_shifted = 1 - mass, 1 - mass * math.exp(shift)
        total += mass * -shift + rest * math.log(rest / rest_shifted)
    return total / len(text)


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    text, tasks = tmp_path / "t.txt", tmp_path / "mc.jsonl"
    text.write_text(TEXT)
    tasks.write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS))
    return text, tasks


def _table(stdout: str) -> str:
    """The Markdown table the command printed: from its header line up to the first ``saved FILE`` line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| task | figure | value |"))
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("saved ")), len(lines))
    return "\n".join(lines[start:end])


def test_eval_with_a_baseline_prints_and_writes_the_scripted_figures(servers, tokenizers, tmp_path):
    text, tasks = _write_inputs(tmp_path)
    json_file, md_file = tmp_path / "r" / "report.json", tmp_path / "r" / "table.md"
    servers["seen_candidate"].clear(), servers["seen_baseline"].clear()
    result = _invoke("eval", servers["candidate"], "--tokenizer", "chars", "--served-model-name", "shifted",
                     "--baseline", servers["baseline"], "--tasks", f"wikitext,{tasks}", "--text-file", str(text),
                     "--seq-len", "8", "--json", str(json_file), "--markdown", str(md_file))
    assert result.exit_code == 0, result.output
    report = json.loads(json_file.read_text())
    n, words, size = len(TEXT), 4, len(TEXT.encode())
    nll_base, nll_cand = _scripted_nll(TEXT), _scripted_nll(TEXT, SHIFT)

    # perplexity is exp(mean NLL) of the scripted log-probabilities, on each server with its own model:
    # catches a wrong window count (a token scored twice or dropped), a wrong mean, or the baseline's figures
    # taken from the candidate (the candidate's are 0.5 nats per token worse)
    cand, base = report["results"]["wikitext"], report["baseline_results"]["wikitext"]
    assert (cand["tokens"], cand["windows"], cand["words"], cand["bytes"]) == (n, math.ceil(n / 7), words, size)
    assert cand["model"] == "shifted" and base["model"] == "scorer"  # the baseline's default: its first model
    assert cand["token_perplexity"] == pytest.approx(math.exp(nll_cand / n))
    assert base["token_perplexity"] == pytest.approx(math.exp(nll_base / n))
    assert cand["word_perplexity"] == pytest.approx(math.exp(nll_cand / words))

    # deltas are candidate minus baseline: the sign and the figures follow from the scripted shift
    deltas = report["deltas"]
    assert deltas["wikitext"]["token_perplexity"] == pytest.approx(math.exp(nll_cand / n) - math.exp(nll_base / n))
    assert deltas["wikitext"]["bits_per_byte"] == pytest.approx(-SHIFT * n / (size * math.log(2)))
    assert report["results"]["mc"]["metrics"]["acc"] == 0.5 and report["baseline_results"]["mc"]["metrics"]["acc"] == 1
    assert deltas["mc"] == pytest.approx({"acc": -0.5, "acc_norm": 0.0})

    # agreement: the shift keeps every ranking (top-1 100 %) but moves the probabilities (KL by hand)
    agreement = report["agreement"]
    assert agreement["positions"] == n and agreement["top1_agreement"] == 1.0
    assert agreement["mean_logprob_delta"] == pytest.approx(SHIFT)
    assert agreement["mean_kl"] == pytest.approx(_expected_mean_kl(TEXT, SHIFT), rel=1e-9)
    assert agreement["mean_kl"] > 0.1  # not a near-zero figure that a KL of the wrong pair could also give

    # each server scored its own side exactly once: 4 perplexity windows, 4 choice continuations, 1 agreement
    # window; catches the baseline's tasks sent to the candidate's URL (identical servers, identical figures)
    scored = math.ceil(n / 7) + sum(len(item["choices"]) for item in MC_ITEMS) + 1
    assert servers["seen_candidate"]["/v1/completions"] == servers["seen_baseline"]["/v1/completions"] == scored
    assert set(tokenizers) == {"chars"}

    # what was printed is what was written: the log lines carry the same figures, the table is the file
    out = result.stdout
    assert f"[shifted] wikitext: token ppl {cand['token_perplexity']:.3f}" in out
    assert f"[scorer] wikitext: token ppl {base['token_perplexity']:.3f}" in out
    assert (f"agreement with the baseline: top-1 100.00%, mean KL {agreement['mean_kl']:.5f} over {n:,} positions"
            in out)
    table = md_file.read_text()
    assert table == _table(out) + "\n"
    assert (f"| wikitext | token_perplexity | {cand['token_perplexity']:.4f} | {base['token_perplexity']:.4f} | "
            f"{deltas['wikitext']['token_perplexity']:+.4f} |") in table
    assert "| mc | acc | 0.5000 | 1.0000 | -0.5000 |" in table
    assert f"top-1 100.00%, mean KL {agreement['mean_kl']:.5f}" in table
    assert f"saved {json_file}" in out and f"saved {md_file}" in out


def test_eval_output_directory_holds_json_and_markdown_matching_the_output(servers, tokenizers, tmp_path):
    text, _ = _write_inputs(tmp_path)
    out_dir = tmp_path / "acc"
    result = _invoke("eval", servers["candidate"], "--tokenizer", "chars", "--served-model-name", "scorer",
                     "--text-file", str(text), "--seq-len", "8", "-o", str(out_dir))
    assert result.exit_code == 0, result.output
    # -o is a directory receiving both reports under their default names (not one file named "acc")
    assert sorted(p.name for p in out_dir.iterdir()) == ["eval.json", "eval.md"]
    report = json.loads((out_dir / "eval.json").read_text())
    ppl = report["results"]["wikitext"]["token_perplexity"]
    assert ppl == pytest.approx(math.exp(_scripted_nll(TEXT) / len(TEXT)))
    # no baseline given: no baseline figures invented
    assert not {"baseline", "baseline_results", "deltas", "agreement"} & report.keys()
    table = (out_dir / "eval.md").read_text()
    assert table == _table(result.stdout) + "\n"
    assert f"| wikitext | token_perplexity | {ppl:.4f} |" in table.splitlines()


def test_a_file_option_takes_its_report_out_of_the_output_directory(servers, tokenizers, tmp_path):
    text, _ = _write_inputs(tmp_path)
    out_dir, json_file = tmp_path / "acc", tmp_path / "elsewhere.json"
    result = _invoke("eval", servers["candidate"], "--tokenizer", "chars", "--text-file", str(text),
                     "--seq-len", "8", "-o", str(out_dir), "--json", str(json_file))
    assert result.exit_code == 0, result.output
    # --json wins for the JSON report; -o still receives the Markdown one (neither dropped nor duplicated)
    assert sorted(p.name for p in out_dir.iterdir()) == ["eval.md"]
    report = json.loads(json_file.read_text())
    assert report["results"]["wikitext"]["model"] == "scorer"  # no --served-model-name: the first served
    assert report["results"]["wikitext"]["nll"] == pytest.approx(_scripted_nll(TEXT))
