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
    state: str = "starting"  # starting | ready | failed
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
        if backend.state == "failed":
            raise APIError(503, f"model {model!r} is unavailable: {backend.error}", code="backend_failed")
        return backend

    @property
    def ready(self) -> bool:
        return all(b.state == "ready" for b in self.backends.values())

    async def start(self, on_fatal: Callable[[str], None], log: Callable[[str], None] = print) -> None:
        """Starts every launched engine and waits for health; ``on_fatal`` is called if one cannot start."""
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

    def stop(self) -> None:
        for b in self.backends.values():
            if b.engine is not None:
                b.engine.stop()
