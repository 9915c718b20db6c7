import pytest

from core.schemes import PRESETS, QuantArgs, Scheme, SchemeError, get_scheme


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_its_dict(name):
    scheme = PRESETS[name]
    assert Scheme.from_dict(scheme.to_dict()) == scheme


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(SchemeError, match="w4a16.*w8a8"):
        get_scheme("w9a9")


def test_group_size_override_switches_strategy():
    scheme = get_scheme("w8a16", group_size=32)
    assert scheme.weights.strategy == "group" and scheme.weights.group_size == 32


def test_group_strategy_needs_a_size():
    with pytest.raises(SchemeError, match="group_size"):
        QuantArgs(strategy="group")


def test_signed_grid_for_both_symmetries():
    assert (QuantArgs(num_bits=4).qmin, QuantArgs(num_bits=4).qmax) == (-8, 7)
    assert (QuantArgs(num_bits=4, symmetric=False).qmin, QuantArgs(num_bits=4, symmetric=False).qmax) == (-8, 7)
