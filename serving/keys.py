"""API keys: stored hashed, each with optional requests- and tokens-per-minute limits and a model allow-list.

A key file (YAML or JSON)::

    keys:
      - id: team-a
        sha256: 9f86d0...        # hex SHA-256 of the key (``qserve keys new`` prints one), or
        # key: sk-...            # the key itself, hashed on load and never kept
        rpm: 60                  # requests per minute (optional)
        tpm: 100000              # prompt + completion tokens per minute (optional)
        models: [w8a8, bf16]     # allowed models (optional: all)

``QSERVE_API_KEY`` in the environment adds one key (id ``env``) with no limits, like ``VLLM_API_KEY``.
With no key configured the gateway is open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from serving.errors import APIError

WINDOW_S = 60.0


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the entry and what to fix."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class APIKey:
    """One client's key (as its hash) and what it may do."""

    id: str
    sha256: str
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    models: Optional[frozenset[str]] = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass
class _Usage:
    """Requests and tokens of one key over the last minute."""

    requests: deque = field(default_factory=deque)  # send times
    tokens: deque = field(default_factory=deque)  # (time, tokens)
    token_total: int = 0

    def expire(self, now: float) -> None:
        while self.requests and now - self.requests[0] >= WINDOW_S:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0][0] >= WINDOW_S:
            self.token_total -= self.tokens.popleft()[1]


def _entry(raw: Any, where: str) -> APIKey:
    if not isinstance(raw, dict) or not raw.get("id"):
        raise KeyFileError(f"{where}: each key needs an 'id' (and 'sha256' or 'key')")
    digest = raw.get("sha256") or (key_hash(str(raw["key"])) if raw.get("key") else None)
    if not digest or len(digest) != 64:
        raise KeyFileError(f"{where} ({raw['id']}): give 'sha256' (64 hex digits) or 'key'")
    for limit in ("rpm", "tpm"):
        if raw.get(limit) is not None and (not isinstance(raw[limit], int) or raw[limit] <= 0):
            raise KeyFileError(f"{where} ({raw['id']}): '{limit}' must be a positive integer")
    models = raw.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise KeyFileError(f"{where} ({raw['id']}): 'models' must be a list of model names")
    return APIKey(str(raw["id"]), digest.lower(), raw.get("rpm"), raw.get("tpm"),
                  frozenset(models) if models is not None else None)


def parse_keys(entries: Any, where: str) -> list[APIKey]:
    """Key entries (``id``, ``sha256`` or ``key``, ``rpm``, ``tpm``, ``models``) as read from YAML."""
    if not isinstance(entries, list):
        raise KeyFileError(f"{where}: expected a top-level 'keys:' list")
    keys = [_entry(raw, f"{where}: keys[{i}]") for i, raw in enumerate(entries)]
    ids = [k.id for k in keys]
    if len(set(ids)) != len(ids):
        raise KeyFileError(f"{where}: key ids must be unique (found {sorted({i for i in ids if ids.count(i) > 1})})")
    return keys


class KeyRing:
    """Authenticates requests and keeps each key's per-minute limits."""

    def __init__(self, keys: list[APIKey]) -> None:
        self.keys = {k.sha256: k for k in keys}
        self.usage: dict[str, _Usage] = {k.id: _Usage() for k in keys}

    @classmethod
    def load(cls, path: Optional[Path] = None, env: Optional[dict[str, str]] = None,
             inline: Optional[list[Any]] = None) -> "KeyRing":
        """Keys from ``path`` (YAML/JSON), ``inline`` entries (a gateway config's ``keys:``) and
        ``QSERVE_API_KEY``; an empty ring leaves the gateway open."""
        import yaml

        keys: list[APIKey] = parse_keys(inline, "gateway config") if inline is not None else []
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise KeyFileError(f"cannot read the key file {path}: {exc}") from None
            keys += parse_keys(data.get("keys") if isinstance(data, dict) else None, str(path))
        ids = [k.id for k in keys]
        if len(set(ids)) != len(ids):
            raise KeyFileError(f"key ids must be unique across the key file and the config "
                               f"(found {sorted({i for i in ids if ids.count(i) > 1})})")
        env_key = (env if env is not None else os.environ).get("QSERVE_API_KEY")
        if env_key:
            keys.append(APIKey("env", key_hash(env_key)))
        return cls(keys)

    @property
    def open(self) -> bool:
        return not self.keys

    def identify(self, authorization: Optional[str]) -> Optional[APIKey]:
        """The key of an ``Authorization: Bearer KEY`` header (401 if missing or unknown); None when open."""
        if self.open:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="missing_api_key")
        digest = key_hash(token.strip())
        key = next((k for h, k in self.keys.items() if hmac.compare_digest(h, digest)), None)
        if key is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return key

    def admit(self, key: Optional[APIKey], model: str) -> None:
        """Lets ``key`` use ``model`` now (403 outside its allow-list, 429 over a per-minute limit)."""
        if key is None:
            return
        if not key.allows(model):
            raise APIError(403, f"key {key.id!r} may not use model {model!r}; it may use: "
                                f"{', '.join(sorted(key.models or ()))}", param="model", code="model_not_allowed")
        now = time.monotonic()
        usage = self.usage[key.id]
        usage.expire(now)
        if key.rpm is not None and len(usage.requests) >= key.rpm:
            wait = WINDOW_S - (now - usage.requests[0])
            raise APIError(429, f"key {key.id!r} is over its limit of {key.rpm} requests per minute; retry in "
                                f"{wait:.0f} s", code="rate_limit_requests", headers={"Retry-After": str(max(1, round(wait)))})
        if key.tpm is not None and usage.token_total >= key.tpm:
            wait = WINDOW_S - (now - usage.tokens[0][0])
            raise APIError(429, f"key {key.id!r} is over its limit of {key.tpm} tokens per minute; retry in "
                                f"{wait:.0f} s", code="rate_limit_tokens", headers={"Retry-After": str(max(1, round(wait)))})
        usage.requests.append(now)

    def record_tokens(self, key: Optional[APIKey], tokens: int) -> None:
        """Counts a finished request's prompt + completion tokens against its key's minute."""
        if key is not None and tokens:
            usage = self.usage[key.id]
            usage.tokens.append((time.monotonic(), tokens))
            usage.token_total += tokens
