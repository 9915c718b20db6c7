"""Bad input on the command line: one clear line, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path


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
