"""Runs ``qserve serve`` as a child process and waits until it is ready: for the demo and the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx

from serving.engine import log_tail


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies (Linux), so a killed bench or demo does not
    leave its gateway, and the engine the gateway supervises, running."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class GatewayProcess:
    """A ``qserve serve`` subprocess with its output in ``log_path``."""

    def __init__(self, model_dir: Optional[Path], port: int, name: str, log_path: Path, extra: tuple[str, ...] = (),
                 config: Optional[Path] = None) -> None:
        """Serves ``model_dir`` as ``name``, or (``model_dir`` None) the models of a gateway ``config``."""
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        source = ["--config", str(config)] if config is not None else [str(model_dir), "--served-model-name", name]
        cmd = [sys.executable, "-m", "qserve", "serve", *source, "--port", str(port),
               "--log-dir", str(log_path.parent), *extra]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=str(Path(__file__).resolve().parent.parent),
                                            preexec_fn=_stop_with_parent)

    def wait_ready(self, timeout_s: float = 900.0, log: Optional[Callable[[str], None]] = None) -> float:
        """Seconds until ``/ready`` answered 200; raises with the log's tail if the gateway exits first."""
        start = next_note = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if log and time.monotonic() >= next_note:
                log(f"waiting for {self.url}/ready ({time.monotonic() - start:.0f} s; log: {self.log_path})")
                next_note += 15.0
            if self.process.poll() is not None:
                raise RuntimeError(f"qserve serve exited with {self.process.returncode}:\n"
                                   f"{log_tail(self.log_path)}\nfull log: {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return time.monotonic() - start
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"qserve serve not ready after {timeout_s:.0f} s; log: {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> Optional[int]:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def served(model_dir: Path, port: int, name: str, log_path: Path, extra: tuple[str, ...] = (),
           log: Optional[Callable[[str], None]] = None) -> Iterator[GatewayProcess]:
    """A ready gateway for ``model_dir`` for the duration of the block; stopped afterwards, whatever happens."""
    gateway = GatewayProcess(model_dir, port, name, log_path, extra)
    try:
        gateway.wait_ready(log=log)
        yield gateway
    finally:
        gateway.stop()
