"""Shared fixtures: the run fails if tests leave files in the checkout or engine processes behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _untracked() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True)
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


def processes() -> list[tuple[int, int, str]]:
    """``(pid, pgid, command line)`` of every process, read from /proc (``ps`` may cut long lines)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(entry), os.getpgid(int(entry)), cmdline))
        except (OSError, ProcessLookupError):
            continue
    return found


def vllm_processes() -> dict[int, str]:
    """``pid -> command line`` of running vLLM servers, engine cores and reapers."""
    return {pid: cmd for pid, _, cmd in processes()
            if "vllm.entrypoints" in cmd or "serving.reaper" in cmd or cmd.startswith("VLLM::")}


@pytest.fixture(scope="session", autouse=True)
def no_leftovers():
    """Fails the session when tests leave files in the checkout or vLLM processes running."""
    before, engines_before = _untracked(), vllm_processes()
    yield
    added = _untracked() - before
    stray = [cmd for pid, cmd in vllm_processes().items() if pid not in engines_before]
    problems = []
    if added:
        problems.append(f"tests left files in the checkout: {sorted(added)[:10]}")
    if stray:
        problems.append(f"tests left vLLM processes running: {stray[:5]}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
