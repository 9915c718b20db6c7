"""Quantization under faults: a truncated or corrupt weight file, a config that lies about the weights' shapes
and an output disk too small each stop the run with one line that says what is wrong, before the heavy work
and with nothing left behind; a disk that fills up while writing gives the same kind of error."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from core.atomic import OutputSpaceError, atomic_output_dir
from core.models import ModelError
from core.schemes import get_scheme
from quantize.pipeline import quantize_checkpoint
from tests.unit.tiny import make_tiny_llama_with_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny") / "model")


def _copy(tiny: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def _quantize(model: Path, out: Path) -> None:
    quantize_checkpoint(model, get_scheme("w8a16"), "rtn", out, progress=False, log=lambda m: None)


def _corrupt(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(b"not json")


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "file not fully covered"),
    (_corrupt, "invalid JSON in header"),
], ids=["truncated", "corrupt"])
def test_a_damaged_weight_file_is_named_before_any_work(tiny, tmp_path, damage, message):
    model = _copy(tiny, tmp_path)
    damage(model / "model.safetensors")
    with pytest.raises(ModelError, match=rf"model.safetensors is not a readable safetensors file \(.*{message}"):
        _quantize(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("lie, message", [
    ({"intermediate_size": 512},
     r"model.layers.0.mlp.gate_proj.weight is \[256, 128\] in the weights, \[512, 128\] by the config"),
    ({"num_hidden_layers": 4}, r"it gives model.layers 4 layers, the weights hold 2"),
], ids=["wider", "deeper"])
def test_a_config_that_lies_about_the_weights_is_refused(tiny, tmp_path, lie, message):
    model = _copy(tiny, tmp_path)
    config = json.loads((model / "config.json").read_text())
    assert config["intermediate_size"] == 256 and config["num_hidden_layers"] == 2  # what the lies depart from
    (model / "config.json").write_text(json.dumps({**config, **lie}))
    with pytest.raises(ModelError, match=f"config.json does not match its weights: {message}"):
        _quantize(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (mounting needs root, as in the project's CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mount refused a tmpfs: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_an_output_that_cannot_fit_is_refused_before_any_work(tiny, small_disk):
    (small_disk / "filler").write_bytes(b"\0" * 700 * 1024)  # ~300 KiB left; the checkpoint is ~500 KiB
    with pytest.raises(OutputSpaceError, match=r"w8a16 checkpoint of model needs about 0.9 MiB and .* has 0.3 MiB free; free "):
        _quantize(tiny, small_disk / "out")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    (small_disk / "filler").unlink()
    _quantize(tiny, small_disk / "out")  # it fits an empty disk
    assert json.loads((small_disk / "out" / "qserve.json").read_text())["quantized_layers"] == 14


def test_a_disk_that_fills_while_writing_leaves_nothing_and_says_so(small_disk):
    with pytest.raises(OutputSpaceError, match=r"no space left on the device of .* while writing out \(0.0 MiB "
                                               r"free\); nothing was kept"):
        with atomic_output_dir(small_disk / "out") as tmp:
            (tmp / "big").write_bytes(b"\0" * 2 * 2**20)
    assert list(small_disk.iterdir()) == []
