"""``qserve bench --executor ray`` against a local Ray cluster started by the test: the cells run as Ray tasks
(one per worker), their results come back into the same report, and the cluster is stopped afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from serving.engine import free_port
from tests.integration.conftest import run_qserve
from tests.unit.tiny import make_tiny_family

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MATRIX = """
model: {model}
baseline: float
eval: {{windows: 1, seq_len: 256, agreement_windows: 1, agreement_seq_len: 128}}
loadtest: {{streams: [1], input_len: 32, output_len: 4, requests: 2}}
defaults: {{cpus: 2}}  # the whole machine per cell: one engine at a time on this 2-core cluster
cells:
  - {{name: float, scheme: float}}
  - {{name: w4-rtn, scheme: w4a16, method: rtn, group_size: 64}}
"""


@pytest.fixture
def ray_cluster():
    """A Ray head on this machine with 2 CPUs; its sockets live under a short temp dir (AF_UNIX paths are short)."""
    ray = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    started = subprocess.run([str(ray), "start", "--head", "--num-cpus", "2", "--port", str(port), "--temp-dir",
                              str(temp), "--include-dashboard=false", "--disable-usage-stats"],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_bench_runs_its_cells_on_a_ray_cluster(demo_model, tmp_path, ray_cluster):
    model = make_tiny_family(tmp_path / "tiny", "qwen3", tokenizer_from=demo_model, hidden_size=128, head_dim=32,
                             initializer_range=0.1, max_position_embeddings=8192, intermediate_size=256)
    (tmp_path / "m.yaml").write_text(MATRIX.format(model=model))
    result = run_qserve("bench", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "run"), "--cache-dir",
                        str(tmp_path / "cache"), "--executor", "ray", "--address", ray_cluster, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "cell(s) submitted to the Ray cluster" in result.stdout
    rows = {r["cell"]: r for r in json.loads((tmp_path / "run" / "report.json").read_text())["rows"]}
    assert rows["float"]["status"] == rows["w4-rtn"]["status"] == "ok", rows
    assert rows["w4-rtn"]["perplexity"] != rows["float"]["perplexity"] and 0 < rows["w4-rtn"]["top1_agreement"] < 1
    # the cell ran in a Ray worker, not in the bench process: its pid is in the worker's log lines
    assert "(_cell_on_worker pid=" in result.stdout or "(_cell_on_worker pid=" in result.stderr


def test_a_ray_address_that_answers_nothing_is_a_one_line_error(tmp_path):
    (tmp_path / "m.yaml").write_text("model: m\ncells: [{name: a}]\n")
    result = run_qserve("bench", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "run"), "--executor", "ray",
                        "--address", f"127.0.0.1:{free_port()}", timeout=300)
    assert result.returncode == 1 and result.stderr.startswith("error: cannot reach a Ray cluster at 127.0.0.1:")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
