"""Quantization schemes as data.

A scheme is a small frozen dataclass; presets are named instances in one registry. The field names
follow compressed-tensors' ``QuantizationArgs`` so that a scheme maps onto the config vLLM reads
without translation tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

Strategy = Literal["tensor", "channel", "group", "token"]
NumType = Literal["int", "float"]
Observer = Literal["minmax", "mse"]


class SchemeError(ValueError):
    """A scheme name or field that does not exist or does not fit; the message says how to fix it."""


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor (weights or activations) is quantized."""

    num_bits: int = 8
    type: NumType = "int"
    symmetric: bool = True
    strategy: Strategy = "channel"
    group_size: Optional[int] = None
    dynamic: bool = False
    observer: Observer = "minmax"

    def __post_init__(self) -> None:
        if self.observer not in ("minmax", "mse"):
            raise SchemeError(f"unknown observer {self.observer!r}; choose minmax or mse")
        if self.strategy == "group" and not self.group_size:
            raise SchemeError("strategy 'group' needs a group_size (e.g. 64 or 128)")
        if self.strategy != "group" and self.group_size is not None:
            raise SchemeError(f"group_size={self.group_size} only applies to strategy 'group'")
        if self.type == "int" and not 2 <= self.num_bits <= 8:
            raise SchemeError(f"int quantization takes 2..8 bits, not {self.num_bits}")

    # The integer grid is signed for symmetric and asymmetric schemes alike (asymmetric ones carry a
    # zero point inside it), which is the convention compressed-tensors stores and vLLM reads.
    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Scheme:
    """A whole-model recipe: weight quantization, optional activation quantization, what to skip."""

    name: str
    weights: QuantArgs
    input_activations: Optional[QuantArgs] = None
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    @property
    def weight_only(self) -> bool:
        return self.input_activations is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights.to_dict(),
            "input_activations": self.input_activations.to_dict() if self.input_activations else None,
            "targets": list(self.targets),
            "ignore": list(self.ignore),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scheme":
        acts = data.get("input_activations")
        return cls(
            name=data["name"],
            weights=QuantArgs(**data["weights"]),
            input_activations=QuantArgs(**acts) if acts else None,
            targets=tuple(data.get("targets", ("Linear",))),
            ignore=tuple(data.get("ignore", ("lm_head",))),
        )

    def with_group_size(self, group_size: int) -> "Scheme":
        """The same scheme with grouped weights of ``group_size`` columns."""
        weights = dataclasses.replace(self.weights, strategy="group", group_size=group_size)
        return dataclasses.replace(self, weights=weights)


PRESETS: dict[str, Scheme] = {}


def register_preset(scheme: Scheme) -> Scheme:
    """Adds a named scheme to the registry that ``get_scheme`` reads."""
    PRESETS[scheme.name] = scheme
    return scheme


register_preset(Scheme(
    name="w8a8",
    weights=QuantArgs(num_bits=8, strategy="channel"),
    input_activations=QuantArgs(num_bits=8, strategy="token", dynamic=True),
))
register_preset(Scheme(name="w8a16", weights=QuantArgs(num_bits=8, strategy="channel")))
register_preset(Scheme(name="w4a16", weights=QuantArgs(num_bits=4, strategy="group", group_size=64)))


def get_scheme(name: str, group_size: Optional[int] = None) -> Scheme:
    """Looks a preset up by name; ``group_size`` overrides the preset's weight grouping."""
    key = name.lower()
    if key not in PRESETS:
        raise SchemeError(f"unknown scheme {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    scheme = PRESETS[key]
    return scheme.with_group_size(group_size) if group_size else scheme
