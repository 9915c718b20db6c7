"""Checkpoints with act-order groups (``actorder: group``, a ``weight_g_idx`` per linear), as the
compressed-tensors library writes them: decoded with their groups, not contiguous ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.schemes import SchemeError
from exporters.convert import export_checkpoint
from exporters.dequantize import dequantized_state_dict
from exporters.inspect import inspect_checkpoint

GROUP = 32


def _library_checkpoint(tiny, out):
    """Every decoder linear of ``tiny`` quantized to int4 with permuted groups and written by the
    compressed-tensors library's own compressor; returns what the library decodes for each."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP,
            "actorder": "group", "dynamic": False}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    torch.manual_seed(0)
    tensors, decoded = {}, {}
    for key, weight in load_file(str(tiny / "model.safetensors")).items():
        if not (key.startswith("model.layers.") and key.endswith("_proj.weight")):
            tensors[key] = weight
            continue
        prefix, cols = key.removesuffix(".weight"), weight.shape[1]
        g_idx = (torch.randperm(cols) // GROUP).to(torch.int32)  # column j belongs to group g_idx[j]
        groups = torch.stack([weight[:, g_idx == g].float().abs().amax(dim=1) for g in range(cols // GROUP)], dim=1)
        state = {"weight": weight, "weight_scale": (groups / 8).to(weight.dtype), "weight_g_idx": g_idx}
        stored = compressor.compress(state, scheme)
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in stored.items()})
        decoded[key] = compressor.decompress(dict(stored), scheme)["weight"]
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((tiny / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args, "input_activations": None}},
        "ignore": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return decoded


def test_group_index_checkpoint_decodes_like_the_library(tiny, tmp_path):
    expected = _library_checkpoint(tiny, tmp_path / "ckpt")
    ours = dequantized_state_dict(tmp_path / "ckpt")
    assert len(expected) == 14
    for key, weight in expected.items():
        assert torch.equal(ours[key].to(weight.dtype), weight), key
    report = inspect_checkpoint(tmp_path / "ckpt")
    assert not report.problems


def test_dequantized_export_keeps_the_groups_and_other_layouts_refuse(tiny, tmp_path):
    expected = _library_checkpoint(tiny, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", "dequantized", tmp_path / "float", log=lambda m: None)
    exported = load_file(str(tmp_path / "float" / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(exported[key].float(), expected[key].float())
    for layout in ("compressed-tensors", "gptq", "awq"):
        with pytest.raises(SchemeError, match="act-order groups .*export --layout dequantized"):
            export_checkpoint(tmp_path / "ckpt", layout, tmp_path / layout, log=lambda m: None)
        assert not (tmp_path / layout).exists()
    shutil.rmtree(tmp_path / "float")
