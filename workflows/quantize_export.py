"""``qserve quantize --layout gguf``: quantize, then write the single-file layout, in one step."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from core.atomic import writable_output
from core.schemes import Scheme
from exporters.convert import export_checkpoint
from exporters.gguf_file import check_exportable
from quantize.pipeline import QuantizeOptions, QuantizeReport, quantize_checkpoint

PREFLIGHT: dict[str, Callable[[Path, Scheme], None]] = {"gguf": check_exportable}


def quantize_to_file(model_dir: Path, scheme: Scheme, method: str, out_file: Path, layout: str, force: bool = False,
                     log: Callable[[str], None] = print, options: QuantizeOptions = QuantizeOptions()) -> QuantizeReport:
    """Quantizes ``model_dir`` and writes it as ``out_file`` in ``layout`` (one of ``FILE_TARGETS``); what cannot be
    written is refused before calibration starts, and the intermediate checkpoint is removed afterwards."""
    out_file = writable_output(out_file, force)
    PREFLIGHT[layout](Path(model_dir), scheme)
    work = Path(tempfile.mkdtemp(prefix=f".{out_file.name}.ckpt-", dir=out_file.parent))
    try:
        report = quantize_checkpoint(model_dir, scheme, method, work / "checkpoint", log=log, options=options)
        export_checkpoint(work / "checkpoint", layout, out_file, force=force, log=log)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
