"""Shared by the load tester and the accuracy client: the base URL, the endpoint check, error text."""

from __future__ import annotations

import json

import httpx


class EndpointError(RuntimeError):
    """The endpoint cannot be used as asked; the message says what to check."""


def base_url(url: str) -> str:
    """The server's root URL, whether it was given with or without the ``/v1`` suffix."""
    return url.rstrip("/").removesuffix("/v1")


async def check_endpoint(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    """Fails fast on an unreachable URL or unknown model; returns the model to use."""
    try:
        resp = await client.get(f"{base_url}/v1/models", timeout=10.0)
    except httpx.HTTPError as exc:
        raise EndpointError(f"cannot reach {base_url} ({type(exc).__name__}); is the server running?") from None
    if resp.status_code != 200:
        raise EndpointError(f"{base_url}/v1/models answered {resp.status_code}: {resp.text[:200]}")
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
