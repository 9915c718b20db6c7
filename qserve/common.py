"""What every command shares: user-facing errors as one line, JSON output."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

F = TypeVar("F", bound=Callable)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The error types whose message is meant for the user as it is (each says how to fix it)."""
    from core.atomic import OutputExistsError
    from core.models import ModelError
    from core.client import EndpointError
    from loadtest.workloads import WorkloadError
    from quantize.calibration import CalibrationError
    from quantize.methods import MethodError
    from accuracy.tasks import TaskError
    from core.schemes import SchemeError
    from serving.engine import EngineStartError
    from serving.config import ConfigError
    from serving.keys import KeyFileError
    from serving.server import ServeError

    return (OutputExistsError, ModelError, EndpointError, MethodError, SchemeError, CalibrationError,
            EngineStartError, ServeError, FileNotFoundError, TaskError, WorkloadError, KeyFileError, ConfigError)


def user_errors(fn: F) -> F:
    """Turns the library's user-facing errors into one ``error:`` message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except Exception as exc:
            if isinstance(exc, _user_errors()):
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1)
            raise

    return wrapper  # type: ignore[return-value]


def write_json(path: Optional[Path], data: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
        typer.echo(f"saved {path}")
