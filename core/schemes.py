"""Quantization schemes as data.

A scheme is a small frozen dataclass; presets are named instances in one registry. The field names
follow compressed-tensors' ``QuantizationArgs`` so that a scheme maps onto the config vLLM reads
without translation tables.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

Strategy = Literal["tensor", "channel", "group", "token"]
NumType = Literal["int", "float"]
Observer = Literal["minmax", "mse", "extreme"]
# How each group's range is chosen (core/numerics.py OBSERVERS holds the code of each)
OBSERVERS = {
    "minmax": "the group's min and max (symmetric: the larger magnitude over half the grid's width)",
    "mse": "a clipping search that shrinks the range while the rounding error falls",
    "extreme": "llama.cpp's Q4_0 rule: the group's largest-magnitude value lands exactly on the grid's negative "
               "end (the scale takes that value's sign); symmetric int only",
}
SCALE_DTYPES = (None, "bfloat16", "float16", "float32")


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
    # The dtype the checkpoint stores scales in ("bfloat16", "float16", "float32"); scales are rounded to it
    # before the integers are computed, so what the engine decodes is what calibration used. None: float32.
    scale_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise SchemeError(f"unknown observer {self.observer!r}; choose {', '.join(OBSERVERS)}")
        if self.observer == "extreme" and (self.type != "int" or not self.symmetric):
            raise SchemeError("observer 'extreme' maps a group's extreme onto a symmetric integer grid; drop --asym "
                              "or choose --observer minmax")
        if self.strategy == "group" and not self.group_size:
            raise SchemeError("strategy 'group' needs a group_size (e.g. 64 or 128)")
        if self.strategy != "group" and self.group_size is not None:
            raise SchemeError(f"group_size={self.group_size} only applies to strategy 'group'")
        if self.type == "int" and not 2 <= self.num_bits <= 8:
            raise SchemeError(f"int quantization takes 2..8 bits, not {self.num_bits}")
        if self.type == "float" and (self.num_bits != 8 or not self.symmetric):
            raise SchemeError("float quantization is FP8 (E4M3): num_bits=8, symmetric")
        if self.type not in ("int", "float"):
            raise SchemeError(f"unknown number type {self.type!r}; choose int or float")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale_dtype {self.scale_dtype!r} is not one of {', '.join(map(str, SCALE_DTYPES))}")

    # The integer grid is signed for symmetric and asymmetric schemes alike (asymmetric ones carry a
    # zero point inside it), which is the convention compressed-tensors stores and vLLM reads.
    # FP8 E4M3 spans +-448.
    @property
    def qmin(self) -> float:
        return -448.0 if self.type == "float" else -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> float:
        return 448.0 if self.type == "float" else 2 ** (self.num_bits - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """compressed-tensors semantics: ``re:REGEX`` matches a module name by regex, else by exact name or suffix."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


@dataclass(frozen=True)
class Override:
    """Different weight quantization for the layers whose names match ``targets`` (see ``matches``)."""

    targets: tuple[str, ...]
    weights: QuantArgs

    def to_dict(self) -> dict[str, Any]:
        return {"targets": list(self.targets), "weights": self.weights.to_dict()}


@dataclass(frozen=True)
class Scheme:
    """A whole-model recipe: weight quantization, optional activation quantization, what to skip."""

    name: str
    weights: QuantArgs
    input_activations: Optional[QuantArgs] = None
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[Override, ...] = ()
    kv_cache: Optional[QuantArgs] = None  # static per-tensor scales of the attention's keys and values

    def __post_init__(self) -> None:
        for o in self.overrides:
            if o.weights.type != self.weights.type:
                raise SchemeError(f"override {list(o.targets)} uses {o.weights.type} weights in a {self.weights.type} "
                                  f"scheme; one checkpoint holds one number type")

    @property
    def quantizes_weights(self) -> bool:
        """False for a scheme that only quantizes the KV cache (``none``): every linear stays as it is."""
        return bool(self.targets)

    @property
    def weight_only(self) -> bool:
        return self.input_activations is None

    @property
    def static_activations(self) -> bool:
        """Activation scales are fixed at calibration time (``input_scale`` tensors), not computed per token."""
        return self.input_activations is not None and not self.input_activations.dynamic

    def weights_for(self, name: str) -> QuantArgs:
        """The weight args of module ``name``: the first matching override's, else the scheme's."""
        for o in self.overrides:
            if matches(name, o.targets):
                return o.weights
        return self.weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights.to_dict(),
            "input_activations": self.input_activations.to_dict() if self.input_activations else None,
            "targets": list(self.targets),
            "ignore": list(self.ignore),
            "overrides": [o.to_dict() for o in self.overrides],
            "kv_cache": self.kv_cache.to_dict() if self.kv_cache else None,
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
            overrides=tuple(Override(tuple(o["targets"]), QuantArgs(**o["weights"])) for o in data.get("overrides", ())),
            kv_cache=QuantArgs(**data["kv_cache"]) if data.get("kv_cache") else None,
        )

    def with_kv_cache(self, name: Optional[str]) -> "Scheme":
        """The same scheme with the KV cache quantized by ``KV_CACHE_SCHEMES[name]`` (None: left as it is)."""
        if name is None:
            return self
        if name not in KV_CACHE_SCHEMES:
            raise SchemeError(f"--kv-cache {name!r} is not a KV-cache scheme vLLM serves; use one of: "
                              f"{', '.join(KV_CACHE_SCHEMES)}")
        return dataclasses.replace(self, kv_cache=KV_CACHE_SCHEMES[name])

    def with_scale_dtype(self, dtype: Optional[str]) -> "Scheme":
        """The same scheme with scales rounded to ``dtype`` (the checkpoint's) wherever they are computed."""
        overrides = tuple(dataclasses.replace(o, weights=dataclasses.replace(o.weights, scale_dtype=dtype))
                          for o in self.overrides)
        return dataclasses.replace(self, weights=dataclasses.replace(self.weights, scale_dtype=dtype),
                                   overrides=overrides)

    def with_group_size(self, group_size: int) -> "Scheme":
        """The same scheme with grouped weights of ``group_size`` columns."""
        weights = dataclasses.replace(self.weights, strategy="group", group_size=group_size)
        return dataclasses.replace(self, weights=weights)


PRESETS: dict[str, Scheme] = {}
# KV-cache schemes an engine serves: FP8 E4M3 with one static scale per tensor (vLLM's k_scale / v_scale)
KV_CACHE_SCHEMES: dict[str, QuantArgs] = {"fp8": QuantArgs(num_bits=8, type="float", strategy="tensor")}


def register_preset(scheme: Scheme) -> Scheme:
    """Adds a named scheme to the registry that ``get_scheme`` reads."""
    PRESETS[scheme.name] = scheme
    return scheme


register_preset(Scheme(
    name="w8a8",
    weights=QuantArgs(num_bits=8, strategy="channel"),
    input_activations=QuantArgs(num_bits=8, strategy="token", dynamic=True),
))
register_preset(Scheme(
    name="w8a8-static",
    weights=QuantArgs(num_bits=8, strategy="channel"),
    input_activations=QuantArgs(num_bits=8, strategy="tensor"),
))
register_preset(Scheme(name="w8a16", weights=QuantArgs(num_bits=8, strategy="channel")))
register_preset(Scheme(name="w4a16", weights=QuantArgs(num_bits=4, strategy="group", group_size=64)))
# below 4 bits no engine kernel here takes the packed weights: serve them through `export --layout dequantized`
register_preset(Scheme(name="w3a16", weights=QuantArgs(num_bits=3, strategy="group", group_size=64)))
register_preset(Scheme(name="w2a16", weights=QuantArgs(num_bits=2, strategy="group", group_size=64)))
# no linear is a target: weights and activations stay in the checkpoint's dtype, for `--kv-cache` on its own
register_preset(Scheme(name="none", weights=QuantArgs(), targets=()))
# llama.cpp's block types (exporters/gguf_blocks.py): groups of 32 with float16 scales, so any method's result
# maps onto Q4_0 / Q4_1 / Q8_0 blocks with the same arithmetic (export --layout gguf)
register_preset(Scheme(name="gguf-q4_0", weights=QuantArgs(num_bits=4, strategy="group", group_size=32,
                                                           scale_dtype="float16", observer="extreme")))
register_preset(Scheme(name="gguf-q4_1", weights=QuantArgs(num_bits=4, symmetric=False, strategy="group",
                                                           group_size=32, scale_dtype="float16")))
register_preset(Scheme(name="gguf-q8_0", weights=QuantArgs(num_bits=8, strategy="group", group_size=32,
                                                           scale_dtype="float16")))
# FP8 E4M3, named as llm-compressor names them: FP8_DYNAMIC (per-token activations) and FP8 (static).
register_preset(Scheme(
    name="fp8-dynamic",
    weights=QuantArgs(num_bits=8, type="float", strategy="channel"),
    input_activations=QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True),
))
register_preset(Scheme(
    name="fp8",
    weights=QuantArgs(num_bits=8, type="float", strategy="channel"),
    input_activations=QuantArgs(num_bits=8, type="float", strategy="tensor"),
))


def get_scheme(name: str, group_size: Optional[int] = None) -> Scheme:
    """Looks a preset up by name; ``group_size`` overrides the preset's weight grouping."""
    key = name.lower()
    if key not in PRESETS:
        raise SchemeError(f"unknown scheme {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    scheme = PRESETS[key]
    return scheme.with_group_size(group_size) if group_size else scheme


def parse_override(text: str, symmetric: Optional[bool] = None) -> Override:
    """``PATTERN=PRESET[:gN]``: layers matching PATTERN (a name, a name suffix, or ``re:REGEX``) take the
    weight quantization of PRESET, optionally with group size N; e.g. ``re:.*down_proj$=w8a16``."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern or not spec:
        raise SchemeError(f"override {text!r} is not PATTERN=PRESET[:gN] (e.g. 're:.*down_proj$=w8a16' or "
                          f"'down_proj=w4a16:g32')")
    name, _, group = spec.partition(":")
    group_size = None
    if group:
        if not re.fullmatch(r"g\d+", group):
            raise SchemeError(f"override {text!r}: write the group size as gN (e.g. :g32), not {group!r}")
        group_size = int(group[1:])
    preset = get_scheme(name, group_size)
    if not preset.quantizes_weights:
        raise SchemeError(f"override {text!r}: {name} quantizes no weights; to keep layers unquantized, leave them "
                          f"out of the pattern")
    weights = preset.weights
    if symmetric is not None and weights.type == "int":
        weights = dataclasses.replace(weights, symmetric=symmetric)
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise SchemeError(f"override {text!r}: bad regular expression ({exc})") from None
    return Override((pattern,), weights)


def compose_scheme(name: str, group_size: Optional[int] = None, asymmetric: bool = False,
                   observer: Optional[str] = None, overrides: tuple[str, ...] = (),
                   kv_cache: Optional[str] = None) -> Scheme:
    """A preset with the options ``qserve quantize`` (and ``qserve bench``) take on top of it: a group size,
    asymmetric int weights (an asymmetric preset stays so), an observer (default: the preset's), per-layer
    overrides (``PATTERN=PRESET[:gN]``) and a KV-cache scheme."""
    chosen = get_scheme(name, group_size)
    weights = chosen.weights
    if weights.type == "int":
        weights = dataclasses.replace(weights, symmetric=weights.symmetric and not asymmetric)
    weights = dataclasses.replace(weights, observer=observer or weights.observer)
    parsed = tuple(parse_override(o, symmetric=False if asymmetric else None) for o in overrides)
    return dataclasses.replace(chosen, weights=weights, overrides=parsed).with_kv_cache(kv_cache)
