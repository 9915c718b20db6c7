"""Shared fixtures: the run fails if tests leave files behind (in the checkout, in the ignored folders the
project writes, in the temp dir) or engine processes running."""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
WRITTEN = ("out", "runs")  # ignored by git (.gitignore), written by qserve's commands and the demo
TEMP_KEPT = ("torchinductor_",)  # torch's compile cache, should it land in the temp dir: not a leftover


def _untracked() -> set[str]:
    """Untracked files of the checkout (modified tracked files are others' edits in a shared checkout)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True)
    return {line[3:] for line in out.stdout.splitlines() if line.startswith("??")} if out.returncode == 0 else set()


def _written() -> set[str]:
    """Everything under the ignored output folders, relative to the checkout."""
    return {str(p.relative_to(ROOT)) for folder in WRITTEN for p in (ROOT / folder).rglob("*")}


def _temp_entries(temp: Path) -> set[str]:
    """Top-level files, folders and links of a temp dir; sockets and pipes (rendezvous points such as
    vLLM's IPC sockets, not files) and ``TEMP_KEPT`` are left out."""
    names = set()
    with os.scandir(temp) as entries:
        for entry in entries:
            try:
                if not entry.name.startswith(TEMP_KEPT) and (entry.is_symlink() or entry.is_file() or entry.is_dir()):
                    names.add(entry.name)
            except OSError:
                continue
    return names


@contextlib.contextmanager
def session_temp_dir() -> Iterator[Path]:
    """Points ``tempfile`` and child processes (``TMPDIR``) at a fresh folder for the session, removed
    afterwards: the machine's temp dir is shared with other sessions and users, so only a folder of its own
    tells what this session's tests left behind. torch's compile cache stays at its usual place."""
    system = Path(tempfile.gettempdir())
    private = Path(tempfile.mkdtemp(prefix="qserve-tests-", dir=system))
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    with contextlib.suppress(Exception):  # torch's default, computed from the temp dir we are about to move
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(system / f"torchinductor_{user}"))
    os.environ["TMPDIR"], saved_tempdir, tempfile.tempdir = str(private), tempfile.tempdir, str(private)
    try:
        yield private
    finally:
        tempfile.tempdir = saved_tempdir
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(private, ignore_errors=True)


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


def engine_processes() -> dict[int, str]:
    """``pid -> command line`` of running engines (vLLM servers and engine cores, qserve's llama.cpp server and
    llama-server) and their reapers."""
    return {pid: cmd for pid, _, cmd in processes()
            if "vllm.entrypoints" in cmd or "serving.reaper" in cmd or cmd.startswith("VLLM::")
            or "serving.llamacpp_server" in cmd or "/llama-server " in cmd}


@pytest.fixture(scope="session", autouse=True)
def no_leftovers(tmp_path_factory):
    """Fails the session when tests leave files in the checkout, under ``out/`` or ``runs/``, in the temp
    dir, or vLLM processes running: listings before and after the session are compared. The temp dir is the
    session's own (``session_temp_dir``); pytest's ``tmp_path`` base stays outside it, as before."""
    tmp_path_factory.getbasetemp()  # fixed in the machine's temp dir before tempfile is pointed elsewhere
    before, written_before, engines_before = _untracked(), _written(), engine_processes()
    with session_temp_dir() as temp:
        yield
        temp_left = sorted(_temp_entries(temp))
    problems = []
    added = _untracked() - before
    if added:
        problems.append(f"tests left files in the checkout: {sorted(added)[:10]}")
    written = _written() - written_before
    if written:
        problems.append(f"tests left files in {'/, '.join(WRITTEN)}/: {sorted(written)[:10]}")
    if temp_left:
        problems.append(f"tests left files in the temp dir ($TMPDIR, tempfile): {temp_left[:10]} (use tmp_path)")
    stray = [cmd for pid, cmd in engine_processes().items() if pid not in engines_before]
    if stray:
        problems.append(f"tests left engine processes running: {stray[:5]}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
