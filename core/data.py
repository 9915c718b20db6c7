"""Where the shared evaluation and calibration data live: ``$QSERVE_DATA`` or ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return Path(os.environ.get("QSERVE_DATA", default))


def data_file(name: str) -> Path:
    """A file of the shared data directory, with a message naming the override when it is missing."""
    path = data_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; set QSERVE_DATA to the folder holding {name} "
                                f"or pass a file path explicitly")
    return path
