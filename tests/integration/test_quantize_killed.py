"""A calibrated ``qserve quantize`` SIGKILLed at random points of its run (the out-of-memory killer's way): no
output directory appears half-written, and the rerun succeeds and removes what the killed runs left beside it."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import ROOT
from tests.unit.tiny import make_tiny_llama_with_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_a_quantization_killed_at_random_points_leaves_nothing_half_written(tmp_path):
    model = make_tiny_llama_with_tokenizer(tmp_path / "tiny")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "qserve", "quantize", str(model), "--scheme", "w4a16", "--method", "awq+gptq",
            "--group-size", "32", "--num-samples", "16", "--calib-seq-len", "128", "-o", str(out)]
    start = time.monotonic()
    full = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    duration = time.monotonic() - start
    assert full.returncode == 0, full.stderr[-2000:]
    shutil.rmtree(out)
    rng, killed_inside = random.Random(0), 0
    for _ in range(5):  # from the imports to the last file written
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.kill()
        proc.wait()
        if out.exists():  # it was moved into place before the kill (maybe while the process exited): it is whole
            assert json.loads((out / "qserve.json").read_text())["quantized_layers"] == 14
            shutil.rmtree(out)
        else:
            killed_inside += 1
    assert killed_inside >= 3
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((out / "qserve.json").read_text())["quantized_layers"] == 14
    assert not list(tmp_path.glob(".out.tmp-*"))  # the killed runs' temporaries are gone
