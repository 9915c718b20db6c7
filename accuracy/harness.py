"""A bridge to lm-evaluation-harness for its full task list: it runs ``lm_eval`` with its
``local-completions`` model against the served endpoint, where the harness is installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Optional

from core.client import EndpointError, base_url


def lm_eval_command(url: str, model: str, tokenizer: str, tasks: str, concurrency: int = 4,
                    limit: Optional[int] = None, output: Optional[Path] = None) -> list[str]:
    """The ``lm_eval`` command line that scores ``tasks`` through ``url``'s completions endpoint."""
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


def run_lm_eval(url: str, model: str, tokenizer: str, tasks: str, concurrency: int = 4,
                limit: Optional[int] = None, output: Optional[Path] = None) -> int:
    """Runs lm-evaluation-harness (its own output goes to the terminal); returns its exit status."""
    if importlib.util.find_spec("lm_eval") is None:
        raise EndpointError("lm-evaluation-harness is not installed in this environment: "
                            "pip install 'lm-eval[api]', then run again (the built-in tasks need no install)")
    return subprocess.call(lm_eval_command(url, model, tokenizer, tasks, concurrency, limit, output))
