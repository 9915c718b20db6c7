"""The load tester against an in-process server with scripted timings, over real HTTP, and its command line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.profiles import Concurrency, ConstantRate, Poisson
from loadtest.runner import LoadSettings, run_loadtest
from loadtest.workloads import LengthDist
from tests.fake_backend import running_app
from tests.scripted_server import Script, make_scripted_server

ROOT = Path(__file__).resolve().parents[2]
SLACK = 0.06  # event-loop and HTTP jitter on a busy 2-core CI machine; the scripted times are 100 ms / 25 ms


def settings(**overrides) -> LoadSettings:
    base = dict(profiles=(Concurrency(2),), input_len=LengthDist("fixed", 32), output_len=LengthDist("fixed", 6),
                num_requests=8, prefill_requests=2, warmup=0, cooldown=0)
    return LoadSettings(**{**base, **overrides})


def run(script: Script, **overrides) -> dict:
    with running_app(make_scripted_server(script)) as url:
        return run_loadtest(url, None, settings(**overrides), log=lambda m: None, progress=False)


def test_measured_figures_match_the_scripted_timings():
    report = run(Script(ttft_s=0.1, itl_s=0.025))
    load = report["runs"][0]
    assert 0.1 <= load["ttft_s"]["p50"] < 0.1 + SLACK
    assert 0.025 <= load["tpot_s"]["p50"] < 0.025 + SLACK / 4
    assert 0.025 - 0.01 < load["itl_s"]["p50"] < 0.025 + SLACK / 4
    assert 0.225 <= load["e2e_s"]["p50"] < 0.225 + SLACK
    assert load["output_tokens"]["mean"] == 6 and load["prompt_tokens"]["mean"] == 24  # 32 tokens ~ 24 words
    # two streams of requests lasting ~0.225 s each: ~8.9 req/s, 6 tokens each
    assert 2 / (0.225 + SLACK) < load["request_throughput"] <= 2 / 0.225
    assert load["output_tok_s"] == pytest.approx(6 * load["request_throughput"], rel=0.15)
    assert 0.1 <= report["prefill"]["single_stream_ttft_s"]["p50"] < 0.1 + SLACK
    assert load["server"]["engine_output_tokens"] == load["server"]["client_output_tokens"] == 48
    assert load["token_source"] == {"usage": 8}


def test_tokens_are_counted_without_usage_and_across_multi_token_chunks():
    load = run(Script(ttft_s=0.01, itl_s=0.005, usage=False, tokens_per_chunk=3))["runs"][0]
    assert load["token_source"] == {"chunks": 8}
    assert load["output_tokens"]["mean"] == 3  # 6 tokens in 3 chunks (1 + 3 + 2): counted as chunks
    with_usage = run(Script(ttft_s=0.01, itl_s=0.005, tokens_per_chunk=3))["runs"][0]
    assert with_usage["output_tokens"]["mean"] == 6 and with_usage["itl_s"]["p50"] >= 0.005 * 2


@pytest.mark.parametrize("endpoint, stream", [("chat", True), ("completions", False)])
def test_chat_and_non_streaming(endpoint, stream):
    script = Script(ttft_s=0.02, itl_s=0.01)
    load = run(script, endpoint=endpoint, stream=stream)["runs"][0]
    assert load["errors"]["count"] == 0 and load["output_tokens"]["mean"] == 6
    assert ("messages" in script.requests[-1]) == (endpoint == "chat")
    if not stream:
        assert load["ttft_s"]["p50"] == load["e2e_s"]["p50"] and load["tpot_s"]["p50"] is None


def test_server_errors_are_counted_and_shown():
    report = run(Script(ttft_s=0.01, itl_s=0.001, fail_every=3), prefill_requests=0)
    load = report["runs"][0]
    assert load["errors"]["count"] == 3 and load["errors"]["by_status"] == {"500": 3}  # requests 3, 6, 9 of 9
    assert load["errors"]["samples"] == ["3 x 500: scripted failure"] and load["requests"]["ok"] == 5


def test_rate_profiles_issue_on_schedule_and_duration_bounds_a_run():
    script = Script(ttft_s=0.01, itl_s=0.001)
    report = run(script, profiles=(ConstantRate(20.0),), num_requests=None, duration_s=1.0, prefill_requests=0)
    load = report["runs"][0]
    assert 18 <= load["requests"]["issued"] <= 21  # one every 50 ms for one second
    starts = [row["start_s"] for row in load["request_rows"]]
    assert max(b - a for a, b in zip(starts, starts[1:])) < 0.05 + SLACK
    poisson = run(script, profiles=(Poisson(50.0, 1.0, 2),), num_requests=20, prefill_requests=0)["runs"][0]
    assert poisson["requests"]["issued"] == 20 and poisson["errors"]["count"] == 0


def test_a_sweep_stops_at_saturation():
    # The scripted server has no batching limit: throughput doubles with streams, so no step saturates
    # and the whole sweep runs; a rate the server cannot meet saturates at once.
    report = run(Script(ttft_s=0.05, itl_s=0.01), profiles=(Concurrency(1), Concurrency(2)), prefill_requests=0)
    assert [r["profile"] for r in report["runs"]] == ["concurrency 1", "concurrency 2"]
    assert report["runs"][1]["output_tok_s"] > 1.5 * report["runs"][0]["output_tok_s"]
    capped = run(Script(ttft_s=0.2, itl_s=0.01), profiles=(ConstantRate(50.0, 1), ConstantRate(100.0, 1)),
                 num_requests=4, prefill_requests=0)
    assert capped["saturated_at"] == "constant 50 req/s" and len(capped["runs"]) == 1


def qserve(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "qserve", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_cli_writes_json_csv_html_and_compares(tmp_path):
    script = Script(ttft_s=0.02, itl_s=0.005)
    with running_app(make_scripted_server(script)) as url:
        for name, profile in (("a", "concurrency:1,2"), ("b", "concurrency:2")):
            proc = qserve("loadtest", url, "--profile", profile, "--num-requests", "6", "--input-len", "16",
                          "--output-len", "4", "--slo", "ttft=500ms", "--no-stop-at-saturation",
                          "-o", str(tmp_path / f"{name}.json"), "--csv", str(tmp_path / f"{name}.csv"),
                          "--html", str(tmp_path / f"{name}.html"))
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    assert "| concurrency 2 |" in out and "goodput req/s" in out
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["schema"] == "qserve.loadtest/2" and len(report["runs"]) == 2
    assert report["runs"][0]["goodput"]["fraction"] == 1.0
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert rows[0].startswith("profile,index,start_s") and len(rows) == 1 + 6 + 8  # a sweep step: >= 4 rounds
    html = (tmp_path / "a.html").read_text()
    for png in ("a-latency.png", "a-throughput.png", "a-timeline.png"):
        assert png in html and (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    proc = qserve("loadtest", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "bf16,w8a8")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "| figure | bf16 | w8a8 |" in out and "concurrency 2: output tok/s" in out and "(x" in out
    proc = qserve("loadtest", "compare", str(tmp_path / "a.csv"))
    assert "not a qserve load test report" in proc.communicate(timeout=60)[1] and proc.returncode == 1


def test_ctrl_c_writes_the_partial_report(tmp_path):
    script = Script(ttft_s=0.05, itl_s=0.05)
    with running_app(make_scripted_server(script)) as url:
        proc = qserve("loadtest", url, "--profile", "concurrency:2", "--num-requests", "1000", "--output-len", "20",
                      "--prefill-requests", "0", "-o", str(tmp_path / "partial.json"))
        deadline = time.monotonic() + 60
        while script.seen < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    report = json.loads((tmp_path / "partial.json").read_text())
    run_ = report["runs"][0]
    assert report["interrupted"] and 4 <= run_["requests"]["issued"] < 1000
    assert run_["requests"]["cancelled"] >= 1 and run_["errors"]["count"] == 0 and run_["requests"]["ok"] >= 3
    assert "interrupted: partial report" in out


def test_bad_options_fail_with_one_line(tmp_path):
    for args, message in [(["--profile", "ramp:2"], "unknown load profile"),
                          (["--input-len", "lots"], "is not N, uniform"),
                          (["--workload", "file"], "needs a file"),
                          (["--num-requests", "0"], "needs --duration")]:
        proc = qserve("loadtest", "http://127.0.0.1:9", *args)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 1 and message in err and "Traceback" not in err, err


def test_each_run_salts_the_prefix_cache_afresh():
    """A rerun of a seeded workload sends the same prompts; a fresh cache_salt keeps it from hitting the
    previous run's prefix cache (which made reruns look 3x faster on vLLM-CPU)."""
    script = Script(ttft_s=0.001, itl_s=0.001)
    first, second = (run(script, prefill_requests=0, num_requests=2) for _ in range(2))
    assert first["cache_salt"] != second["cache_salt"]
    assert {r.get("cache_salt") for r in script.requests} == {first["cache_salt"], second["cache_salt"]}
    run(script, prefill_requests=0, num_requests=2, cache_salt=None)
    assert "cache_salt" not in script.requests[-1]
