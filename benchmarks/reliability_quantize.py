"""The reliability campaign's quantization part: ``qserve quantize`` (the CLI, as a user runs it) on a tiny
Llama, under faults.

- SIGKILLed at ``--quantize-kills`` random points of a calibrated run: no output directory half-written, the
  rerun succeeds and removes what the killed runs left beside it.
- A full disk (a 1 MiB tmpfs as the output's file system; needs root to mount), a truncated and a corrupt
  safetensors file, a config that lies about the layers and the shapes: one line each (``error: ...``), exit
  code 1, before the heavy work (the seconds are shown), and nothing left where the output would go.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from reliability_common import ROOT

Log = Callable[[str], None]


def _quantize(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qserve", "quantize", str(model), "--scheme", "w4a16", "--group-size", "32",
            "-o", str(out), *extra]


def _killed_runs(model: Path, folder: Path, kills: int, log: Log) -> dict[str, Any]:
    out = folder / "out"
    args = _quantize(model, out, "--method", "awq+gptq", "--num-samples", "16", "--calib-seq-len", "128")
    start = time.monotonic()
    subprocess.run(args, cwd=ROOT, capture_output=True, check=True)
    whole_s = time.monotonic() - start
    shutil.rmtree(out)
    rng, inside, half_written = random.Random(0), 0, 0
    for _ in range(kills):
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * whole_s)
        proc.kill()
        proc.wait()
        if out.exists():
            half_written += json.loads((out / "qserve.json").read_text()).get("quantized_layers") != 14
            shutil.rmtree(out)
        else:
            inside += 1
    left = len(list(folder.glob(".out.tmp-*")))
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    cleaned = not list(folder.glob(".out.tmp-*"))
    log(f"quantize killed {kills} times ({inside} inside the run): half-written {half_written}, temporaries "
        f"left {left}, rerun {rerun.returncode}, cleaned {cleaned}")
    return {"part": "quantize", "tried": f"a calibrated quantize (AWQ+GPTQ, {whole_s:.0f} s) SIGKILLed at random "
                                         f"points", "times": kills,
            "held": f"{inside} kills inside the run; half-written outputs {half_written}; the killed runs' "
                    f"{left} temporaries removed by the rerun: {cleaned}; rerun exit {rerun.returncode}",
            "lost": "nothing" if half_written == 0 and rerun.returncode == 0 and cleaned else "see held"}


def _refusal(label: str, args: list[str], out: Path) -> dict[str, Any]:
    start = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    took = time.monotonic() - start
    lines = done.stderr.strip().splitlines()
    one_line = len(lines) == 1 and lines[0].startswith("error: ")
    return {"part": "quantize", "tried": label, "times": 1,
            "held": f"exit {done.returncode} in {took:.1f} s: {lines[-1] if lines else '(nothing)'}",
            "lost": "nothing" if done.returncode == 1 and one_line and not out.exists() else "see held"}


def part_quantize(kills: int, log: Log) -> list[dict[str, Any]]:
    from tests.unit.tiny import make_tiny_llama_with_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_tiny_llama_with_tokenizer(folder / "tiny")
        rows.append(_killed_runs(model, folder, kills, log))
        disk = folder / "disk"
        disk.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                                 text=True)
        if mounted.returncode == 0:
            try:
                (disk / "filler").write_bytes(b"\0" * 700 * 1024)
                rows.append(_refusal("a disk with 300 KiB free for a 500 KiB checkpoint (tmpfs)",
                                     _quantize(model, disk / "out", "--method", "rtn"), disk / "out"))
            finally:
                subprocess.run(["umount", str(disk)], check=True)
        else:
            log(f"full disk: not tried, mount refused a tmpfs ({mounted.stderr.strip()})")
        damages: dict[str, Callable[[Path], None]] = {
            "a truncated safetensors file": lambda m: (m / "model.safetensors").write_bytes(
                (m / "model.safetensors").read_bytes()[:-1000]),
            "a corrupt safetensors header": lambda m: (m / "model.safetensors").write_bytes(
                (m / "model.safetensors").read_bytes()[:8] + b"not json" + (m / "model.safetensors").read_bytes()[16:]),
            "a config with more layers than the weights": lambda m: _edit_config(m, num_hidden_layers=4),
            "a config with wider MLPs than the weights": lambda m: _edit_config(m, intermediate_size=512),
        }
        for label, damage in damages.items():
            broken = Path(shutil.copytree(model, folder / "broken"))
            damage(broken)
            rows.append(_refusal(label, _quantize(broken, folder / "out-broken", "--method", "gptq"),
                                 folder / "out-broken"))
            shutil.rmtree(broken)
    for row in rows[1:]:
        log(f"{row['tried']}: {row['held']}")
    return rows


def _edit_config(model: Path, **changes: Any) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
