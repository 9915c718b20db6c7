"""What every command shares: user-facing errors as one line, JSON output, renamed options kept working
with a deprecation line, and ``-o`` as a directory."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import typer

F = TypeVar("F", bound=Callable)
T = TypeVar("T")


class OptionError(ValueError):
    """Options that do not go together, or that do not apply; the message names them and what to do."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The error types whose message is meant for the user as it is (each says how to fix it)."""
    from core.atomic import OutputExistsError, OutputSpaceError
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
    from workflows.bench.executors import ExecutorError
    from workflows.bench.matrix import MatrixError
    from workflows.bench.report import ConstraintError

    return (OptionError, OutputExistsError, OutputSpaceError, ModelError, EndpointError, MethodError, SchemeError,
            CalibrationError, EngineStartError, ServeError, FileNotFoundError, TaskError, WorkloadError, KeyFileError,
            ConfigError, MatrixError, ExecutorError, ConstraintError)


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


# what the OpenAI SDK reads when no key is given (core.client.API_KEY_ENV; not imported: --help stays light)
API_KEY_HELP = ("API key, sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, as the OpenAI SDK reads "
                "it). Never printed.")


def write_json(path: Optional[Path], data: dict) -> None:
    """Writes ``data`` as indented JSON to ``path`` (when given), creating its directory, and says so."""
    if path:
        write_text(path, json.dumps(data, indent=2))


def write_text(path: Optional[Path], text: str) -> None:
    """Writes ``text`` to ``path`` (when given), creating its directory, and says so."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        typer.echo(f"saved {path}")


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (stdout stays the command's output)."""
    typer.echo(f"warning: {message}", err=True)


def deprecated_option(old: str, new: str) -> Any:
    """A hidden option that keeps a renamed option's old spelling ``old`` parsing; :func:`renamed` maps its
    value onto ``new``. Declared beside the new option: ``model: Optional[str] = deprecated_option(...)``."""
    return typer.Option(None, old, hidden=True, help=f"Deprecated: use {new}.", show_default=False)


def renamed(value: Optional[T], old_value: Optional[T], old: str, new: str) -> Optional[T]:
    """The value of option ``new``, or of its deprecated spelling ``old`` with a one-line warning; both
    given is an error (which one was meant is not for us to guess)."""
    if old_value is None:
        return value
    if value is not None:
        raise OptionError(f"{old} is the deprecated spelling of {new}: give {new} only")
    warn(f"{old} is deprecated; use {new}")
    return old_value


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters given on the command line (not defaults, not the environment)."""
    # compared by name: typer may hand back its own click's ParameterSource enum
    return {p for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"}


def flags(ctx: typer.Context, names: Iterable[str]) -> list[str]:
    """The command-line spelling (``--seq-len``) of parameters, in the command's order."""
    wanted = set(names)
    return [max(p.opts, key=len) for p in ctx.command.params if p.name in wanted and p.opts]


def refuse_options(ctx: typer.Context, names: Iterable[str], reason: str) -> None:
    """Fails in one line when any of ``names`` was given: they do not apply, for ``reason`` (where
    ``{them}`` becomes "it" or "them")."""
    given = flags(ctx, given_options(ctx) & set(names))
    if given:
        verb, them = ("does", "it") if len(given) == 1 else ("do", "them")
        raise OptionError(f"{', '.join(given)} {verb} not apply {reason.format(them=them)}")


def output_files(output: Optional[Path], named: dict[str, Optional[Path]], defaults: dict[str, str],
                 legacy: tuple[str, str]) -> dict[str, Optional[Path]]:
    """Where each report goes: a file option (``named``, by flag) wins for its report; ``-o DIR`` places
    every other report in DIR under its ``defaults`` name. An old-style ``-o FILE`` ending in
    ``legacy[0]`` still means file option ``legacy[1]``, with a deprecation line."""
    suffix, flag = legacy
    if output is not None and output.suffix.lower() == suffix:
        if named[flag] is not None:
            raise OptionError(f"-o {output} and {flag} {named[flag]} both name the {suffix} file: -o takes a "
                              f"directory; give {flag} only")
        warn(f"-o {output}: -o now takes a directory; use {flag} {output} for one {suffix} file")
        return {**named, flag: output}
    if output is not None and output.exists() and not output.is_dir():
        raise OptionError(f"-o {output} is a file: -o takes a directory (for single files use "
                          f"{', '.join(named)})")
    return {f: path if path is not None or output is None else output / defaults[f] for f, path in named.items()}
