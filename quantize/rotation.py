"""Rotations fused into the weights (QuaRot-style), so that a plain checkpoint comes out.

An RMSNorm without its weight commutes with any orthogonal ``Q``: ``norm(x @ Q) == norm(x) @ Q``. So once
each norm's weight is folded into the linears that read it, the residual stream can be rotated (R1): the
embeddings and every linear that writes the residual stream get ``@ Q`` on their outputs, and every linear
that reads it (and the LM head) gets ``Q`` on its inputs. Per attention head, ``v_proj``'s outputs and
``o_proj``'s matching inputs get a second rotation (R2). Nothing changes the float function; what changes
is the distribution the quantizer sees: rotated weights and activations have far fewer outliers.

A tied LM head cannot stay tied (the final norm's weight folds into it, not into the embeddings): it is
written on its own, and the report says so with its size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from core.checkpoint import layer_loader, weight_files
from core.shards import ShardWriter
from quantize.folding import FAMILIES, Family
from quantize.hadamard import random_hadamard, random_orthogonal
from quantize.methods import MethodError

@dataclass(frozen=True)
class RotationKind:
    """How a ``--rotate`` choice gets its matrices: ``start`` builds an n x n orthogonal matrix (float64) from a
    seeded generator; a ``learned`` kind then optimises it on the calibration data (``quantize.spinquant``)."""

    start: Callable[[int, torch.Generator], torch.Tensor]
    learned: bool = False


ROTATIONS: dict[str, RotationKind] = {
    "hadamard": RotationKind(random_hadamard),  # QuaRot
    "orthogonal": RotationKind(random_orthogonal),
    "learned": RotationKind(random_hadamard, learned=True),  # SpinQuant: Cayley SGD from a random Hadamard
}
# families whose norms all sit in front of the linears that read them; Gemma 2/3 also normalise each
# sublayer's output before the residual add, and no rotation of the residual stream passes such a norm
ROTATABLE_FAMILIES = ("llama", "gemma")
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Rotation:
    """The matrices of one run: ``r1`` on the residual stream, ``r2`` per attention head (float32)."""

    kind: str
    seed: int
    r1: torch.Tensor
    r2: torch.Tensor


def check_kind(kind: str) -> None:
    """A one-line refusal of a rotation name that ``ROTATIONS`` does not have."""
    if kind not in ROTATIONS:
        raise MethodError(f"unknown rotation {kind!r}; use one of: {', '.join(ROTATIONS)}")


def rotation_family(config: Any, kind: str) -> Family:
    """The family whose norms fold, or a one-line refusal naming the rotations and supported model types."""
    check_kind(kind)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or family.name not in ROTATABLE_FAMILIES:
        supported = sorted(t for t, f in FAMILIES.items() if f.name in ROTATABLE_FAMILIES)
        raise MethodError(f"--rotate folds the norms into the linears, which is defined for model types "
                          f"{', '.join(supported)}, not {getattr(config, 'model_type', None)!r}; quantize without "
                          f"--rotate")
    return family


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def make_rotation(config: Any, kind: str, seed: int = 0) -> Rotation:
    """R1 of the hidden size and R2 of the head size, drawn from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    build = ROTATIONS[kind].start
    r1 = build(config.hidden_size, generator).float()
    r2 = build(head_dim(config), generator).float()
    return Rotation(kind, seed, r1, r2)


def _fold_norm(t: dict[str, torch.Tensor], norm: str, readers: tuple[str, ...], offset: float) -> None:
    """Multiplies the readers' input columns by the norm's effective weight; the norm becomes the identity."""
    gain = t[f"{norm}.weight"] + offset
    for name in readers:
        t[f"{name}.weight"] = t[f"{name}.weight"] * gain
    t[f"{norm}.weight"] = torch.full_like(gain, 1.0 - offset)


def rotate_layer(tensors: dict[str, torch.Tensor], family: Family, rotation: Rotation) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (names relative to the layer), norms folded and rotated; computed in
    float32 and returned in each tensor's own dtype."""
    t = {k: v.float() for k, v in tensors.items()}
    r1, r2 = rotation.r1, rotation.r2
    for mapping in family.mappings:
        if mapping.smooth.endswith("layernorm"):  # the residual stream's readers
            _fold_norm(t, mapping.smooth, mapping.balance, family.norm_offset)
            for name in mapping.balance:
                t[f"{name}.weight"] = t[f"{name}.weight"] @ r1
    for name in RESIDUAL_WRITERS:
        t[f"{name}.weight"] = r1.T @ t[f"{name}.weight"]
        if f"{name}.bias" in t:
            t[f"{name}.bias"] = r1.T @ t[f"{name}.bias"]
    hd = r2.shape[0]
    v = t["self_attn.v_proj.weight"]
    t["self_attn.v_proj.weight"] = (r2.T @ v.reshape(-1, hd, v.shape[-1])).reshape(v.shape)
    if "self_attn.v_proj.bias" in t:
        t["self_attn.v_proj.bias"] = (t["self_attn.v_proj.bias"].reshape(-1, hd) @ r2).reshape(-1)
    o = t["self_attn.o_proj.weight"]
    t["self_attn.o_proj.weight"] = (o.reshape(o.shape[0], -1, hd) @ r2).reshape(o.shape)
    return {k: t[k].to(tensors[k].dtype) for k in tensors}


def rotate_outside(tensors: dict[str, torch.Tensor], family: Family, rotation: Rotation,
                   tied: bool) -> dict[str, torch.Tensor]:
    """The embeddings, final norm and LM head, rotated; a tied head comes back as its own ``lm_head.weight``."""
    if not tied and "lm_head.weight" not in tensors:
        raise MethodError("the config says the LM head is not tied to the embeddings, but the checkpoint has no "
                          "lm_head.weight; fix tie_word_embeddings in config.json")
    out = dict(tensors)
    embed = tensors["model.embed_tokens.weight"]
    head = embed if tied else tensors["lm_head.weight"]
    t = {"norm.weight": tensors["model.norm.weight"].float(), "head.weight": head.float()}
    _fold_norm(t, "norm", ("head",), family.norm_offset)
    out["model.norm.weight"] = t["norm.weight"].to(tensors["model.norm.weight"].dtype)
    out["lm_head.weight"] = (t["head.weight"] @ rotation.r1).to(head.dtype)
    out["model.embed_tokens.weight"] = (embed.float() @ rotation.r1).to(embed.dtype)
    return out


def rotate_checkpoint(model_dir: Path, out_dir: Path, kind: str, seed: int = 0,
                      refine: Optional[Callable[[Rotation], tuple[Rotation, dict]]] = None) -> dict:
    """Writes ``model_dir`` rotated into ``out_dir`` (weights and config; one layer in memory at a time) and
    returns what was done, for the quantization report. ``refine`` (a learned kind's optimiser) turns the
    starting matrices into the ones written, and returns what it measured."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    family = rotation_family(config, kind)
    rotation, learned = make_rotation(config, kind, seed), None
    if refine is not None:
        rotation, learned = refine(rotation)
    files = weight_files(model_dir)
    load = layer_loader(files)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    writer = ShardWriter(out_dir)
    outside = rotate_outside(load(-1), family, rotation, tied)
    untied_bytes = outside["lm_head.weight"].numel() * outside["lm_head.weight"].element_size() if tied else 0
    writer.add(outside)
    del outside
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        tensors = {k[len(prefix):]: v for k, v in load(index).items()}
        writer.add({prefix + k: v for k, v in rotate_layer(tensors, family, rotation).items()})
    writer.close()
    raw = json.loads((model_dir / "config.json").read_text())
    if tied:
        raw["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return {"kind": kind, "seed": seed, "untied_lm_head": tied, "lm_head_bytes_added": untied_bytes,
            **({"learned": learned} if learned else {})}
