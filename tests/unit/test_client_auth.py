"""The clients (eval, loadtest, the lm-eval bridge) against a gateway with keys on: without a key, one clear
error naming --api-key and OPENAI_API_KEY; with it, success; the key itself nowhere in what they print or
write."""

from __future__ import annotations

import json
import re
import textwrap

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from accuracy.runner import Endpoint, EvalSettings, evaluate_endpoint
from core.client import EndpointError
from loadtest.profiles import Concurrency
from loadtest.runner import LoadSettings, run_loadtest
from loadtest.workloads import LengthDist
from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from serving.keys import KeyRing
from tests.fake_backend import running_app, running_fake_engine
from tests.fake_scorer import make_fake_scorer
from tests.scripted_server import Script, make_scripted_server
from tests.unit.test_accuracy import CharTokenizer

KEY = "sk-qs-test-9f3c2a7e5b1d"


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture(autouse=True)
def char_tokenizer(monkeypatch):
    from accuracy import agreement
    from core import checkpoint

    monkeypatch.setattr(checkpoint, "load_tokenizer", lambda source: CharTokenizer())
    monkeypatch.setattr(agreement, "load_tokenizer", lambda source: CharTokenizer())


@pytest.fixture(scope="module")
def gateway():
    """qserve's gateway with one key, in front of the fake engine (``fake``, served first) and the scripted
    scorer (``scorer``)."""
    with running_app(make_fake_scorer()) as scorer, running_fake_engine() as engine:
        backends = [Backend.external("fake", engine), Backend.external("scorer", scorer)]
        settings = GatewaySettings(backends=backends, keys=KeyRing.load(None, env={"QSERVE_API_KEY": KEY}),
                                   log=lambda m: None)
        with running_app(build_app(settings)) as url:
            yield url


def strict(app):
    """``app`` refusing every route (model list and metrics too) without the key, echoing a wrong key back as
    some hosted APIs do."""

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if given != KEY:
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {given}", "type": "auth",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        return await call_next(request)

    return app


def _eval_settings(url, tmp_path, key=None, **kw) -> EvalSettings:
    text = tmp_path / "t.txt"
    text.write_text("keys keep the gateway closed to strangers")
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "Q:", "choices": ["b", "c"], "answer": 0}) + "\n")
    return EvalSettings(Endpoint(url, "scorer", key), "chars", ("wikitext", str(mc), "gsm8k"), text_file=text,
                        seq_len=8, limit=1, progress=False, **kw)


def _one_line_naming_both(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "--api-key" in message and "OPENAI_API_KEY" in message, message
    return message


# --- eval -------------------------------------------------------------------------------------------------

def test_eval_needs_the_key_and_keeps_it_out_of_the_report(gateway, tmp_path, monkeypatch):
    with pytest.raises(EndpointError) as refused:
        evaluate_endpoint(_eval_settings(gateway, tmp_path), log=lambda m: None)
    assert "requires an API key" in _one_line_naming_both(refused)
    with pytest.raises(EndpointError, match="refused the API key") as wrong:
        evaluate_endpoint(_eval_settings(gateway, tmp_path, "sk-wrong"), log=lambda m: None)
    assert "sk-wrong" not in str(wrong.value)

    logged: list[str] = []
    baseline = Endpoint(gateway, "scorer")  # no key of its own: the candidate's
    report = evaluate_endpoint(_eval_settings(gateway, tmp_path, KEY, baseline=baseline), log=logged.append)
    assert report["results"]["gsm8k"]["metrics"]["exact_match"] == 1.0  # the chat route, keyed
    assert report["agreement"]["top1_agreement"] == 1.0 and report["results"]["wikitext"]["tokens"] > 0
    assert KEY not in json.dumps(report) + "\n".join(logged)
    assert report["endpoint"] == {"url": gateway, "model": "scorer"}

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # read as the OpenAI SDK reads it
    assert evaluate_endpoint(_eval_settings(gateway, tmp_path), log=lambda m: None)["results"]["wikitext"]


def test_eval_sends_the_key_on_every_route_and_masks_an_echoed_one(tmp_path):
    from accuracy.perplexity import endpoint_perplexity

    text = tmp_path / "t.txt"
    text.write_text("every request carries the key")
    with running_app(strict(make_fake_scorer())) as url:
        result = endpoint_perplexity(url, text, CharTokenizer(), "scorer", seq_len=8, progress=False, api_key=KEY)
        assert result["tokens"] == len(text.read_text())
        with pytest.raises(EndpointError) as echoed:
            endpoint_perplexity(url, text, CharTokenizer(), "scorer", progress=False, api_key="sk-echoed-1234")
    assert "sk-echoed-1234" not in str(echoed.value) and "***" in str(echoed.value)


# --- loadtest ---------------------------------------------------------------------------------------------

def _load(**overrides) -> LoadSettings:
    base = dict(profiles=(Concurrency(2),), input_len=LengthDist("fixed", 8), output_len=LengthDist("fixed", 2),
                num_requests=4, prefill_requests=2, warmup=0, cooldown=0)
    return LoadSettings(**{**base, **overrides})


def _refused_count(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(n) for n in re.findall(r'qserve_requests_total\{[^}]*model="fake"[^}]*status="401"[^}]*\} (\S+)',
                                            text))


def test_loadtest_needs_the_key_stops_at_the_first_refusal_and_keeps_it_out_of_the_report(gateway):
    before = _refused_count(gateway)
    with pytest.raises(EndpointError) as refused:
        run_loadtest(gateway, "fake", _load(num_requests=1000, warmup_requests=0, prefill_requests=0),
                     log=lambda m: None, progress=False)
    _one_line_naming_both(refused)
    assert _refused_count(gateway) - before <= 4  # the run stopped, it did not send its 1,000 requests

    logged: list[str] = []
    report = run_loadtest(gateway, "fake", _load(), log=logged.append, progress=False, api_key=KEY)
    run = report["runs"][0]
    assert run["errors"]["count"] == 0 and run["requests"]["ok"] == 4 and report["prefill"] is not None
    assert KEY not in json.dumps(report) + "\n".join(logged)


def test_loadtest_sends_the_key_on_every_route_and_masks_an_echoed_one():
    with running_app(strict(make_scripted_server(Script(ttft_s=0.01, itl_s=0.001)))) as url:
        with pytest.raises(EndpointError, match="requires an API key"):  # the model list needs it here
            run_loadtest(url, None, _load(), log=lambda m: None, progress=False)
        with pytest.raises(EndpointError) as echoed:
            run_loadtest(url, None, _load(), log=lambda m: None, progress=False, api_key="sk-echoed-1234")
        assert "sk-echoed-1234" not in str(echoed.value) and "***" in str(echoed.value)
        run = run_loadtest(url, None, _load(), log=lambda m: None, progress=False, api_key=KEY)["runs"][0]
    assert run["errors"]["count"] == 0
    assert run["server"] is not None and run["server"]["engine_output_tokens"] == 8  # /metrics scraped with the key


# --- the lm-eval bridge -------------------------------------------------------------------------------------

STUB = textwrap.dedent("""
    # stands in for lm-evaluation-harness: scores one request the way local-completions sends it
    import json, os, sys, urllib.request
    args = dict(a.split("=", 1) for a in sys.argv[sys.argv.index("--model_args") + 1].split(","))
    key = os.environ.get("OPENAI_API_KEY", "")
    if key and key in " ".join(sys.argv):
        sys.exit(4)  # a command line is visible to every user of the machine
    body = json.dumps({"model": args["model"], "prompt": "hi", "max_tokens": 1}).encode()
    request = urllib.request.Request(args["base_url"], body, {"Authorization": f"Bearer {key}",
                                                              "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30)
    except Exception:
        sys.exit(3)
""")


def test_lm_eval_bridge_passes_the_key_in_the_environment(gateway, tmp_path, monkeypatch):
    from accuracy.harness import run_lm_eval

    (tmp_path / "lm_eval").mkdir()
    (tmp_path / "lm_eval" / "__init__.py").write_text("")
    (tmp_path / "lm_eval" / "__main__.py").write_text(STUB)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(EndpointError) as refused:  # found before the harness starts
        run_lm_eval(gateway, "fake", "chars", "arc_easy")
    _one_line_naming_both(refused)
    assert run_lm_eval(gateway, "fake", "chars", "arc_easy", api_key=KEY) == 0
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert run_lm_eval(gateway, None, "chars", "arc_easy") == 0


# --- the commands -----------------------------------------------------------------------------------------

def _invoke(*args: str, env: dict | None = None):
    from qserve.cli import app

    return CliRunner().invoke(app, list(args), env=env)


def test_eval_command_with_and_without_the_key(gateway, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the command line reads the key from the environment")
    args = ("eval", gateway, "--tokenizer", "chars", "--served-model-name", "scorer", "--text-file", str(text),
            "--seq-len", "8")
    result = _invoke(*args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--api-key" in lines[0], result.stderr
    result = _invoke(*args, "-o", str(tmp_path / "out"), env={"OPENAI_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    written = (tmp_path / "out" / "eval.json").read_text() + (tmp_path / "out" / "eval.md").read_text()
    assert "token_perplexity" in written and KEY not in written + result.output
    result = _invoke(*args, "--api-key", KEY, "--json", str(tmp_path / "e.json"))
    assert result.exit_code == 0 and KEY not in result.output + (tmp_path / "e.json").read_text()


def test_loadtest_command_with_and_without_the_key(gateway, tmp_path):
    args = ("loadtest", gateway, "--served-model-name", "fake", "--num-requests", "2", "--prefill-requests", "0",
            "--input-len", "8", "--output-len", "2")
    result = _invoke(*args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "OPENAI_API_KEY" in lines[0], result.stderr
    result = _invoke(*args, "--api-key", KEY, "-o", str(tmp_path / "load"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "load"
    assert {p.name for p in out.iterdir()} >= {"loadtest.json", "requests.csv", "report.html", "report-latency.png"}
    assert KEY not in result.output + (out / "loadtest.json").read_text() + (out / "report.html").read_text()


def test_the_key_is_not_on_the_help_page():
    assert "OPENAI_API_KEY" in _invoke("eval", "--help", env={"COLUMNS": "200"}).output
    assert KEY not in _invoke("loadtest", "run", "--help", env={"OPENAI_API_KEY": KEY}).output
