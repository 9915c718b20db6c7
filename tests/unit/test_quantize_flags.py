"""qserve quantize: an option the chosen method or data path does not take fails in one line, before any work."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qserve.cli import app

MISSING = "/nonexistent/model"  # refusals come before the model is resolved


@pytest.mark.parametrize("args, message", [
    (["--method", "rtn", "--actorder"], "--actorder does not apply without GPTQ"),
    (["--method", "awq", "--dampening", "0.1", "--scheme", "w4a16"], "--dampening does not apply without GPTQ"),
    (["--method", "gptq", "--smoothquant-alpha", "auto"], "--smoothquant-alpha does not apply without SmoothQuant"),
    (["--method", "awq+gptq", "--smooth-linears", "--scheme", "w4a16"], "--smooth-linears does not apply without "),
    (["--scheme", "fp8-dynamic", "--asym"], "--asym does not apply to FP8 weights"),
    (["--method", "rtn", "--num-samples", "64", "--seed", "3"],
     "--num-samples, --seed do not apply to rtn on w8a8, which needs no calibration data"),
    (["--method", "rtn", "--scheme", "w4a16", "--calib-file", "x.txt"], "--calib-file does not apply to rtn on w4a16"),
    (["--method", "rtn", "--report-png"], "--report-png does not apply to rtn"),
    (["--method", "rtn", "--device", "cuda"], "--device does not apply to rtn"),
    (["--rotate-seed", "3"], "--rotate-seed does not apply without a rotation (e.g. --rotate hadamard)"),
    (["--rotate", "spin"], "unknown rotation 'spin'; use one of: hadamard, orthogonal, learned"),
    (["--rotate", "hadamard", "--rotate-steps", "5"], "--rotate-steps does not apply without a learned rotation"),
    (["--scheme", "none"], "--scheme none quantizes nothing on its own; add --kv-cache fp8"),
    (["--scheme", "none", "--kv-cache", "fp8", "--override", "re:.*mlp.*=w4a16"],
     "--override does not apply to --scheme none, which quantizes no weights"),
    (["--scheme", "none", "--kv-cache", "fp8", "--rotate", "hadamard"], "--rotate does not apply to --scheme none"),
    (["--override", "down_proj=none"], "override 'down_proj=none': none quantizes no weights"),
    (["--kv-cache", "int4"], "--kv-cache 'int4' is not a KV-cache scheme vLLM serves; use one of: fp8"),
])
def test_inapplicable_options_fail_in_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, ["quantize", MISSING, "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["--method", "gptq", "--actorder", "--dampening", "0.05", "--num-samples", "8"],
    ["--method", "smoothquant+gptq", "--smoothquant-alpha", "auto", "--smooth-linears"],
    ["--method", "rtn", "--scheme", "w8a8-static", "--num-samples", "8"],  # static scales need calibration
    ["--method", "rtn", "--scheme", "w4a16", "--asym"],
    ["--rotate", "hadamard", "--rotate-seed", "3"],
    ["--method", "rtn", "--rotate", "learned", "--rotate-steps", "5", "--num-samples", "8"],  # learned on samples
    ["--method", "rtn", "--kv-cache", "fp8", "--num-samples", "8"],  # KV scales need calibration
    ["--scheme", "none", "--kv-cache", "fp8", "--num-samples", "8"],
])
def test_applicable_options_pass_the_check(args, tmp_path):
    """These reach model resolution (and fail there, on the missing model): the option check let them through."""
    result = CliRunner().invoke(app, ["quantize", MISSING, "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and "does not apply" not in result.output and "not apply" not in result.output
