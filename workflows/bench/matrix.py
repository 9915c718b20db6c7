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


DATA_PREFIX = "data:"  # a calibration file in the shared data directory (``data:lambada_openai_test.jsonl``)


@dataclass(frozen=True)
class Calibration:
    file: Optional[str] = None  # None: the shared WikiText-2 validation text; a path, data:NAME or hf:NAME
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def source(self) -> Optional[str]:
        """The file as the quantizer takes it: a ``data:`` name resolved in the shared data directory."""
        from core.data import data_file

        if self.file and self.file.startswith(DATA_PREFIX):
            return str(data_file(self.file[len(DATA_PREFIX):]))
        return self.file


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
    device: str = "cpu"  # where calibration runs ("cuda" on a GPU worker)
    cpus: float = 1.0  # what the cell asks of a Ray worker (the local executor runs cells one by one)
    gpus: float = 0.0
    loadtest: bool = True  # False: accuracy only (e.g. a dequantized cell, whose speed is the float model's)

    @property
    def quantized(self) -> bool:
        return self.scheme != FLOAT_SCHEME

    def recipe(self) -> dict[str, Any]:
        """What determines the quantized checkpoint (the cache key's part from the cell): not its name or target."""
        data = dataclasses.asdict(self)
        for key in ("name", "target", "cpus", "gpus", "loadtest"):
            data.pop(key)
        return data


@dataclass(frozen=True)
class EvalSettings:
    """What each cell is scored on through its endpoint: WikiText-2 perplexity, tasks, agreement with the
    baseline cell (top-1 and KL over the first ``agreement_windows`` windows, from ``top_k`` log-probabilities)."""

    windows: int = 20
    seq_len: int = 2048
    tasks: tuple[str, ...] = ()
    task_limit: Optional[int] = None  # items per task (None: all)
    agreement_windows: int = 4
    agreement_seq_len: int = 512
    top_k: int = 10


@dataclass(frozen=True)
class LoadtestSettings:
    streams: tuple[int, ...] = (1, 8)
    input_len: int = 512
    output_len: int = 64
    requests: int = 16
    prefill_requests: Optional[int] = None  # prefill-only requests (None: the load test's default)


@dataclass(frozen=True)
class Matrix:
    model: str
    baseline: str
    cells: tuple[Cell, ...]
    eval: EvalSettings = EvalSettings()
    loadtest: LoadtestSettings = LoadtestSettings()
    findings: Optional[str] = None  # a findings table computed from the cells (workflows.bench.findings)

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


CELL_FIELDS = {f.name for f in dataclasses.fields(Cell)}
LIST_FIELDS = {"overrides"}  # lists by nature: a list of lists expands them
TOP_FIELDS = {"model", "baseline", "defaults", "cells", "eval", "loadtest", "findings", "description"}


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
    from core.data import DataDirError

    try:
        source = cell.calibration.source()
    except DataDirError as exc:
        raise MatrixError(f"{label}: calibration: {exc}") from None
    if source and not source.startswith("hf:") and not Path(source).is_file():
        raise MatrixError(f"{label}: calibration: file {cell.calibration.file!r} does not exist; give a local text "
                          f"or JSONL file, data:NAME for a file in the shared data directory, or hf:NAME")
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
    evaluation = _section(raw.get("eval"), EvalSettings, "eval")
    _check_tasks(evaluation)
    findings = raw.get("findings")
    if findings is not None:
        from workflows.bench.findings import FINDINGS

        if findings not in FINDINGS:
            raise MatrixError(f"{source}: findings {findings!r} is not one of {', '.join(FINDINGS)}")
    return Matrix(str(raw["model"]), baseline, cells, evaluation, _section(raw.get("loadtest"), LoadtestSettings,
                                                                             "loadtest"), findings)


def _check_tasks(evaluation: EvalSettings) -> None:
    """Each task loads (a hub task is left to run time: it needs the network)."""
    from accuracy.tasks import TaskError, load_task

    for spec in evaluation.tasks:
        if not spec.startswith("hub:"):
            try:
                load_task(spec, limit=1)
            except TaskError as exc:
                raise MatrixError(f"eval: tasks: {exc}") from None


PRESETS_DIR = Path(__file__).with_name("presets")


def presets() -> list[str]:
    """The preset matrices shipped with qserve (``qserve bench --preset NAME``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_matrix(path: Path) -> Any:
    """A matrix file's YAML, parsed but not validated."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise MatrixError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise MatrixError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def preset_path(name: str) -> Path:
    if name not in presets():
        raise MatrixError(f"unknown preset {name!r}; presets: {', '.join(presets())}")
    return PRESETS_DIR / f"{name}.yaml"


def load_matrix(path: Path) -> Matrix:
    """Reads and validates a matrix file."""
    return parse_matrix(read_matrix(path), str(path))
