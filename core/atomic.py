"""Atomic output directories and files: a failed write leaves nothing behind, an existing output stays intact.

The temporary beside the output is named after the process writing it (``.NAME.tmp-PID-…``): a process killed
outright (SIGKILL, out of memory) cannot remove it, so the next write of the same output removes the ones whose
process is gone."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    """The output directory exists and overwriting was not asked for."""


class OutputSpaceError(OSError):
    """The output's file system has too little space for it (checked up front, or it ran out while writing)."""


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _free_mib(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 2**20


def check_free_space(out: Path, needed_bytes: int, what: str) -> None:
    """Refuses, before any heavy work, an output that will not fit where it goes (``needed_bytes``: an estimate
    of the most it will occupy while it is written)."""
    folder = next(p for p in [Path(out).absolute(), *Path(out).absolute().parents] if p.exists())
    free_mib = _free_mib(folder)
    if needed_bytes / 2**20 > free_mib:
        raise OutputSpaceError(f"{what} needs about {needed_bytes / 2**20:.1f} MiB and {folder} has "
                               f"{free_mib:.1f} MiB free; free some space or choose another -o")


@contextlib.contextmanager
def _space_errors(out: Path) -> Iterator[None]:
    """A full disk or quota while ``out`` is written, as one line that says so (the caller removes the rest)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in OUT_OF_SPACE:
            raise
        raise OutputSpaceError(f"no space left on the device of {out.parent} while writing {out.name} "
                               f"({_free_mib(out.parent):.1f} MiB free); nothing was kept: free some space or "
                               f"choose another -o") from None


def writable_output(out: Path, force: bool) -> Path:
    """``out``, once it is known that it may be written (absent, or ``force``); its parent is created."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Removes what killed writers of ``out`` left beside it (their process is gone); returns what it removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-(\d+)-")
    stale = [p for p in out.parent.glob(f".{out.name}.tmp-*")
             if (m := pattern.match(p.name)) and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside ``out`` that becomes ``out`` only if the block succeeds."""
    out = writable_output(out, force)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        with _space_errors(out):
            yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_file(out: Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``out`` that becomes ``out`` only if the block succeeds."""
    out = writable_output(out, force)
    remove_stale_temporaries(out)
    handle, name = tempfile.mkstemp(prefix=_temp_prefix(out), dir=out.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        with _space_errors(out):
            yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; a model file is meant to be shared
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(out: Path, text: str) -> None:
    """Writes ``text`` to ``out`` (replacing it) so that a reader sees the old file or the new, never a part."""
    with atomic_output_file(out, force=True) as tmp:
        tmp.write_text(text)
