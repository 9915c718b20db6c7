"""Shared fixtures: the run fails if tests leave files in the checkout or engine processes behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _untracked() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True)
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


def vllm_processes() -> list[str]:
    """Command lines of running vLLM servers and reapers (ours or strays)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()
            if ("vllm.entrypoints" in line or "serving.reaper" in line or "VLLM::EngineCore" in line)]


@pytest.fixture(scope="session", autouse=True)
def no_leftovers():
    """Fails the session when tests leave files in the checkout or vLLM processes running."""
    before = _untracked()
    yield
    added = _untracked() - before
    stray = vllm_processes()
    problems = []
    if added:
        problems.append(f"tests left files in the checkout: {sorted(added)[:10]}")
    if stray:
        problems.append(f"tests left vLLM processes running: {stray[:5]}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
