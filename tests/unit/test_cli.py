"""Bad input on the command line: one clear line, a non-zero exit, no traceback, nothing written; and one
vocabulary across the commands, the old spellings still working with a deprecation line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


def qserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qserve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_help_is_quick_and_lists_the_commands():
    result = qserve("--help")
    assert result.returncode == 0
    for command in ("quantize", "serve", "loadtest", "eval", "demo", "models"):
        assert command in result.stdout


def test_model_path_that_does_not_exist(tmp_path):
    line = _one_line_error(qserve("quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "out")))
    assert "not found" in line and "checkpoint directory" in line
    assert not (tmp_path / "out").exists()


def test_scheme_that_does_not_exist(tmp_path):
    line = _one_line_error(qserve("quantize", str(tmp_path), "--scheme", "w3a3", "-o", str(tmp_path / "out")))
    assert "w3a3" in line and "w8a8" in line


def test_method_that_does_not_exist(tmp_path):
    line = _one_line_error(qserve("quantize", str(tmp_path), "--method", "magic", "-o", str(tmp_path / "out")))
    assert "magic" in line and "rtn" in line


def test_directory_without_config(tmp_path):
    line = _one_line_error(qserve("serve", str(tmp_path)))
    assert "config.json" in line


def test_port_in_use(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = _one_line_error(qserve("serve", str(tmp_path), "--port", str(port), timeout=30))
    assert str(port) in line and "--port" in line


def test_unreachable_endpoint_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _one_line_error(qserve("loadtest", f"http://127.0.0.1:{port}", timeout=30))
    assert "cannot reach" in line


def test_malformed_task_file_is_rejected_with_its_line_before_any_request(tmp_path):
    tasks = tmp_path / "mc.jsonl"
    tasks.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": "ab"}\n')
    line = _one_line_error(qserve("eval", "http://127.0.0.1:9", "--tokenizer", str(tmp_path), "--tasks",
                                  f"wikitext,{tasks}", timeout=60))
    assert "mc.jsonl:2" in line and "'choices'" in line


def test_smoothquant_alpha_out_of_range(tmp_path):
    line = _one_line_error(qserve("quantize", str(tmp_path), "--method", "smoothquant", "--smoothquant-alpha", "1.5",
                                  "-o", str(tmp_path / "out")))
    assert "1.5" in line and "auto" in line
    assert not (tmp_path / "out").exists()


# --- one vocabulary: new names, old names with a deprecation line, both at once (in-process, typer's runner) ----

def invoke(*args: str):
    from typer.testing import CliRunner

    from qserve.cli import app

    return CliRunner().invoke(app, list(args))


def _in_process_error(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture()
def scorer(monkeypatch):
    """The scripted scorer endpoint, and a one-token-per-character tokenizer for ``--tokenizer chars``."""
    from accuracy import agreement
    from core import checkpoint
    from tests.fake_backend import running_app
    from tests.fake_scorer import make_fake_scorer
    from tests.unit.test_accuracy import CharTokenizer

    monkeypatch.setattr(checkpoint, "load_tokenizer", lambda source: CharTokenizer())
    monkeypatch.setattr(agreement, "load_tokenizer", lambda source: CharTokenizer())
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with running_app(make_fake_scorer()) as url:
        yield url


def _eval_args(url: str, tmp_path: Path) -> list[str]:
    text = tmp_path / "t.txt"
    text.write_text("one vocabulary across the commands")
    return ["eval", url, "--tokenizer", "chars", "--text-file", str(text), "--seq-len", "8"]


def test_eval_served_model_name_new_old_and_both(scorer, tmp_path):
    args = _eval_args(scorer, tmp_path)
    new = invoke(*args, "--served-model-name", "shifted", "--json", str(tmp_path / "new.json"))
    assert new.exit_code == 0 and "warning" not in new.stderr, new.output
    assert json.loads((tmp_path / "new.json").read_text())["results"]["wikitext"]["model"] == "shifted"
    old = invoke(*args, "--model", "shifted", "--baseline", scorer, "--baseline-model", "scorer",
                 "--json", str(tmp_path / "old.json"))
    assert old.exit_code == 0, old.output
    assert "warning: --model is deprecated; use --served-model-name" in old.stderr
    assert "warning: --baseline-model is deprecated; use --baseline-served-model-name" in old.stderr
    report = json.loads((tmp_path / "old.json").read_text())
    assert report["endpoint"]["model"] == "shifted" and report["baseline"]["model"] == "scorer"
    assert report["deltas"]["wikitext"]["token_perplexity"] > 0  # shifted scores every token 0.5 lower
    both = _in_process_error(invoke(*args, "--model", "a", "--served-model-name", "b"))
    assert "--model" in both and "--served-model-name only" in both


def test_eval_output_is_a_directory_and_an_old_json_output_still_works(scorer, tmp_path):
    args = _eval_args(scorer, tmp_path)
    result = invoke(*args, "-o", str(tmp_path / "reports"), "--markdown", str(tmp_path / "table.md"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["eval.json"]  # the table went to --markdown
    assert (tmp_path / "table.md").read_text().startswith("| task | figure | value |")
    legacy = invoke(*args, "-o", str(tmp_path / "acc.json"))
    assert legacy.exit_code == 0 and "-o now takes a directory; use --json" in legacy.stderr
    assert json.loads((tmp_path / "acc.json").read_text())["results"]["wikitext"]["tokens"] > 0
    line = _in_process_error(invoke(*args, "-o", str(tmp_path / "a.json"), "--json", str(tmp_path / "b.json")))
    assert "give --json only" in line
    assert "-o takes a directory" in _in_process_error(invoke(*args, "-o", str(tmp_path / "t.txt")))


def test_lm_eval_refuses_the_options_it_would_ignore(tmp_path):
    line = _in_process_error(invoke("eval", "http://127.0.0.1:9", "--tokenizer", "t", "--lm-eval", "hellaswag",
                                    "--tasks", "arc_easy", "--baseline", "http://127.0.0.1:9", "--markdown",
                                    str(tmp_path / "x.md"), "--seq-len", "64"))
    assert "--tasks, --baseline, --seq-len, --markdown do not apply with --lm-eval" in line
    assert not (tmp_path / "x.md").exists()
    line = _in_process_error(invoke("eval", "http://127.0.0.1:9", "--tokenizer", "t", "--lm-eval", "hellaswag",
                                    "--baseline-model", "m"))
    assert "--baseline-model does not apply with --lm-eval" in line
    # the options the harness uses pass the check (then: the harness is not installed here, or is unreachable)
    line = _in_process_error(invoke("eval", "http://127.0.0.1:9", "--tokenizer", "t", "--lm-eval", "hellaswag",
                                    "--limit", "5", "--concurrency", "2", "--served-model-name", "m"))
    assert "do not apply" not in line and "does not apply" not in line


def test_loadtest_new_and_old_names(tmp_path):
    from tests.fake_backend import running_app
    from tests.scripted_server import Script, make_scripted_server

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    args = ["loadtest", "--workload", "file", "--num-requests", "2", "--prefill-requests", "0",
            "--output-len", "2", "--profile", "concurrency:1"]
    script = Script(ttft_s=0.001, itl_s=0.001)
    with running_app(make_scripted_server(script)) as url:
        new = invoke(args[0], url, *args[1:], "--served-model-name", "scripted", "--prompt-file", str(prompts),
                     "--json", str(tmp_path / "new.json"))
        assert new.exit_code == 0 and "warning" not in new.stderr, new.output
        assert {r["prompt"] for r in script.requests} <= {"first prompt", "second prompt"}
        old = invoke(args[0], url, *args[1:], "--model", "scripted", "--dataset", str(prompts),
                     "-o", str(tmp_path / "old.json"))
        assert old.exit_code == 0, old.output
        for warning in ("--model is deprecated; use --served-model-name",
                        "--dataset is deprecated; use --prompt-file", "-o now takes a directory; use --json"):
            assert warning in old.stderr
        assert json.loads((tmp_path / "old.json").read_text())["model"] == "scripted"
        both = _in_process_error(invoke(args[0], url, *args[1:], "--dataset", str(prompts), "--prompt-file",
                                        str(prompts)))
        assert "--prompt-file only" in both
        missing = _in_process_error(invoke(args[0], url, *args[1:]))
        assert "--prompt-file PATH" in missing


def test_loadtest_compare_output_directory_and_old_markdown_file(tmp_path):
    from loadtest.report import write_json
    from loadtest.runner import SCHEMA

    report = {"schema": SCHEMA, "prefill": None, "runs": [], "summary": {}, "settings": {}, "url": "u", "model": "m"}
    write_json(report, tmp_path / "a.json")
    result = invoke("loadtest", "compare", str(tmp_path / "a.json"), "-o", str(tmp_path / "cmp"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("| figure | a |")
    legacy = invoke("loadtest", "compare", str(tmp_path / "a.json"), "-o", str(tmp_path / "t.md"))
    assert legacy.exit_code == 0 and "use --markdown" in legacy.stderr and (tmp_path / "t.md").exists()
    write_json(report, tmp_path / "w8a8" / "loadtest.json")  # as `qserve loadtest URL -o w8a8` writes it
    named = invoke("loadtest", "compare", str(tmp_path / "a.json"), str(tmp_path / "w8a8" / "loadtest.json"))
    assert "| figure | a | w8a8 |" in named.output


def test_serve_served_model_name_and_the_demo_model_hint(tmp_path, monkeypatch):
    from core.models import DEMO_MODELS
    from serving import server

    served = []
    monkeypatch.setattr(server, "serve", lambda settings, log: served.append(settings))
    assert invoke("serve", str(tmp_path), "--served-model-name", "w8a8").exit_code == 0
    old = invoke("serve", str(tmp_path), "--name", "w8a8-old")
    assert old.exit_code == 0 and "--name is deprecated; use --served-model-name" in old.stderr
    assert [s.models[0].name for s in served] == ["w8a8", "w8a8-old"]
    assert "--served-model-name only" in _in_process_error(invoke("serve", str(tmp_path), "--name", "a",
                                                                  "--served-model-name", "b"))
    hint = " ".join(invoke("serve").output.replace("│", " ").split())
    assert f"qserve serve {next(iter(DEMO_MODELS))}`" in hint and "instruct" not in hint


# --- bench: options checked before any work ---------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ([], "give a matrix file or --preset NAME"),
    (["--preset", "demo", "MATRIX"], "give a matrix file or --preset NAME"),
    (["--preset", "fastest"], "unknown preset 'fastest'; presets: demo, llmc-findings, methods"),
    (["--preset", "demo", "--max-ppl-increase", "2 percent"], "--max-ppl-increase '2 percent' is not a number"),
    (["--preset", "demo", "--executor", "slurm"], "unknown executor 'slurm'; choose one of local, ray"),
    (["--preset", "demo", "--address", "10.0.0.1:6379"], "--address is for --executor ray"),
    (["--preset", "demo", "--executor", "ray"], "--executor ray needs --address HOST:PORT"),
])
def test_bench_refuses_bad_options_in_one_line_before_any_work(tmp_path, args, message):
    positional = [a for a in args if a == "MATRIX"]
    options = [a for a in args if a != "MATRIX"]
    matrix = [str(tmp_path / "m.yaml")] if positional else []
    if matrix:
        (tmp_path / "m.yaml").write_text("model: m\ncells: [{name: a}]\n")
    line = _in_process_error(invoke("bench", *matrix, *options, "-o", str(tmp_path / "run")))
    assert message in line
    assert not (tmp_path / "run").exists()
