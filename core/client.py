"""Shared by the load tester and the accuracy client: the base URL, the API key, the endpoint check,
error text."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import httpx

API_KEY_ENV = "OPENAI_API_KEY"  # read as the OpenAI SDK reads it: when no key is given
AUTH_HINT = f"pass the key with --api-key or set {API_KEY_ENV}"


class EndpointError(RuntimeError):
    """The endpoint cannot be used as asked; the message says what to check."""


def base_url(url: str) -> str:
    """The server's root URL, whether it was given with or without the ``/v1`` suffix."""
    return url.rstrip("/").removesuffix("/v1")


def resolve_api_key(api_key: Optional[str], env: Optional[Mapping[str, str]] = None) -> str:
    """The key to send: ``api_key`` when given (``""`` sends none), else ``$OPENAI_API_KEY``, else ``""``.

    Surrounding whitespace is dropped: a key read with ``$(cat key.txt)`` keeps its newline, which no
    HTTP header may carry.
    """
    if api_key is None:
        api_key = (os.environ if env is None else env).get(API_KEY_ENV, "")
    return api_key.strip()


def auth_headers(api_key: Optional[str]) -> dict[str, str]:
    """``Authorization: Bearer KEY`` for a key, nothing without one."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def sent_key(client: httpx.AsyncClient) -> str:
    """The key ``client`` sends with every request (``""`` for none)."""
    return client.headers.get("Authorization", "").removeprefix("Bearer ")


def redact(text: str, api_key: Optional[str]) -> str:
    """``text`` with the key masked, for servers that echo a refused key back in their error message."""
    return text.replace(api_key, "***") if api_key else text


def auth_error(url: str, status: int, said: str, api_key: Optional[str]) -> Optional[EndpointError]:
    """For a 401 or 403 (``said``: the server's answer, as :func:`error_text` gives it): the error that says
    how to authenticate, the key itself never shown; else None."""
    if status not in (401, 403):
        return None
    said = redact(said, api_key)
    if status == 403:
        return EndpointError(f"{url} refused the key ({said}): use a key allowed for this model")
    if api_key:
        return EndpointError(f"{url} refused the API key ({said}): check the key given with --api-key "
                             f"or in {API_KEY_ENV}")
    return EndpointError(f"{url} requires an API key ({said}): {AUTH_HINT}")


async def check_endpoint(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    """Fails fast on an unreachable URL, a refused key or an unknown model; returns the model to use."""
    try:
        resp = await client.get(f"{base_url}/v1/models", timeout=10.0)
    except httpx.HTTPError as exc:
        raise EndpointError(f"cannot reach {base_url} ({type(exc).__name__}); is the server running?") from None
    key = sent_key(client)
    refused = auth_error(f"{base_url}/v1/models", resp.status_code, error_text(resp.status_code, resp.content), key)
    if refused:
        raise refused
    if resp.status_code != 200:
        raise EndpointError(f"{base_url}/v1/models answered {resp.status_code}: {redact(resp.text[:200], key)}")
    names = [m["id"] for m in resp.json().get("data", [])]
    if model is None:
        if not names:
            raise EndpointError(f"{base_url} serves no models")
        return names[0]
    if model not in names:
        raise EndpointError(f"model {model!r} is not served at {base_url}; it serves: {', '.join(names)}")
    return model


def error_text(status: int, body: bytes) -> str:
    try:
        return f"{status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {body[:200].decode(errors='replace')}"
