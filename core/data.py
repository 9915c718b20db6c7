"""Where the shared evaluation and calibration data live (WikiText-2, the task files).

They come from configuration, in this order: a folder given explicitly (a command's option), then
``$QSERVE_DATA``, then, in a source checkout only, ``../shared/data`` beside it. An installed qserve (the
Docker image) has no such folder next to its package, so there it must be configured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

DATA_ENV = "QSERVE_DATA"
_HOW = f"set {DATA_ENV} to the folder holding qserve's shared data (wikitext2-test.raw, ...)"


class DataDirError(FileNotFoundError):
    """No usable data folder; the message names ``QSERVE_DATA`` and how to set it."""


def checkout_data_dir() -> Optional[Path]:
    """``../shared/data`` beside the source checkout qserve runs from, when both exist; else None."""
    root = Path(__file__).resolve().parent.parent
    default = root.parent / "shared" / "data"
    # pyproject.toml marks a source checkout: installed into site-packages, ``root.parent`` is unrelated
    return default if (root / "pyproject.toml").is_file() and default.is_dir() else None


def data_dir(directory: Optional[Union[str, Path]] = None) -> Path:
    """The data folder: ``directory`` when given, else ``$QSERVE_DATA``, else the checkout's default.

    Raises ``DataDirError`` (one line, naming ``QSERVE_DATA``) when the chosen folder does not exist or
    none is configured."""
    if directory:
        path, source = Path(directory).expanduser(), f"the data folder {directory}"
    elif os.environ.get(DATA_ENV):
        path, source = Path(os.environ[DATA_ENV]).expanduser(), f"{DATA_ENV}={os.environ[DATA_ENV]}"
    else:
        found = checkout_data_dir()
        if found is None:
            raise DataDirError(f"no data folder configured: {_HOW}, e.g. `export {DATA_ENV}=/data`, "
                               f"or pass a file path explicitly")
        return found
    if not path.is_dir():
        raise DataDirError(f"{source} is not a folder; {_HOW}")
    return path


def data_file(name: str, directory: Optional[Union[str, Path]] = None) -> Path:
    """A file of the data folder (see ``data_dir``), with a one-line message when it is missing."""
    folder = data_dir(directory)
    path = folder / name
    if not path.exists():
        raise DataDirError(f"{name} is not in the data folder {folder}; {_HOW}, or pass a file path explicitly")
    return path
