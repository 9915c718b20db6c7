"""Backends the gateway routes to, by the request's ``model``: engines it launched or external URLs.

A model has one or more replicas; a request goes to the ready replica with the fewest outstanding
requests (in flight plus queued), and a connection that fails before the first byte is retried on
another replica by the service.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import aiohttp

from serving.admission import Admission, AdmissionLimits
from serving.caveats import engine_caveats
from serving.engine import EngineConfig, EngineStartError, VLLMEngine
from serving.errors import APIError


@dataclass
class Backend:
    """One replica of a model. ``engine`` is set when the gateway launched it, ``None`` for an external URL;
    ``name`` labels it in logs and metrics (the model's name when it is the only replica)."""

    model: str
    url: str
    name: str = ""
    engine: Optional[VLLMEngine] = None
    state: str = "starting"  # starting | ready | restarting | failed | unreachable (external)
    error: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))
    max_model_len: Optional[int] = None
    upstream_model: Optional[str] = None  # the name the external server knows the model by, where it differs
    api_key: Optional[str] = None  # the external server's own key, sent as a bearer token
    admission: Admission = field(default=None)  # type: ignore[assignment]  # set by the pool

    def __post_init__(self) -> None:
        self.name = self.name or self.model

    @classmethod
    def launched(cls, config: EngineConfig, name: str = "") -> "Backend":
        engine = VLLMEngine(config)
        return cls(model=config.served_name, url=engine.url, name=name, engine=engine,
                   max_model_len=config.max_model_len)

    @classmethod
    def external(cls, model: str, url: str, name: str = "", max_model_len: Optional[int] = None,
                 upstream_model: Optional[str] = None, api_key: Optional[str] = None) -> "Backend":
        return cls(model=model, url=url.rstrip("/"), name=name, state="ready", max_model_len=max_model_len,
                   upstream_model=upstream_model if upstream_model != model else None, api_key=api_key)

    @property
    def headers(self) -> Optional[dict[str, str]]:
        """What each request to this replica carries: its own bearer token, where it has one."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None

    @property
    def outstanding(self) -> int:
        return self.admission.in_flight + self.admission.queued


class BackendPool:
    """Finds a replica for a model name; starts, watches and stops the launched ones."""

    def __init__(self, backends: list[Backend], limits: AdmissionLimits = AdmissionLimits()) -> None:
        names = [b.name for b in backends]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(duplicates)}")
        self.backends = backends
        self.replicas: dict[str, list[Backend]] = {}
        for b in backends:
            self.replicas.setdefault(b.model, []).append(b)
            b.admission = Admission(b.model, limits)
        self.stopping = False

    def get(self, model: str, exclude: tuple[Backend, ...] = ()) -> Backend:
        """The ready replica of ``model`` with the fewest outstanding requests, ``exclude`` left out;
        404 for a model not served, 503 (with why) when no replica is ready."""
        replicas = self.replicas.get(model)
        if replicas is None:
            raise APIError(404, f"model {model!r} does not exist; available: {', '.join(self.replicas)}",
                           param="model", code="model_not_found")
        ready = [b for b in replicas if b.state == "ready" and b not in exclude]
        if ready:
            return min(ready, key=lambda b: b.outstanding)
        if exclude:
            raise APIError(502, f"model {model!r}: no other replica is ready after "
                                f"{', '.join(b.name for b in exclude)} failed", code="upstream_unreachable")
        # a replica that will come back (starting, restarting) says more than one that failed for good
        raise self._unavailable(min(replicas, key=lambda b: b.state == "failed"))

    @staticmethod
    def _unavailable(backend: Backend) -> APIError:
        model = backend.model
        if backend.state == "starting":
            return APIError(503, f"model {model!r} is still starting; retry shortly", code="backend_starting",
                            headers={"Retry-After": "5"})
        if backend.state == "restarting":
            return APIError(503, f"model {model!r} is restarting: {backend.error}; retry shortly",
                            code="backend_restarting", headers={"Retry-After": "10"})
        if backend.state == "unreachable":
            return APIError(503, f"model {model!r} is unreachable: {backend.error}; retry shortly",
                            code="backend_unreachable", headers={"Retry-After": "5"})
        return APIError(503, f"model {model!r} is unavailable: {backend.error}", code="backend_failed")

    @property
    def ready(self) -> bool:
        return all(b.state == "ready" for b in self.backends)

    async def start(self, on_fatal: Callable[[str], None], log: Callable[[str], None] = print,
                    on_restart: Callable[[str], None] = lambda model: None,
                    client: Optional[aiohttp.ClientSession] = None, probe_interval_s: float = 5.0,
                    on_ready: Callable[[], None] = lambda: None) -> None:
        """Starts every launched engine and waits for health (``on_fatal`` is called if one cannot start;
        ``on_ready`` once, when all of them are first ready, at once when there are none), then watches
        them: an engine that dies is restarted, with backoff, until the pool stops. External replicas are
        probed every ``probe_interval_s`` with ``client`` (0 or no client: never)."""
        probes = [self._probe(b, client, log, probe_interval_s) for b in self.backends if b.engine is None
                  ] if client is not None and probe_interval_s > 0 else []
        await asyncio.gather(self._start_launched(on_fatal, log, on_restart, on_ready), *probes)

    async def _probe(self, b: Backend, client: aiohttp.ClientSession, log: Callable[[str], None],
                     interval_s: float) -> None:
        """Takes an external replica out of routing while its health check fails, back when it passes."""
        while not self.stopping:
            failure = await health_failure(client, b.url, b.headers)
            if failure is None and b.state != "ready":
                log(f"{b.name!r} at {b.url} answers again")
                b.state, b.error = "ready", None
            elif failure is not None and b.state == "ready":
                log(f"{b.name!r} at {b.url} is unreachable ({failure}); routing around it")
                b.state, b.error = "unreachable", failure
            await asyncio.sleep(interval_s)

    async def _start_launched(self, on_fatal: Callable[[str], None], log: Callable[[str], None],
                              on_restart: Callable[[str], None], on_ready: Callable[[], None]) -> None:
        launched = [b for b in self.backends if b.engine is not None]
        for b in launched:
            log(f"starting vLLM for {b.name!r} on {b.url} (log: {b.engine.config.log_path})")
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
                log(f"vLLM for {b.name!r} ready after {result:.0f} s")
                for caveat in engine_caveats(b.engine.config.model_dir, b.engine.config.log_path):
                    log(f"note for {b.name!r}: {caveat.message}")
        if all(b.state == "ready" for b in launched):  # the watchers below restart; they never call this
            on_ready()
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
            on_restart(b.name)
            log(f"vLLM for {b.name!r} exited (code {code}); restarting in {backoff:.0f} s")
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
            log(f"vLLM for {b.name!r} restarted, ready after {waited:.0f} s")

    def stop(self) -> None:
        self.stopping = True
        for b in self.backends:
            if b.engine is not None:
                b.engine.stop()


async def health_failure(client: aiohttp.ClientSession, url: str, headers: Optional[dict[str, str]] = None,
                         timeout_s: float = 2.0) -> Optional[str]:
    """None when the server at ``url`` answers its health check (``/health``, or ``/v1/models`` where
    there is no ``/health``, as on OpenAI-compatible servers other than vLLM); else why not."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        for path in ("/health", "/v1/models"):
            async with client.get(f"{url}{path}", headers=headers, timeout=timeout) as resp:
                if resp.status != 404:
                    return None if resp.status < 300 else f"{path} answered HTTP {resp.status}"
        return "neither /health nor /v1/models exists there"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
