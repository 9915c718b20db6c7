"""A bridge to lm-evaluation-harness for its full task list: it runs ``lm_eval`` with its
``local-completions`` model against the served endpoint, where the harness is installed."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import httpx

from core.client import (API_KEY_ENV, EndpointError, auth_error, auth_headers, base_url, check_endpoint, error_text,
                         resolve_api_key)


def lm_eval_command(url: str, model: str, tokenizer: str, tasks: str, concurrency: int = 4,
                    limit: Optional[int] = None, output: Optional[Path] = None) -> list[str]:
    """The ``lm_eval`` command line that scores ``tasks`` through ``url``'s completions endpoint (the API key
    is not in it: ``local-completions`` reads ``$OPENAI_API_KEY``, and a command line is visible to all)."""
    base = base_url(url)
    model_args = (f"model={model},base_url={base}/v1/completions,tokenizer={tokenizer},"
                  f"tokenized_requests=True,num_concurrent={concurrency},max_retries=3")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", tasks, "--batch_size", "1"]
    if limit:
        cmd += ["--limit", str(limit)]
    if output:
        cmd += ["--output_path", str(output)]
    return cmd


async def _preflight(url: str, model: Optional[str], api_key: str) -> str:
    """The model to evaluate, after one 1-token completion has shown that the key is accepted: the
    harness would otherwise retry every refused request and end in a traceback."""
    url = base_url(url)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0), headers=auth_headers(api_key)) as client:
        model = await check_endpoint(client, url, model)
        try:
            resp = await client.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
        except httpx.HTTPError:
            return model  # not an authentication question: the harness reports what it finds
    refused = auth_error(f"{url}/v1/completions", resp.status_code, error_text(resp.status_code, resp.content),
                         api_key)
    if refused:
        raise refused
    return model


def run_lm_eval(url: str, model: Optional[str], tokenizer: str, tasks: str, concurrency: int = 4,
                limit: Optional[int] = None, output: Optional[Path] = None, api_key: Optional[str] = None) -> int:
    """Runs lm-evaluation-harness (its own output goes to the terminal); returns its exit status.
    ``model`` None evaluates the first served model; ``api_key`` defaults to ``$OPENAI_API_KEY``."""
    if importlib.util.find_spec("lm_eval") is None:
        raise EndpointError("lm-evaluation-harness is not installed in this environment: "
                            "pip install 'lm-eval[api]', then run again (the built-in tasks need no install)")
    key = resolve_api_key(api_key)
    model = asyncio.run(_preflight(url, model or None, key))
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if key:
        env[API_KEY_ENV] = key
    return subprocess.call(lm_eval_command(url, model, tokenizer, tasks, concurrency, limit, output), env=env)
