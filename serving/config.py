"""The gateway's YAML config: models, their checkpoints or URLs, replicas, engine arguments, keys, limits.

    host: 0.0.0.0
    port: 8000
    api_keys: keys.yaml            # or `keys:` with the key file's entries inline
    limits: {max_in_flight: 256, max_queue: 512, queue_timeout_s: 60, client_timeout_s: 60,
             engine_timeout_s: 600}
    models:
      - name: smollm2-w8a8
        checkpoint: build/demo/smollm2-w8a8   # launched and supervised by the gateway
        replicas: 2
        max_model_len: 2048
        engine_args: [--tensor-parallel-size, "2", --distributed-executor-backend, ray]
        env: {VLLM_CPU_KVCACHE_SPACE: "2"}    # every replica of this model
      - name: smollm2-q4
        checkpoint: build/smollm2-q4_0.gguf   # a GGUF file: served by llama.cpp (engine: llamacpp)
        threads: 2                        # llama.cpp's CPU threads (default: every core)
      - name: big
        urls: [http://gpu-host-1:8000, http://gpu-host-2:8000]   # external replicas, joined by URL
        max_model_len: 32768              # optional: lets the gateway refuse what cannot fit
        served_model_name: meta-llama/Llama-3.1-70B-Instruct   # optional: their name for it
        api_key_env: GPU_HOSTS_KEY        # optional: the variable holding their key

``qserve serve CHECKPOINT`` builds the same config with one model.
"""

from __future__ import annotations

import json

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.admission import AdmissionLimits
from serving.backends import Backend
from serving.engine import ENGINES, EngineConfig, engine_for


class ConfigError(ValueError):
    """The gateway config cannot be used; the message names the field and what to fix."""


class ModelSpec(BaseModel):
    """One served model: launched from ``checkpoint`` (``replicas`` engines) or reached at ``urls``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    checkpoint: Optional[str] = None
    urls: list[str] = []
    replicas: int = Field(default=1, ge=1)
    max_model_len: Optional[int] = Field(default=None, ge=1)
    engine_args: list[str] = []
    enforce_eager: Optional[bool] = None
    env: dict[str, str] = {}
    engine: Optional[str] = None  # vllm or llamacpp; default: llamacpp for a .gguf file, else vllm
    threads: Optional[int] = Field(default=None, ge=1)  # llama.cpp's CPU threads
    served_model_name: Optional[str] = None  # urls: the name those servers know the model by
    api_key_env: Optional[str] = None  # urls: the environment variable holding those servers' key

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if bool(self.checkpoint) == bool(self.urls):
            raise ValueError("give either 'checkpoint' (engines the gateway launches) or 'urls' (running servers)")
        if self.urls and (self.replicas != 1 or self.engine_args or self.env or self.enforce_eager is not None):
            raise ValueError("'replicas', 'engine_args', 'env' and 'enforce_eager' apply to a 'checkpoint'; "
                             "for 'urls' each URL is a replica")
        if self.checkpoint and (self.served_model_name or self.api_key_env):
            raise ValueError("'served_model_name' and 'api_key_env' apply to 'urls'; a launched engine serves "
                             "the model under 'name' and needs no key of its own")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(f"api_key_env: the environment variable {self.api_key_env} is not set; export it "
                             f"with the key of the servers at {', '.join(self.urls)}")
        if self.engine is not None and self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one qserve launches; choose {' or '.join(ENGINES)}")
        if self.urls and (self.engine or self.threads):
            raise ValueError("'engine' and 'threads' apply to a 'checkpoint' the gateway launches")
        bad = [u for u in self.urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"urls must start with http:// or https:// (got {bad[0]!r})")
        return self


class LimitsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_in_flight: Optional[int] = Field(default=256, ge=1)
    max_queue: int = Field(default=512, ge=0)
    queue_timeout_s: float = Field(default=60.0, gt=0)
    client_timeout_s: float = Field(default=60.0, gt=0)  # to send a request; to resume reading a stalled stream
    engine_timeout_s: float = Field(default=600.0, gt=0)  # longest wait for an engine's next bytes (then 504)


class GatewayConfig(BaseModel):
    """Everything ``qserve serve`` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    models: list[ModelSpec] = Field(min_length=1)
    api_keys: Optional[Path] = None
    keys: Optional[list[dict[str, Any]]] = None
    limits: LimitsSpec = LimitsSpec()
    log_dir: Optional[Path] = None
    max_body_bytes: int = Field(default=8 * 2**20, ge=1024)

    @model_validator(mode="after")
    def _unique_names(self) -> "GatewayConfig":
        names = [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}")
        return self

    @property
    def admission(self) -> AdmissionLimits:
        return AdmissionLimits(self.limits.max_in_flight, self.limits.max_queue, self.limits.queue_timeout_s)


def load_config(path: Path, overrides: Optional[dict[str, Any]] = None) -> GatewayConfig:
    """The config in ``path`` (YAML or JSON), ``overrides`` (e.g. options given on the command line) on top;
    relative checkpoint, key-file and log paths are taken from the config file's folder."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the gateway config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'models:' list (see `qserve serve --help`)")
    base = Path(path).resolve().parent
    for model in data.get("models") or []:
        if isinstance(model, dict) and isinstance(model.get("checkpoint"), str):
            local = base / model["checkpoint"]
            if local.exists():  # else a demo model name or a hub id, resolved at start
                model["checkpoint"] = str(local)
    for field in ("api_keys", "log_dir"):
        if isinstance(data.get(field), str):
            data[field] = str(base / data[field])
    return validate_config({**data, **(overrides or {})}, str(path))


def validate_config(data: dict[str, Any], where: str = "config") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None


DEFAULT_CONTEXT = 4096  # tokens an engine is started with when the config names none


def build_backends(config: GatewayConfig, resolve: Callable[[str], Path], free_port: Callable[[], int],
                   log_dir: Path) -> list[Backend]:
    """One ``Backend`` per replica: engines to launch (checkpoints resolved by ``resolve``, each on a
    ``free_port()``, each with its own log) and external URLs."""
    backends, stamp = [], time.strftime("%Y%m%d-%H%M%S")
    for spec in config.models:
        if spec.urls:
            for i, url in enumerate(spec.urls):
                name = spec.name if len(spec.urls) == 1 else f"{spec.name}-{i}"
                backends.append(Backend.external(spec.name, url, name=name, max_model_len=spec.max_model_len,
                                                 upstream_model=spec.served_model_name,
                                                 api_key=os.environ.get(spec.api_key_env or "")))
            continue
        checkpoint = resolve(spec.checkpoint)
        kind = spec.engine or engine_for(checkpoint)
        _check_engine_options(spec, kind, checkpoint)
        for i in range(spec.replicas):
            name = spec.name if spec.replicas == 1 else f"{spec.name}-{i}"
            engine = EngineConfig(model_dir=checkpoint, served_name=spec.name, port=free_port(),
                                  max_model_len=spec.max_model_len or _default_context(checkpoint),
                                  enforce_eager=spec.enforce_eager,
                                  extra_args=tuple(spec.engine_args), env=tuple(spec.env.items()),
                                  log_path=log_dir / f"{kind}-{name}-{stamp}.log", engine=kind, threads=spec.threads)
            backends.append(Backend.launched(engine, name=name))
    return backends


def _default_context(checkpoint: Path, ceiling: int = DEFAULT_CONTEXT) -> int:
    """The context an engine gets unless the config says: ``ceiling``, or the model's own when it is shorter
    (vLLM refuses a longer one: "User-specified max_model_len ... is greater than the derived max_model_len")."""
    config = checkpoint / "config.json" if checkpoint.is_dir() else None
    if config is None or not config.exists():
        return ceiling
    trained = json.loads(config.read_text()).get("max_position_embeddings")
    return min(ceiling, int(trained)) if isinstance(trained, (int, float)) and trained > 0 else ceiling


def _check_engine_options(spec: ModelSpec, kind: str, checkpoint: Path) -> None:
    """The engine serves the checkpoint, and no option of the other engine was given (none is ignored silently)."""
    if not ENGINES[kind].accepts(checkpoint):
        raise ConfigError(f"model {spec.name}: engine {kind} does not serve {checkpoint} (llama.cpp serves a .gguf "
                          f"file, vLLM a checkpoint directory)")
    if spec.threads and kind != "llamacpp":
        raise ConfigError(f"model {spec.name}: 'threads' is a llama.cpp option, and {checkpoint} is served by {kind} "
                          f"(vLLM-CPU takes its threads from the environment)")
    if spec.enforce_eager is not None and kind != "vllm":
        raise ConfigError(f"model {spec.name}: 'enforce_eager' is a vLLM option, and {checkpoint} is served by {kind} "
                          f"(llama.cpp has no compile step to skip)")
