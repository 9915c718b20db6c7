import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open

from exporters import compressed_tensors as ct
from core.atomic import OutputExistsError, atomic_output_dir
from core.shards import ShardWriter
from quantize.methods import quantize_weight
from core.schemes import get_scheme


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(3, 8), (5, 576), (7, 13)])
def test_packed_weights_unpack_with_the_library(bits, shape):
    torch.manual_seed(bits)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8)
    packed = ct.pack_to_int32(q, bits)
    assert packed.dtype == torch.int32
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape)), q)


def test_layer_tensors_w4a16_layout():
    scheme = get_scheme("w4a16")
    qw = quantize_weight(torch.randn(16, 128), scheme.weights)
    tensors = ct.layer_tensors("model.layers.0.mlp.up_proj", qw, scheme, torch.bfloat16)
    assert set(tensors) == {"model.layers.0.mlp.up_proj.weight_packed", "model.layers.0.mlp.up_proj.weight_scale",
                            "model.layers.0.mlp.up_proj.weight_shape"}
    assert tensors["model.layers.0.mlp.up_proj.weight_packed"].shape == (16, 16)
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].shape == (16, 2)
    assert tensors["model.layers.0.mlp.up_proj.weight_shape"].tolist() == [16, 128]


def test_quantization_config_w8a8_is_what_vllm_reads():
    cfg = ct.quantization_config(get_scheme("w8a8"))
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "int-quantized"
    group = cfg["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"] is True
    assert group["input_activations"]["strategy"] == "token" and cfg["ignore"] == ["lm_head"]
    json.dumps(cfg)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("1")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(out):
            pass
    assert (out / "keep").read_text() == "1"


def test_shard_writer_splits_and_indexes(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=1000)
    for i in range(5):
        writer.add({f"t{i}": torch.zeros(100, dtype=torch.float32)})  # 400 bytes each
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) == 3 and files[0].endswith("-of-00003.safetensors")
    with safe_open(str(tmp_path / index["weight_map"]["t4"]), framework="pt") as f:
        assert f.get_tensor("t4").shape == (100,)


def test_shard_writer_streams_every_dtype_the_exports_use(tmp_path):
    from safetensors.torch import load_file

    tensors = {"bf16": torch.randn(3, 5).bfloat16(), "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
               "i32": torch.arange(7, dtype=torch.int32), "i8": torch.arange(-4, 4, dtype=torch.int8).reshape(2, 4),
               "scalar": torch.tensor(2.5), "i64": torch.tensor([3, 4], dtype=torch.int64)}
    writer = ShardWriter(tmp_path)
    for name, tensor in tensors.items():
        writer.add({name: tensor})
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no spill file left
    loaded = load_file(str(tmp_path / "model.safetensors"))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else loaded[name],
                           tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor)


def test_dequantized_layout_is_a_plain_checkpoint(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from exporters.convert import export_checkpoint
    from exporters.dequantize import dequantized_state_dict
    from quantize.pipeline import quantize_checkpoint
    from core.schemes import get_scheme

    quantize_checkpoint(tiny, get_scheme("w8a8"), "rtn", tmp_path / "ct", progress=False, log=lambda m: None)
    export_checkpoint(tmp_path / "ct", "dequantized", tmp_path / "plain", log=lambda m: None)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[name], dequantized_state_dict(tmp_path / "ct", torch.bfloat16)[name].float())
    provenance = json.loads((tmp_path / "plain" / "qserve.json").read_text())
    assert provenance["layout"] == "dequantized" and provenance["source_provenance"]["method"] == "rtn"


def test_inspect_reads_the_gptq_layout_too(tiny, tmp_path):
    from exporters.convert import export_checkpoint
    from exporters.inspect import inspect_checkpoint
    from quantize.pipeline import quantize_checkpoint
    from core.schemes import get_scheme

    quantize_checkpoint(tiny, get_scheme("w4a16"), "rtn", tmp_path / "ct", progress=False, log=lambda m: None)
    export_checkpoint(tmp_path / "ct", "gptq", tmp_path / "gptq", log=lambda m: None)
    ct_report, gptq_report = inspect_checkpoint(tmp_path / "ct"), inspect_checkpoint(tmp_path / "gptq")
    assert gptq_report.format == "gptq" and not gptq_report.problems
    assert [g.scheme for g in gptq_report.groups] == [g.scheme for g in ct_report.groups]
    # per weight: 4 bits, a 16-bit scale and a 4-bit zero point per 64, a 32-bit g_idx per input column (128 outputs)
    q_proj = {g.module: g for g in gptq_report.groups}["self_attn.q_proj"]
    assert q_proj.bits_per_weight == pytest.approx(4 + 16 / 64 + 4 / 64 + 32 / 128)


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import os
    import subprocess

    from core.atomic import atomic_output_dir

    gone = subprocess.Popen(["true"])  # a writer that has exited: its pid names a process that is gone
    gone.wait()
    stale = tmp_path / f".out.tmp-{gone.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getppid()}-def"  # a writer still running (this test's parent)
    live.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "qserve.json").write_text("{}")
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "qserve.json").exists()
