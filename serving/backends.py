"""Backends the gateway routes to, by the request's ``model``: engines it launched or external URLs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from serving.admission import Admission, AdmissionLimits
from serving.engine import EngineConfig, EngineStartError, VLLMEngine
from serving.errors import APIError


@dataclass
class Backend:
    """One model endpoint. ``engine`` is set when the gateway launched it, ``None`` for an external URL."""

    model: str
    url: str
    engine: Optional[VLLMEngine] = None
    state: str = "starting"  # starting | ready | restarting | failed
    error: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))
    max_model_len: Optional[int] = None
    admission: Admission = field(default=None)  # type: ignore[assignment]  # set by the pool

    @classmethod
    def launched(cls, config: EngineConfig) -> "Backend":
        engine = VLLMEngine(config)
        return cls(model=config.served_name, url=engine.url, engine=engine, max_model_len=config.max_model_len)

    @classmethod
    def external(cls, model: str, url: str) -> "Backend":
        return cls(model=model, url=url.rstrip("/"), state="ready")


class BackendPool:
    """Looks backends up by model name and starts/stops the launched ones."""

    def __init__(self, backends: list[Backend], limits: AdmissionLimits = AdmissionLimits()) -> None:
        self.backends = {b.model: b for b in backends}
        self.stopping = False
        for b in backends:
            b.admission = Admission(b.model, limits)

    def get(self, model: str) -> Backend:
        backend = self.backends.get(model)
        if backend is None:
            raise APIError(404, f"model {model!r} does not exist; available: {', '.join(self.backends)}",
                           param="model", code="model_not_found")
        if backend.state == "starting":
            raise APIError(503, f"model {model!r} is still starting; retry shortly", code="backend_starting",
                           headers={"Retry-After": "5"})
        if backend.state == "restarting":
            raise APIError(503, f"model {model!r} is restarting: {backend.error}; retry shortly",
                           code="backend_restarting", headers={"Retry-After": "10"})
        if backend.state == "failed":
            raise APIError(503, f"model {model!r} is unavailable: {backend.error}", code="backend_failed")
        return backend

    @property
    def ready(self) -> bool:
        return all(b.state == "ready" for b in self.backends.values())

    async def start(self, on_fatal: Callable[[str], None], log: Callable[[str], None] = print,
                    on_restart: Callable[[str], None] = lambda model: None) -> None:
        """Starts every launched engine and waits for health (``on_fatal`` is called if one cannot start),
        then watches them: an engine that dies is restarted, with backoff, until the pool stops."""
        launched = [b for b in self.backends.values() if b.engine is not None]
        for b in launched:
            log(f"starting vLLM for {b.model!r} on {b.url} (log: {b.engine.config.log_path})")
            try:
                b.engine.start()
            except EngineStartError as exc:
                b.state, b.error = "failed", str(exc)
                on_fatal(str(exc))
                return
        results = await asyncio.gather(*(b.engine.wait_ready() for b in launched), return_exceptions=True)
        for b, result in zip(launched, results):
            if isinstance(result, BaseException):
                b.state, b.error = "failed", str(result)
                on_fatal(str(result))
            else:
                b.state = "ready"
                log(f"vLLM for {b.model!r} ready after {result:.0f} s")
        await asyncio.gather(*(self._watch(b, log, on_restart) for b in launched if b.state == "ready"))

    async def _watch(self, b: Backend, log: Callable[[str], None], on_restart: Callable[[str], None],
                     interval_s: float = 1.0, max_backoff_s: float = 60.0) -> None:
        """Restarts ``b``'s engine whenever its process has exited: 1 s, then twice as long after each
        failed start, up to ``max_backoff_s``; requests meanwhile get 503 with ``Retry-After``."""
        backoff = 1.0
        while True:
            await asyncio.sleep(interval_s)
            if self.stopping or b.engine.alive():
                continue
            code = b.engine.process.returncode if b.engine.process else None
            b.state, b.error = "restarting", f"its engine exited (code {code})"
            on_restart(b.model)
            log(f"vLLM for {b.model!r} exited (code {code}); restarting in {backoff:.0f} s")
            await asyncio.sleep(backoff)
            try:
                b.engine.stop()
                b.engine.start()
                waited = await b.engine.wait_ready()
            except EngineStartError as exc:
                b.error = f"its engine failed to restart: {str(exc).splitlines()[0]}"
                backoff = min(backoff * 2, max_backoff_s)
                continue
            b.state, b.error, backoff = "ready", None, 1.0
            log(f"vLLM for {b.model!r} restarted, ready after {waited:.0f} s")

    def stop(self) -> None:
        self.stopping = True
        for b in self.backends.values():
            if b.engine is not None:
                b.engine.stop()
