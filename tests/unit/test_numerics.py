import pytest
import torch

from quantize import numerics
from quantize.methods import MethodError, quantize_weight
from quantize.schemes import QuantArgs


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


def test_more_bits_and_smaller_groups_are_more_accurate(linear):
    w = linear.weight.data
    g128 = numerics.sqnr_db(w, numerics.fake_quantize(w, QuantArgs(num_bits=4, strategy="group", group_size=192)))
    g32 = numerics.sqnr_db(w, numerics.fake_quantize(w, QuantArgs(num_bits=4, strategy="group", group_size=32)))
    int8 = numerics.sqnr_db(w, numerics.fake_quantize(w, QuantArgs(num_bits=8)))
    assert g32 > g128 and int8 > g32 + 15


def test_symmetric_grid_reaches_the_largest_weight_exactly():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0]])
    args = QuantArgs(num_bits=8)
    scale, zero = numerics.compute_qparams(w, args)
    q = numerics.quantize(w, scale, zero, args)
    assert int(q.abs().max()) == 127 and torch.allclose(numerics.dequantize(q, scale, zero, args)[0, 1], torch.tensor(-1.0))


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
