"""Runs a command in its own process group and takes the whole group down with it.

``python -m serving.reaper -- CMD ...`` is how the gateway launches an engine. vLLM starts helper
processes of its own; killing only the top one can leave them running. The reaper kills the group
when it is told to stop (SIGTERM/SIGINT), when the command exits, and when its own parent dies
(a gateway killed with SIGKILL cannot clean up, so the reaper notices the re-parenting instead).

The command gets a private temp dir (``TMPDIR``), removed once its group is down: vLLM leaves files there
(``vllm_dist_*`` for torch.distributed's rendezvous), and only the reaper outlives the group in every case.
That ``TMPDIR`` also marks every process the engine starts, whatever it renames itself to (vLLM's
``VLLM::EngineCore``) and whatever group it is in: when the reaper itself is SIGKILLed together with the
engine's top process, :func:`kill_orphans_of_dead_reapers` finds what is left by that mark.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

GRACE_SECONDS = 10.0


def _kill_group(child: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to the child's process group, SIGKILL to whatever is left of it after ``grace`` seconds."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        child.poll()  # reap the child: a zombie still counts as a member of its group
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m serving.reaper -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    stopping = []  # set by SIGTERM/SIGINT, installed before anything exists that a signal could orphan

    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    private_tmp = tempfile.mkdtemp(prefix=private_tmp_prefix(os.getpid()))
    try:
        return _supervise(argv[1:], {**os.environ, "TMPDIR": private_tmp}, stopping)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def private_tmp_prefix(reaper_pid: int) -> str:
    """The name the reaper's private temp dir starts with: whoever killed the reaper outright can remove it."""
    return f"qserve-engine-{reaper_pid}-"


PRIVATE_TMP = re.compile(r"qserve-engine-(\d+)-")


def _reaper_alive(pid: int) -> bool:
    try:
        return b"serving.reaper" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False


def orphans_of_dead_reapers() -> dict[int, str]:
    """``pid -> private TMPDIR`` of processes an engine left when its reaper died without cleaning up: they
    carry a reaper's private ``TMPDIR`` and that reaper is gone (Linux ``/proc``; empty elsewhere)."""
    found = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = open(f"/proc/{entry.name}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        tmp = next((v[7:].decode(errors="replace") for v in environ if v.startswith(b"TMPDIR=")), "")
        mark = PRIVATE_TMP.match(os.path.basename(tmp))
        if mark and not _reaper_alive(int(mark.group(1))):
            found[int(entry.name)] = tmp
    return found


def kill_orphans_of_dead_reapers() -> list[int]:
    """SIGKILLs every process :func:`orphans_of_dead_reapers` finds and removes their private temp dirs."""
    orphans = orphans_of_dead_reapers()
    for pid in orphans:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for tmp in set(orphans.values()):
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(orphans)


def _supervise(command: list[str], env: dict[str, str], stopping: list[bool]) -> int:
    """Runs ``command`` in a session of its own until it exits, the reaper is stopped or its parent dies."""
    parent = os.getppid()
    child = subprocess.Popen(command, start_new_session=True, env=env)
    while True:
        code = child.poll()
        if code is not None:
            _kill_group(child, grace=2.0)  # helpers the command left behind
            return code
        if stopping or os.getppid() != parent:
            _kill_group(child)
            child.wait()
            return 0 if stopping else 1
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
