"""Atomic output directories and files: a failed write leaves nothing behind, an existing output stays intact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    """The output directory exists and overwriting was not asked for."""


def writable_output(out: Path, force: bool) -> Path:
    """``out``, once it is known that it may be written (absent, or ``force``); its parent is created."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside ``out`` that becomes ``out`` only if the block succeeds."""
    out = writable_output(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
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
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; a model file is meant to be shared
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(out: Path, text: str) -> None:
    """Writes ``text`` to ``out`` (replacing it) so that a reader sees the old file or the new, never a part."""
    with atomic_output_file(out, force=True) as tmp:
        tmp.write_text(text)
