"""The reaper takes its command's whole process group down, however its parent goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import processes

ROOT = Path(__file__).resolve().parents[2]


def _group_alive(marker: str) -> list[str]:
    return [cmd for _, _, cmd in processes() if marker in cmd and "serving.reaper" not in cmd and "bash -c" not in cmd]


def _wait_gone(marker: str, seconds: float = 20.0) -> list[str]:
    """Waits for every process mentioning ``marker`` (the reaper included) to end; returns the survivors."""
    def alive() -> list[str]:
        return [cmd for pid, _, cmd in processes() if marker in cmd and pid != os.getpid()]

    deadline = time.monotonic() + seconds
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive()


def _spawn(marker_seconds: str, via_parent: bool) -> subprocess.Popen:
    # the command leaves a grandchild behind, as vLLM's engine core would be
    command = [sys.executable, "-m", "serving.reaper", "--", "bash", "-c",
               f"sleep {marker_seconds} & sleep {marker_seconds}; wait"]
    if via_parent:  # a stand-in gateway: a process that starts the reaper and can be SIGKILLed
        command = [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen(sys.argv[1:]); time.sleep(600)",
                   *command]
    return subprocess.Popen(command, cwd=ROOT)


def _wait_started(marker: str) -> None:
    deadline = time.monotonic() + 10
    while len(_group_alive(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_group_alive(marker)) == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_reaper_kills_the_group(sig):
    marker = f"{os.getpid()}{sig.value}1.5"
    proc = _spawn(marker, via_parent=False)
    _wait_started(f"sleep {marker}")
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 0
    assert _wait_gone(f"sleep {marker}") == []


def test_parent_killed_with_sigkill_still_kills_the_group():
    marker = f"{os.getpid()}92.5"
    parent = _spawn(marker, via_parent=True)
    try:
        _wait_started(f"sleep {marker}")
        parent.kill()
        parent.wait()
        assert _wait_gone(f"sleep {marker}") == []
    finally:
        subprocess.run(["pkill", "-f", f"sleep {marker}"], capture_output=True)


def test_command_exit_code_is_passed_on():
    result = subprocess.run([sys.executable, "-m", "serving.reaper", "--", "bash", "-c", "exit 3"], cwd=ROOT, timeout=20)
    assert result.returncode == 3


def test_the_private_temp_dir_goes_even_when_the_parent_is_killed(tmp_path):
    """The command's TMPDIR is a folder of the reaper's own, removed after a SIGKILL to the gateway too."""
    marker = f"{os.getpid()}93.5"
    where = tmp_path / "tmpdir"
    command = [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen(sys.argv[1:]); time.sleep(600)",
               sys.executable, "-m", "serving.reaper", "--", "bash", "-c",
               f"touch $TMPDIR/vllm_dist_x; echo -n $TMPDIR > {where}; sleep {marker}"]
    parent = subprocess.Popen(command, cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while not (where.exists() and where.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        private = Path(where.read_text())
        assert (private / "vllm_dist_x").exists() and private.name.startswith("qserve-engine-")
        parent.kill()
        parent.wait()
        assert _wait_gone(f"sleep {marker}") == [] and not private.exists()
    finally:
        subprocess.run(["pkill", "-f", f"sleep {marker}"], capture_output=True)


def test_what_a_killed_reaper_and_engine_leave_is_found_and_killed():
    """SIGKILL at once to the reaper and its command (what `kill -9` of every process naming the API server
    does) leaves the command's child running, reparented, whatever it calls itself. The engine's private TMPDIR
    marks it: the next start finds it and takes it down, with the temp dir (issue 22's orphaned VLLM::EngineCore)."""
    from serving.reaper import kill_orphans_of_dead_reapers, orphans_of_dead_reapers

    marker = f"{os.getpid()}94.5"
    reaper = subprocess.Popen([sys.executable, "-m", "serving.reaper", "--", "bash", "-c",
                               f"sleep {marker} & sleep {marker}; wait"], cwd=ROOT)
    try:
        _wait_started(f"sleep {marker}")
        engine = [pid for pid, _, cmd in processes() if cmd.startswith("bash -c") and marker in cmd]
        os.kill(reaper.pid, signal.SIGKILL)
        os.kill(engine[0], signal.SIGKILL)
        reaper.wait()
        time.sleep(0.5)
        left = {pid for pid, _, cmd in processes() if cmd == f"sleep {marker}"}
        assert len(left) == 2  # the defect: both sleeps outlive their reaper and their parent
        orphans = orphans_of_dead_reapers()
        assert left <= set(orphans) and all(f"qserve-engine-{reaper.pid}-" in orphans[p] for p in left)
        assert set(kill_orphans_of_dead_reapers()) >= left
        assert _wait_gone(f"sleep {marker}") == []
        assert not any(Path(orphans[p]).exists() for p in left)
    finally:
        subprocess.run(["pkill", "-f", f"sleep {marker}"], capture_output=True)
