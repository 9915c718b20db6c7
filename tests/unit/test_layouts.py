"""Every checkpoint layout: packing round trips, lossless conversions in every direction, decoding
against independent references (the compressed-tensors library, plain-written GPTQ/AWQ unpacking), and
refusals of schemes a layout cannot hold, before anything is written."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from safetensors.torch import load_file

from exporters import awq, gptq
from exporters.convert import export_checkpoint
from exporters.dequantize import dequantized_state_dict, read_tensors
from quantize.pipeline import quantize_checkpoint
from core.schemes import QuantArgs, Scheme, SchemeError, get_scheme

SHAPES = [(1, 8), (3, 8), (5, 576), (7, 13), (16, 40), (64, 1536)]
SAMPLE = ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj")
quiet = {"log": lambda m: None}


def _quantize(tiny, tmp_path, scheme: Scheme, name: str = "ct"):
    quantize_checkpoint(tiny, scheme, "rtn", tmp_path / name, progress=False, log=lambda m: None)
    return tmp_path / name


def _w4(symmetric: bool = True, group: int | None = 64) -> Scheme:
    return Scheme("test", QuantArgs(num_bits=4, strategy="group" if group else "channel", group_size=group,
                                    symmetric=symmetric))


# --- packing: every bit width the layouts use, random integers over the full range, odd shapes ---------

@pytest.mark.parametrize("bits, shape", list(itertools.product([4, 8], SHAPES)))
def test_compressed_tensors_packing_round_trips_along_either_dimension(bits, shape):
    torch.manual_seed(bits * 1000 + shape[1])
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8)
    assert torch.equal(unpack_from_int32(pack_to_int32(q, bits), bits, torch.Size(shape)), q)
    assert torch.equal(unpack_from_int32(pack_to_int32(q, bits, packed_dim=0), bits, torch.Size(shape),
                                         packed_dim=0), q)


@pytest.mark.parametrize("bits, rows", list(itertools.product([4, 8], [8, 16, 576, 1536])))
def test_gptq_packing_round_trips(bits, rows):
    """GPTQ packs unsigned values along the input dimension; the library's packer (which offsets signed
    values to unsigned) writes the same bits, and qserve's unpacker reads them back."""
    torch.manual_seed(rows + bits)
    unsigned = torch.randint(0, 2 ** bits, (rows, 7))
    packed = pack_to_int32((unsigned - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=0)
    assert packed.shape == (rows * bits // 32, 7)
    assert torch.equal(gptq._unpack(packed, bits, 0), unsigned)
    assert torch.equal(gptq._unpack(packed.T.contiguous(), bits, 1), unsigned.T)


@pytest.mark.parametrize("shape", [(1, 8), (3, 64), (576, 192), (17, 1536)])
def test_awq_packing_round_trips_and_follows_autoawq_order(shape):
    torch.manual_seed(shape[1])
    values = torch.randint(0, 16, shape)
    packed = awq.pack(values)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 8)
    assert torch.equal(awq.unpack(packed), values)
    # independent reference: vLLM's AWQ kernels read column j of each 8 from nibble REVERSE[j]
    reverse = (0, 4, 1, 5, 2, 6, 3, 7)
    for j in range(8):
        assert torch.equal((packed >> (4 * reverse[j])) & 0xF, values[:, j::8])


def test_awq_packing_refuses_outputs_not_a_multiple_of_8():
    with pytest.raises(SchemeError, match="multiple of 8"):
        awq.pack(torch.zeros(4, 12, dtype=torch.int32))


# --- conversions: decoded weights stay equal through every layout ---------------------------------------

def _assert_same_weights(a, b):
    wa, wb = dequantized_state_dict(a), dequantized_state_dict(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_symmetric_int4_round_trips_through_every_layout_exactly(tiny, tmp_path):
    """AWQ always stores zero points, so it reads back as asymmetric: it comes last (GPTQ v1 holds no
    asymmetric weights)."""
    path = ("gptq", "compressed-tensors", "awq", "compressed-tensors", "awq")
    previous = _quantize(tiny, tmp_path, _w4())
    for i, layout in enumerate(path):
        out = tmp_path / f"{i}-{layout}"
        export_checkpoint(previous, layout, out, **quiet)
        _assert_same_weights(tmp_path / "ct", out)
        previous = out
    assert json.loads((previous / "qserve.json").read_text())["source_layout"] == path[-2]


def test_asymmetric_int4_round_trips_through_awq_exactly(tiny, tmp_path):
    ckpt = _quantize(tiny, tmp_path, _w4(symmetric=False, group=32))
    export_checkpoint(ckpt, "awq", tmp_path / "awq", **quiet)
    export_checkpoint(tmp_path / "awq", "compressed-tensors", tmp_path / "back", **quiet)
    _assert_same_weights(ckpt, tmp_path / "awq")
    _assert_same_weights(ckpt, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["symmetric"] is False


def test_gptq_8bit_channel_round_trips(tiny, tmp_path):
    ckpt = _quantize(tiny, tmp_path, Scheme("w8", QuantArgs(num_bits=8)))
    export_checkpoint(ckpt, "gptq", tmp_path / "gptq", **quiet)
    export_checkpoint(tmp_path / "gptq", "compressed-tensors", tmp_path / "back", **quiet)
    _assert_same_weights(ckpt, tmp_path / "gptq")
    _assert_same_weights(ckpt, tmp_path / "back")


# --- decoding against references written independently --------------------------------------------------

def test_gptq_layout_decodes_like_a_plain_reference(tiny, tmp_path):
    ckpt = _quantize(tiny, tmp_path, _w4(group=32))
    export_checkpoint(ckpt, "gptq", tmp_path / "gptq", **quiet)
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True, "lm_head": False,
        "checkpoint_format": "gptq"}
    stored, expected = load_file(str(tmp_path / "gptq" / "model.safetensors")), dequantized_state_dict(ckpt)
    for prefix in SAMPLE:  # value j of word k sits at bits [4j, 4j+4); v1 stores zero - 1
        unpack = lambda t: torch.stack([(t >> (4 * j)) & 15 for j in range(8)], 1).reshape(-1, *t.shape[1:])
        q, zeros = unpack(stored[f"{prefix}.qweight"]), unpack(stored[f"{prefix}.qzeros"].T.contiguous()).T + 1
        g_idx, scales = stored[f"{prefix}.g_idx"].long(), stored[f"{prefix}.scales"].float()
        assert torch.equal(((q - zeros[g_idx]).float() * scales[g_idx]).T, expected[f"{prefix}.weight"])


def test_awq_layout_decodes_like_a_plain_reference(tiny, tmp_path):
    ckpt = _quantize(tiny, tmp_path, _w4(symmetric=False, group=32))
    export_checkpoint(ckpt, "awq", tmp_path / "awq", **quiet)
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None}
    stored, expected = load_file(str(tmp_path / "awq" / "model.safetensors")), dequantized_state_dict(ckpt)
    reverse = (0, 4, 1, 5, 2, 6, 3, 7)
    for prefix in SAMPLE:
        unpack = lambda t: torch.stack([(t >> (4 * reverse[j])) & 15 for j in range(8)], -1).reshape(t.shape[0], -1)
        q, zeros = unpack(stored[f"{prefix}.qweight"]), unpack(stored[f"{prefix}.qzeros"])  # [in, out], [groups, out]
        scales = stored[f"{prefix}.scales"].float()
        groups = torch.arange(q.shape[0]) // 32
        assert torch.equal(((q - zeros[groups]).float() * scales[groups]).T, expected[f"{prefix}.weight"])


@pytest.mark.parametrize("scheme_name", ["w4a16", "w8a8", "fp8-dynamic", "w8a16"])
def test_our_decoding_equals_the_compressed_tensors_library(tiny, tmp_path, scheme_name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = get_scheme(scheme_name)
    ckpt = _quantize(tiny, tmp_path, scheme if scheme_name != "w4a16" else _w4(symmetric=False))
    quant = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    compressor = BaseCompressor.get_value_from_registry(quant["format"])
    group = quant["config_groups"]["group_0"]
    library_scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    raw, ours = read_tensors(ckpt), dequantized_state_dict(ckpt)
    for prefix in SAMPLE:
        local = {k.removeprefix(prefix + "."): v for k, v in raw.items() if k.rsplit(".", 1)[0] == prefix}
        theirs = compressor.decompress(local, library_scheme)["weight"]
        assert torch.equal(ours[f"{prefix}.weight"].to(theirs.dtype), theirs), prefix


# --- refusals, before anything is written ---------------------------------------------------------------

@pytest.mark.parametrize("layout, scheme, message", [
    ("gptq", get_scheme("w8a8"), "GPTQ layout cannot hold quantized activations"),
    ("gptq", get_scheme("fp8-dynamic"), "GPTQ layout cannot hold float8"),
    ("gptq", _w4(symmetric=False), "GPTQ layout cannot hold asymmetric weights .* use --layout awq"),
    ("awq", get_scheme("w8a16"), "AWQ layout cannot hold int8 weights"),
    ("awq", _w4(group=None), "AWQ layout cannot hold channel weight scales"),
    ("awq", get_scheme("w8a8"), "AWQ layout cannot hold int8 weights .*quantized activations"),
])
def test_layouts_refuse_what_they_cannot_hold_before_writing(tiny, tmp_path, layout, scheme, message):
    ckpt = _quantize(tiny, tmp_path, scheme)
    with pytest.raises(SchemeError, match=f"{message}.*keep the compressed-tensors"):
        export_checkpoint(ckpt, layout, tmp_path / "out", **quiet)
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_unknown_layout_and_a_float_checkpoint(tiny, tmp_path):
    from core.models import ModelError

    with pytest.raises(SchemeError, match="unknown layout 'marlin'; choose one of: compressed-tensors, gptq, awq"):
        export_checkpoint(_quantize(tiny, tmp_path, _w4()), "marlin", tmp_path / "out", **quiet)
    with pytest.raises(ModelError, match="no quantization_config.*qserve quantize"):
        export_checkpoint(tiny, "gptq", tmp_path / "out", **quiet)
    assert not (tmp_path / "out").exists()


def test_inspect_reads_the_awq_layout(tiny, tmp_path):
    from exporters.inspect import inspect_checkpoint

    export_checkpoint(_quantize(tiny, tmp_path, _w4(symmetric=False)), "awq", tmp_path / "awq", **quiet)
    report = inspect_checkpoint(tmp_path / "awq")
    assert report.format == "awq (gemm)" and not report.problems
    q_proj = {g.module: g for g in report.groups}["self_attn.q_proj"]
    assert q_proj.scheme == "int4 g64 asym" and q_proj.bits_per_weight == pytest.approx(4 + 16 / 64 + 4 / 64)
