"""Runs a command in its own process group and takes the whole group down with it.

``python -m serving.reaper -- CMD ...`` is how the gateway launches an engine. vLLM starts helper
processes of its own; killing only the top one can leave them running. The reaper kills the group
when it is told to stop (SIGTERM/SIGINT), when the command exits, and when its own parent dies
(a gateway killed with SIGKILL cannot clean up, so the reaper notices the re-parenting instead).

The command gets a private temp dir (``TMPDIR``), removed once its group is down: vLLM leaves files there
(``vllm_dist_*`` for torch.distributed's rendezvous), and only the reaper outlives the group in every case.
"""

from __future__ import annotations

import os
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
