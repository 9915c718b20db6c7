"""Bench cells' checkpoints are cached by what determines them: a second run quantizes nothing; a changed
recipe or calibration text makes a new checkpoint; a cell's name or target does not."""

from __future__ import annotations

from dataclasses import replace

from workflows.bench.cache import cached_checkpoint, quantize_cell, recipe_key
from workflows.bench.matrix import Calibration, Cell

GPTQ = Cell(name="a", scheme="w4a16", method="gptq", group_size=64,
            calibration=Calibration(num_samples=4, seq_len=64))


def test_a_second_run_reuses_the_checkpoint(tiny_with_tokenizer, tmp_path):
    made = []

    def quantize(out):
        made.append(out)
        quantize_cell(tiny_with_tokenizer, GPTQ, out, log=lambda _: None)

    first, reused = cached_checkpoint(tiny_with_tokenizer, GPTQ, tmp_path, quantize, log=lambda _: None)
    assert not reused and (first / "qserve.json").exists() and made == [first]
    again, reused = cached_checkpoint(tiny_with_tokenizer, replace(GPTQ, name="b", target="vllm-gptq"), tmp_path,
                                      quantize, log=lambda _: None)
    assert reused and again == first and made == [first]  # nothing quantized the second time


def test_the_key_follows_the_recipe_and_the_calibration_text(tiny_with_tokenizer, tmp_path):
    key = recipe_key(tiny_with_tokenizer, GPTQ)
    assert recipe_key(tiny_with_tokenizer, replace(GPTQ, name="other", target="llamacpp")) == key
    assert recipe_key(tiny_with_tokenizer, replace(GPTQ, method="rtn")) != key
    assert recipe_key(tiny_with_tokenizer, replace(GPTQ, calibration=Calibration(num_samples=8, seq_len=64))) != key
    text = tmp_path / "calib.txt"
    text.write_text("one text " * 200)
    own = replace(GPTQ, calibration=Calibration(file=str(text), num_samples=4, seq_len=64))
    before = recipe_key(tiny_with_tokenizer, own)
    text.write_text("another text " * 200)
    assert recipe_key(tiny_with_tokenizer, own) != before
    # round to nearest reads no data: its key ignores the calibration settings
    rtn = replace(GPTQ, method="rtn")
    assert recipe_key(tiny_with_tokenizer, replace(rtn, calibration=Calibration(num_samples=8))) == recipe_key(
        tiny_with_tokenizer, rtn)
