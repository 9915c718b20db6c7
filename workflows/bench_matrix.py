"""``qserve bench`` matrices: YAML in, a validated list of cells out, before any work.

A matrix names a model, a baseline cell and cells. ``defaults`` apply to every cell; YAML anchors work as
YAML has them; a field given a list in a cell expands into one cell per value (``method: [rtn, gptq]`` x
``scheme: [w4a16, w8a8]`` is four cells), in the order written. ``overrides`` is a list by nature: a list
of lists expands it. Names are templates over the cell's fields (``"{scheme}-{method}"``). Every error
names the cell and the field.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

FLOAT_SCHEME = "float"  # a cell that serves the model as it is (the usual baseline)


class MatrixError(ValueError):
    """A matrix that cannot run; the message names the cell and the field, and what would be accepted."""


@dataclass(frozen=True)
class Target:
    """Where a cell is served: the engine and the layout it loads."""

    engine: str
    layout: str


# target name -> engine and layout (a new engine or layout is an entry here)
TARGETS: dict[str, Target] = {
    "vllm": Target("vllm", "compressed-tensors"),
    "vllm-gptq": Target("vllm", "gptq"),
    "vllm-awq": Target("vllm", "awq"),
    "vllm-dequantized": Target("vllm", "dequantized"),
    "llamacpp": Target("llamacpp", "gguf"),
}


@dataclass(frozen=True)
class Calibration:
    file: Optional[str] = None  # None: the shared WikiText-2 validation text
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Cell:
    """One recipe on one target: what is quantized, how, and where it is served."""

    name: str
    scheme: str = FLOAT_SCHEME
    method: str = "rtn"
    target: str = "vllm"
    group_size: Optional[int] = None
    asym: bool = False
    observer: Optional[str] = None
    rotate: Optional[str] = None
    kv_cache: Optional[str] = None
    overrides: tuple[str, ...] = ()
    calibration: Calibration = Calibration()

    @property
    def quantized(self) -> bool:
        return self.scheme != FLOAT_SCHEME

    def recipe(self) -> dict[str, Any]:
        """What determines the quantized checkpoint (the cache key's part from the cell): not its name or target."""
        data = dataclasses.asdict(self)
        for key in ("name", "target"):
            data.pop(key)
        return data


@dataclass(frozen=True)
class EvalSettings:
    windows: int = 20
    seq_len: int = 2048


@dataclass(frozen=True)
class LoadtestSettings:
    streams: tuple[int, ...] = (1, 8)
    input_len: int = 512
    output_len: int = 64
    requests: int = 16


@dataclass(frozen=True)
class Matrix:
    model: str
    baseline: str
    cells: tuple[Cell, ...]
    eval: EvalSettings = EvalSettings()
    loadtest: LoadtestSettings = LoadtestSettings()

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


CELL_FIELDS = {f.name for f in dataclasses.fields(Cell)}
LIST_FIELDS = {"overrides"}  # lists by nature: a list of lists expands them
TOP_FIELDS = {"model", "baseline", "defaults", "cells", "eval", "loadtest"}


def _section(raw: Any, cls: type, where: str) -> Any:
    """A settings dataclass from a mapping, refusing unknown keys."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise MatrixError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise MatrixError(f"{where}: unknown field {unknown[0]!r}; fields: {', '.join(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise MatrixError(f"{where}: {exc}") from None


def _expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells a spec stands for: the product of its list-valued fields, in the order written."""
    axes = [(k, v) for k, v in spec.items()
            if isinstance(v, list) and (k not in LIST_FIELDS or (v and all(isinstance(x, list) for x in v)))]
    if not axes:
        return [spec]
    keys = [k for k, _ in axes]
    return [{**spec, **dict(zip(keys, combo))} for combo in itertools.product(*(v for _, v in axes))]


def _cell(spec: dict[str, Any], index: int) -> Cell:
    unknown = sorted(set(spec) - CELL_FIELDS)
    label = f"cell {index + 1}" + (f" ({spec['name']})" if isinstance(spec.get("name"), str) else "")
    if unknown:
        raise MatrixError(f"{label}: unknown field {unknown[0]!r}; fields: {', '.join(sorted(CELL_FIELDS))}")
    values = dict(spec)
    values["calibration"] = _section(values.get("calibration"), Calibration, f"{label}: calibration")
    values["overrides"] = tuple(values.get("overrides") or ())
    template = str(values.get("name") or "{scheme}-{method}-{target}")
    defaults = {f.name: f.default for f in dataclasses.fields(Cell) if f.default is not dataclasses.MISSING}
    try:
        values["name"] = template.format(**{**defaults, **{k: v for k, v in values.items() if k != "name"}})
    except (KeyError, IndexError) as exc:
        raise MatrixError(f"{label}: name {template!r} refers to {exc}, which is not a field") from None
    try:
        cell = Cell(**values)
    except TypeError as exc:
        raise MatrixError(f"{label}: {exc}") from None
    _check_cell(cell, label)
    return cell


def _check_cell(cell: Cell, label: str) -> None:
    """Names the first field that cannot work, before anything runs."""
    from core.schemes import SchemeError, get_scheme, parse_override
    from quantize.methods import MethodError, parse_recipe

    if cell.target not in TARGETS:
        raise MatrixError(f"{label}: target {cell.target!r} is not one of {', '.join(TARGETS)}")
    if not cell.quantized:
        return
    checks = [("scheme", lambda: get_scheme(cell.scheme, cell.group_size)), ("method", lambda: parse_recipe(cell.method)),
              *(("overrides", lambda o=o: parse_override(o)) for o in cell.overrides)]
    for name, check in checks:
        try:
            check()
        except (SchemeError, MethodError) as exc:
            raise MatrixError(f"{label}: {name}: {exc}") from None
    if TARGETS[cell.target].layout == "gguf" and not cell.scheme.startswith("gguf-"):
        raise MatrixError(f"{label}: target llamacpp takes a GGUF block scheme (gguf-q4_0, gguf-q4_1, gguf-q8_0), "
                          f"not {cell.scheme!r}")


def parse_matrix(raw: Any, source: str = "matrix") -> Matrix:
    """A validated matrix from parsed YAML (a mapping)."""
    if not isinstance(raw, dict):
        raise MatrixError(f"{source}: expected a mapping with model, cells and optionally baseline, defaults, eval, "
                          f"loadtest")
    unknown = sorted(set(raw) - TOP_FIELDS)
    if unknown:
        raise MatrixError(f"{source}: unknown field {unknown[0]!r}; fields: {', '.join(sorted(TOP_FIELDS))}")
    if not raw.get("model") or not raw.get("cells"):
        raise MatrixError(f"{source}: needs a model and at least one cell")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict) or not isinstance(raw["cells"], list):
        raise MatrixError(f"{source}: defaults is a mapping and cells a list")
    specs = [s for cell in raw["cells"] for s in _expand({**defaults, **(cell if isinstance(cell, dict) else {})})]
    cells = tuple(_cell(spec, i) for i, spec in enumerate(specs))
    seen: dict[str, int] = {}
    for i, cell in enumerate(cells):
        if cell.name in seen:
            raise MatrixError(f"cell {i + 1}: name {cell.name!r} is also cell {seen[cell.name] + 1}'s; give the "
                              f"cells distinct names (a template such as '{{scheme}}-{{method}}')")
        seen[cell.name] = i
    baseline = raw.get("baseline") or cells[0].name
    if baseline not in seen:
        raise MatrixError(f"{source}: baseline {baseline!r} is not a cell; cells: {', '.join(seen)}")
    return Matrix(str(raw["model"]), baseline, cells, _section(raw.get("eval"), EvalSettings, "eval"),
                  _section(raw.get("loadtest"), LoadtestSettings, "loadtest"))


def load_matrix(path: Path) -> Matrix:
    """Reads and validates a matrix file."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise MatrixError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise MatrixError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_matrix(raw, str(path))
