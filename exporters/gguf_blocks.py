"""llama.cpp block types that hold qserve's integer groups exactly, as a registry.

A block covers 32 consecutive input columns of one row. Where the arithmetic is the same, the stored
integers and scales are carried over unchanged:

- ``Q4_0``: ``x = d * (u - 8)``, ``u`` in 0..15: qserve's symmetric int4 (``x = s * q``, ``q`` in -8..7).
- ``Q4_1``: ``x = d * u + m``: qserve's asymmetric int4 (``x = s * (q - z)``) with ``d = s`` and
  ``m = -s * (z + 8)``; ``m`` is stored in float16, so it is exact to half a float16 ulp of ``m``.
- ``Q8_0``: ``x = d * q``, ``q`` in -128..127: qserve's symmetric int8.

``d`` is float16 in every block: a scale that float16 cannot hold exactly is refused, not rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from core.quantized import QuantizedWeight
from core.schemes import QuantArgs, SchemeError

BLOCK = 32  # columns per block for every type here


@dataclass(frozen=True)
class BlockType:
    """One llama.cpp block type and the qserve weight args it holds exactly."""

    name: str  # llama.cpp's name (GGMLQuantizationType member)
    preset: str  # the qserve scheme preset that produces it
    num_bits: int
    symmetric: bool
    pack: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (q, d, zero) -> uint8 [rows, bytes]

    def fits(self, args: QuantArgs) -> bool:
        return (args.type == "int" and args.num_bits == self.num_bits and args.symmetric == self.symmetric
                and args.strategy == "group" and args.group_size == BLOCK)

    @property
    def ggml_type(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.name]


def _nibbles(u: np.ndarray) -> np.ndarray:
    """``[rows, blocks, 32]`` values 0..15 -> ``[rows, blocks, 16]`` bytes: column j low, column j+16 high."""
    u = u.astype(np.uint8)
    return u[..., :16] | (u[..., 16:] << np.uint8(4))


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def _pack_q4_0(q: np.ndarray, d: np.ndarray, zero: np.ndarray) -> np.ndarray:
    body = np.concatenate([_f16_bytes(d), _nibbles(q + 8)], axis=-1)
    return body.reshape(q.shape[0], -1)


def _pack_q4_1(q: np.ndarray, d: np.ndarray, zero: np.ndarray) -> np.ndarray:
    m = -d * (zero.astype(np.float32) + 8.0)
    body = np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q + 8)], axis=-1)
    return body.reshape(q.shape[0], -1)


def _pack_q8_0(q: np.ndarray, d: np.ndarray, zero: np.ndarray) -> np.ndarray:
    body = np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=-1)
    return body.reshape(q.shape[0], -1)


BLOCK_TYPES: dict[str, BlockType] = {b.name: b for b in (
    BlockType("Q4_0", "gguf-q4_0", 4, True, _pack_q4_0),
    BlockType("Q4_1", "gguf-q4_1", 4, False, _pack_q4_1),
    BlockType("Q8_0", "gguf-q8_0", 8, True, _pack_q8_0),
)}


def block_type_for(args: QuantArgs, where: str) -> BlockType:
    """The block type that holds ``args`` exactly; a SchemeError naming the presets that would fit otherwise."""
    for block in BLOCK_TYPES.values():
        if block.fits(args):
            return block
    shape = (f"{args.type}{args.num_bits} {'symmetric' if args.symmetric else 'asymmetric'} "
             f"{args.strategy}{f' {args.group_size}' if args.group_size else ''}")
    presets = ", ".join(b.preset for b in BLOCK_TYPES.values())
    raise SchemeError(f"{where}: {shape} weights have no llama.cpp block type with the same arithmetic (those "
                      f"take groups of {BLOCK}); quantize with --scheme {presets} to export a GGUF")


def pack_weight(qw: QuantizedWeight, block: BlockType, where: str) -> np.ndarray:
    """The weight's blocks as llama.cpp stores them: uint8 ``[out, in / 32 * bytes_per_block]``."""
    if qw.g_idx is not None:
        raise SchemeError(f"{where}: act-order groups (g_idx) are not contiguous blocks; quantize without "
                          f"--actorder group, or with --actorder static/weight, to export a GGUF")
    d32 = qw.scale.float()
    if not torch.equal(d32.half().float(), d32):
        raise SchemeError(f"{where}: scales that float16 cannot hold exactly (llama.cpp blocks store float16); "
                          f"quantize with --scheme {block.preset}, which rounds scales to float16")
    rows, cols = qw.q.shape
    q = qw.q.to(torch.int16).numpy().reshape(rows, cols // BLOCK, BLOCK)
    return block.pack(q, d32.numpy(), qw.zero.numpy())


def dequantize_blocks(data: np.ndarray, block: BlockType) -> np.ndarray:
    """The float32 weights llama.cpp decodes from packed blocks (with the ``gguf`` library's reference code)."""
    from gguf import quants

    return quants.dequantize(data, block.ggml_type)
