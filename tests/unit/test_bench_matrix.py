"""Bench matrices: defaults, anchors and list expansion make the cells written; a matrix that cannot run fails
before any work, naming the cell and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflows.bench.matrix import MatrixError, load_matrix, parse_matrix, preset_path, presets

MATRIX = """
model: smollm2-135m
baseline: bf16
defaults: &calibrated
  calibration: {num_samples: 32}
eval: {windows: 4}
cells:
  - {name: bf16, scheme: float}
  - name: "{scheme}-{method}"
    scheme: [w4a16, w8a8]
    method: [rtn, gptq, awq]
  - <<: *calibrated
    name: down8-{method}
    scheme: w4a16
    method: gptq
    overrides: ["re:.*down_proj$=w8a16"]
  - {name: q4_0, scheme: gguf-q4_0, method: awq+gptq, target: llamacpp}
"""


def test_lists_expand_into_the_product_in_the_order_written(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX)
    matrix = load_matrix(path)
    names = [c.name for c in matrix.cells]
    assert names[:7] == ["bf16", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a8-rtn", "w8a8-gptq", "w8a8-awq"]
    assert len(matrix.cells) == 1 + 6 + 1 + 1
    assert matrix.cell("down8-gptq").overrides == ("re:.*down_proj$=w8a16",)  # one list: one set, not two cells
    assert matrix.baseline == "bf16" and matrix.eval.windows == 4
    assert all(c.calibration.num_samples == 32 for c in matrix.cells)  # defaults reach every cell
    assert matrix.cell("q4_0").target == "llamacpp" and not matrix.cell("bf16").quantized


def test_the_same_name_twice_is_refused(tmp_path):
    raw = {"model": "m", "cells": [{"name": "down8-{method}", "scheme": "w4a16", "method": "gptq",
                                    "overrides": [["re:.*down_proj$=w8a16"], []]}]}
    with pytest.raises(MatrixError, match=r"cell 2: name 'down8-gptq' is also cell 1's"):
        parse_matrix(raw)


@pytest.mark.parametrize("cell, message", [
    ({"scheme": "w4a16", "methd": "gptq"}, r"cell 1: unknown field 'methd'"),
    ({"scheme": "w5a16"}, r"cell 1 \(x\): scheme: unknown scheme 'w5a16'"),
    ({"scheme": "w4a16", "method": "gptq+awq"}, r"cell 1 \(x\): method:"),
    ({"scheme": "w4a16", "target": "tgi"}, r"target 'tgi' is not one of vllm"),
    ({"scheme": "w4a16", "target": "llamacpp"}, r"target llamacpp takes a GGUF block scheme"),
    ({"scheme": "w4a16", "calibration": {"samples": 3}}, r"calibration: unknown field 'samples'"),
    ({"scheme": "w4a16", "overrides": ["down_proj"]}, r"overrides:"),
])
def test_bad_cells_are_refused_naming_cell_and_field(cell, message):
    with pytest.raises(MatrixError, match=message):
        parse_matrix({"model": "m", "cells": [{"name": "x", **cell} if "methd" not in cell else cell]})


def test_bad_matrices_are_refused(tmp_path):
    with pytest.raises(MatrixError, match="baseline 'fp16' is not a cell"):
        parse_matrix({"model": "m", "baseline": "fp16", "cells": [{"name": "bf16"}]})
    with pytest.raises(MatrixError, match="eval: tasks: unknown task 'arc_hard'"):  # before any cell runs
        parse_matrix({"model": "m", "cells": [{"name": "bf16"}], "eval": {"tasks": ["arc_hard"]}})
    with pytest.raises(MatrixError, match="eval: unknown field 'limit'"):
        parse_matrix({"model": "m", "cells": [{"name": "bf16"}], "eval": {"limit": 3}})
    with pytest.raises(MatrixError, match="findings 'gptq-paper' is not one of llmc"):
        parse_matrix({"model": "m", "cells": [{"name": "bf16"}], "findings": "gptq-paper"})
    with pytest.raises(MatrixError, match=r"cell 1 \(x\): calibration: c4.jsonl is not in the data folder"):
        parse_matrix({"model": "m", "cells": [{"name": "x", "scheme": "w4a16", "method": "gptq",
                                               "calibration": {"file": "data:c4.jsonl"}}]})
    with pytest.raises(MatrixError, match="unknown field 'cell'"):
        parse_matrix({"model": "m", "cell": []})
    with pytest.raises(MatrixError, match="needs a model and at least one cell"):
        parse_matrix({"model": "m", "cells": []})
    with pytest.raises(MatrixError, match="name '{size}' refers to 'size'"):
        parse_matrix({"model": "m", "cells": [{"name": "{size}"}]})
    (tmp_path / "bad.yaml").write_text("cells: [")
    with pytest.raises(MatrixError, match="not valid YAML"):
        load_matrix(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", presets())
def test_every_preset_is_a_valid_matrix(name):
    matrix = load_matrix(preset_path(name))
    assert matrix.baseline == matrix.cells[0].name and not matrix.cells[0].quantized


def test_data_calibration_files_resolve_in_the_shared_data(tmp_path):
    matrix = parse_matrix({"model": "m", "cells": [{"name": "x", "scheme": "w4a16", "method": "gptq",
                                                    "calibration": {"file": "data:lambada_openai_test.jsonl"}}]})
    assert Path(matrix.cells[0].calibration.source()).name == "lambada_openai_test.jsonl"
    assert Path(matrix.cells[0].calibration.source()).is_file()


def test_a_kept_result_must_have_been_measured_with_the_same_recipe_and_settings():
    from workflows.bench.run import measured_with

    raw = {"model": "m", "cells": [{"name": "a", "scheme": "w4a16", "method": "rtn"}], "eval": {"windows": 4}}
    same = measured_with(parse_matrix(raw), parse_matrix(raw).cell("a"))
    assert same == measured_with(parse_matrix(raw), parse_matrix(raw).cell("a"))
    for change in ({"eval": {"windows": 8}}, {"cells": [{"name": "a", "scheme": "w4a16", "method": "gptq"}]},
                   {"cells": [{"name": "a", "scheme": "w4a16", "method": "rtn", "target": "vllm-gptq"}]}):
        other = parse_matrix({**raw, **change})
        assert measured_with(other, other.cell("a")) != same, change
