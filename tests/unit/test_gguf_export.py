"""GGUF export: block packing against the ``gguf`` library's own decoding, and whole files read back with it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from core import numerics
from core.atomic import OutputExistsError
from core.models import ModelError
from core.quantized import QuantizedWeight
from core.schemes import QuantArgs, SchemeError, get_scheme
from exporters.dequantize import dequantized_state_dict
from exporters.gguf_blocks import BLOCK_TYPES, block_type_for, dequantize_blocks, pack_weight
from exporters.gguf_file import export_gguf
from exporters.gguf_model import permute_rows
from quantize.pipeline import quantize_checkpoint


def _random_weight(args: QuantArgs, rows: int, cols: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(int(args.qmin), int(args.qmax) + 1, (rows, cols), generator=g).to(torch.int8)
    scale = (torch.rand(rows, cols // 32, generator=g) * 0.05 + 1e-3).half().float()
    zero = (torch.zeros(rows, cols // 32, dtype=torch.int32) if args.symmetric else
            torch.randint(int(args.qmin), int(args.qmax) + 1, (rows, cols // 32), generator=g).int())
    return QuantizedWeight(q, scale, zero, args)


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
@pytest.mark.parametrize("shape", [(1, 32), (3, 160), (7, 576)])
def test_blocks_decode_with_the_gguf_library_to_our_weights(name, shape):
    block = BLOCK_TYPES[name]
    args = get_scheme(block.preset).weights
    assert block_type_for(args, "x") is block
    qw = _random_weight(args, *shape, seed=len(name) + shape[1])
    decoded = torch.from_numpy(dequantize_blocks(pack_weight(qw, block, "x"), block))
    ours = qw.dequantize()
    if block.symmetric:  # d * q in float32 on both sides: bit for bit
        assert torch.equal(decoded, ours)
    else:  # the minimum m = -d (z + 8) is stored in float16: off by at most half its float16 ulp
        m = (qw.scale * (qw.zero + 8)).abs()
        bound = (m * 2.0 ** -11).repeat_interleave(32, dim=1) + 1e-6
        assert ((decoded - ours).abs() <= bound).all()
        assert (decoded - ours).abs().max() > 0 or m.max() < 1e-3  # the bound is not vacuous: m is rounded


def test_gguf_q4_0_rounds_as_llama_cpp_quantizes():
    """The preset's observer ('extreme') is llama.cpp's Q4_0 rule: every block's float16 scale is the gguf library's
    reference quantizer's, bit for bit, and the decoded weights agree but for a few half-step ties (llama.cpp
    divides by the scale before its float16 rounding; measured 0.04 % of weights, one step each). The
    compressed-tensors grid (absmax / 7.5, 'minmax') picks another scale nearly everywhere and fits worse
    (measured SNR 21.2 vs 20.4 dB)."""
    from gguf import GGMLQuantizationType, quants

    torch.manual_seed(7)
    w = torch.randn(64, 576) * torch.rand(64, 1) * 0.1
    w[5, 40] = 0.9  # a positive extreme: the scale turns negative
    args = get_scheme("gguf-q4_0").weights
    scale, zero = numerics.compute_qparams(w, args)
    qw = QuantizedWeight(numerics.quantize(w, scale, zero, args), scale, zero, args)
    theirs = quants.quantize(w.numpy(), GGMLQuantizationType.Q4_0).reshape(64, -1, 18)
    assert np.array_equal(pack_weight(qw, BLOCK_TYPES["Q4_0"], "x").reshape(64, -1, 18)[..., :2], theirs[..., :2])
    decoded = torch.from_numpy(quants.dequantize(theirs.reshape(64, -1), GGMLQuantizationType.Q4_0))
    steps = ((qw.dequantize() - decoded).abs() / scale.abs().repeat_interleave(32, dim=1)).round()
    assert steps.max() <= 1 and steps.mean() < 0.002
    assert (scale < 0).any() and (scale > 0).any()
    minmax = replace(args, observer="minmax")
    assert (numerics.compute_qparams(w, minmax)[0].abs() != scale.abs()).float().mean() > 0.9
    assert numerics.sqnr_db(w, qw.dequantize()) > numerics.sqnr_db(w, numerics.fake_quantize(w, minmax)) + 0.5


def test_extreme_observer_is_refused_on_an_asymmetric_grid():
    with pytest.raises(SchemeError, match="symmetric"):
        replace(get_scheme("gguf-q4_0").weights, symmetric=False)


@pytest.mark.parametrize("scheme, hint", [("w4a16", "gguf-q4_0"), ("w8a16", "gguf-q8_0"), ("w3a16", "gguf-q4_1")])
def test_schemes_without_a_block_type_are_refused_with_the_presets_that_fit(scheme, hint):
    with pytest.raises(SchemeError, match=hint):
        block_type_for(get_scheme(scheme).weights, "layer")


def test_scales_float16_cannot_hold_and_act_order_groups_are_refused():
    block = BLOCK_TYPES["Q4_0"]
    qw = _random_weight(get_scheme("gguf-q4_0").weights, 2, 64, seed=1)
    with pytest.raises(SchemeError, match="float16 cannot hold"):
        pack_weight(replace(qw, scale=qw.scale + 1e-7), block, "x")
    with pytest.raises(SchemeError, match="act-order"):
        pack_weight(replace(qw, g_idx=torch.zeros(64, dtype=torch.int32)), block, "x")


def test_permutation_moves_whole_rows_per_head():
    w = torch.arange(16).reshape(8, 2)  # 2 heads of 4 rows: halves (0,1 | 2,3) become pairs (0,2,1,3)
    out = permute_rows(w, 2)
    assert out[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    assert sorted(out.flatten().tolist()) == list(range(16))


def _read(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader, reader.fields


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("preset", ["gguf-q4_0", "gguf-q4_1", "gguf-q8_0"])
def test_exported_file_reads_back_as_the_quantized_checkpoint(tiny_with_tokenizer, tmp_path, preset):
    from gguf import quants

    ckpt = tmp_path / "ckpt"
    quantize_checkpoint(tiny_with_tokenizer, get_scheme(preset), "rtn", ckpt, progress=False, log=lambda *_: None)
    out = tmp_path / "model.gguf"
    export_gguf(ckpt, out, log=lambda *_: None)
    reader, fields = _read(out)
    expected = dequantized_state_dict(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # this tiny model does not tie its embeddings
    for layer in range(config["num_hidden_layers"]):
        for gguf_name, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                              ("ffn_down", "mlp.down_proj"), ("attn_output", "self_attn.o_proj")):
            t = tensors[f"blk.{layer}.{gguf_name}.weight"]
            assert t.tensor_type.name == block_type_for(get_scheme(preset).weights, preset).name
            decoded = quants.dequantize(t.data, t.tensor_type)
            if gguf_name in heads:
                decoded = _unpermute(decoded, heads[gguf_name])
            ours = expected[f"model.layers.{layer}.{hf}.weight"].numpy()
            tol = 0 if get_scheme(preset).weights.symmetric else np.abs(ours).max() * 2.0 ** -10
            assert np.abs(decoded - ours).max() <= tol
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type.name == "F32"
    assert np.array_equal(norm.data, expected["model.layers.0.input_layernorm.weight"].numpy())
    vocab = json.loads((tiny_with_tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data[:5]] == sorted(vocab, key=vocab.get)[:5]
    method = fields["qserve.method"]
    assert bytes(method.parts[method.data[0]]).decode() == "rtn"


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    from tests.unit.tiny import make_tiny_llama_with_tokenizer

    model = make_tiny_llama_with_tokenizer(tmp_path / "tied", tie_word_embeddings=True)
    export_gguf(model, tmp_path / "f.gguf", log=lambda *_: None)
    reader, _ = _read(tmp_path / "f.gguf")
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names and names["token_embd.weight"].tensor_type.name == "BF16"


def test_refusals_come_before_any_file(tiny_with_tokenizer, tiny, tmp_path):
    ckpt = tmp_path / "w4"
    quantize_checkpoint(tiny_with_tokenizer, get_scheme("w4a16"), "rtn", ckpt, progress=False, log=lambda *_: None)
    out = tmp_path / "x.gguf"
    with pytest.raises(SchemeError, match="gguf-q4_0"):
        export_gguf(ckpt, out, log=lambda *_: None)
    with pytest.raises(ModelError, match="tokenizer.json"):
        export_gguf(tiny, out, log=lambda *_: None)  # a model without tokenizer files
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ModelError, match="gpt_neox.*supported: llama"):
        export_gguf(odd, out, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd", "w4"]
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        export_gguf(tiny_with_tokenizer, out, log=lambda *_: None)
    assert out.read_bytes() == b"keep"


def test_inspect_reads_gguf_types_and_bits_and_refuses_a_foreign_file(tiny_with_tokenizer, tmp_path):
    from exporters.inspect import inspect_checkpoint

    ckpt = tmp_path / "ckpt"
    quantize_checkpoint(tiny_with_tokenizer, get_scheme("gguf-q4_0"), "rtn", ckpt, progress=False, log=lambda *_: None)
    export_gguf(ckpt, tmp_path / "m.gguf", embedding_type="q8_0", log=lambda *_: None)
    report = inspect_checkpoint(tmp_path / "m.gguf")
    kinds = {(g.module, g.scheme): g for g in report.groups}
    assert kinds[("ffn_down.weight", "Q4_0")].bits_per_weight == 4.5 and kinds[("ffn_down.weight", "Q4_0")].layers == 2
    assert kinds[("token_embd.weight", "Q8_0")].bits_per_weight == 8.5 and not report.problems
    assert report.total_bytes <= (tmp_path / "m.gguf").stat().st_size
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelError, match="not a GGUF file"):
        inspect_checkpoint(tmp_path / "bad.gguf")


def test_quantizing_to_gguf_refuses_a_tokenizer_llama_cpp_cannot_take_before_any_work(tiny_with_tokenizer, tmp_path):
    from exporters.gguf_file import check_exportable

    model = tmp_path / "wordpiece"
    model.mkdir()
    (model / "config.json").write_text((tiny_with_tokenizer / "config.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ModelError, match="WordPiece tokenizer"):
        check_exportable(model, get_scheme("gguf-q4_0"))
    check_exportable(tiny_with_tokenizer, get_scheme("gguf-q4_0"))  # the same config with its BPE tokenizer passes
