import pytest
import torch

from core import numerics
from quantize.methods import MethodError, quantize_weight
from core.schemes import QuantArgs


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(576, 256, bias=False)


@pytest.mark.parametrize("args, min_db", [
    (QuantArgs(num_bits=8, strategy="channel"), 38.0),
    (QuantArgs(num_bits=8, strategy="channel", symmetric=False), 38.0),
    (QuantArgs(num_bits=4, strategy="group", group_size=64), 16.0),
    (QuantArgs(num_bits=4, strategy="group", group_size=64, symmetric=False), 17.0),
    (QuantArgs(num_bits=4, strategy="channel"), 12.0),
])
def test_rtn_output_sqnr(linear, args, min_db):
    x = torch.randn(64, 576)
    qw = quantize_weight(linear.weight.data, args, "rtn")
    assert qw.q.dtype == torch.int8
    assert int(qw.q.min()) >= args.qmin and int(qw.q.max()) <= args.qmax
    ref = linear(x)
    out = x @ qw.dequantize().T
    assert numerics.sqnr_db(ref, out) > min_db


def test_more_bits_and_smaller_groups_are_more_accurate():
    w = torch.randn(256, 576)  # Gaussian, as trained weights roughly are: small groups see smaller maxima
    g128 = numerics.sqnr_db(w, numerics.fake_quantize(w, QuantArgs(num_bits=4, strategy="group", group_size=192)))
    g32 = numerics.sqnr_db(w, numerics.fake_quantize(w, QuantArgs(num_bits=4, strategy="group", group_size=32)))
    int8 = numerics.sqnr_db(w, numerics.fake_quantize(w, QuantArgs(num_bits=8)))
    assert g32 > g128 and int8 > g32 + 15


def test_symmetric_grid_uses_the_negative_extreme_like_compressed_tensors():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0]])
    args = QuantArgs(num_bits=8)
    scale, zero = numerics.compute_qparams(w, args)
    q = numerics.quantize(w, scale, zero, args)
    assert torch.allclose(scale, torch.tensor([[1.0 / 127.5]]))  # half the grid's width, not 1/127
    assert (numerics.dequantize(q, scale, zero, args) - w).abs().max() <= scale / 2 + 1e-7


@pytest.mark.parametrize("args", [
    QuantArgs(num_bits=8, strategy="channel"),
    QuantArgs(num_bits=4, strategy="channel", symmetric=False),
    QuantArgs(num_bits=4, strategy="channel"),
])
def test_qparams_match_the_compressed_tensors_library(args):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(32, 64) * torch.linspace(0.1, 3, 32).unsqueeze(1) + 0.2
    ours_scale, ours_zero = numerics.compute_qparams(w, args)
    lib_args = QuantizationArgs(num_bits=args.num_bits, symmetric=args.symmetric, strategy=args.strategy)
    lib_scale, lib_zero = calculate_qparams(w.amin(dim=1), w.amax(dim=1), lib_args)
    torch.testing.assert_close(ours_scale[:, 0], lib_scale.float(), rtol=1e-3, atol=1e-6)
    assert (ours_zero[:, 0] - lib_zero.to(torch.int32)).abs().max() <= 1


def test_all_zero_rows_stay_finite():
    w = torch.zeros(4, 64)
    out = numerics.fake_quantize(w, QuantArgs(num_bits=4, strategy="group", group_size=32, symmetric=False))
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_group_size_must_divide_columns():
    with pytest.raises(ValueError, match="does not divide"):
        numerics.fake_quantize(torch.randn(4, 576), QuantArgs(num_bits=4, strategy="group", group_size=128))


def test_unknown_method_lists_known_ones():
    with pytest.raises(MethodError, match="rtn"):
        quantize_weight(torch.randn(4, 8), QuantArgs(), "magic")
