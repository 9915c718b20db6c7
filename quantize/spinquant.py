"""A learned rotation (SpinQuant-style): R1 and R2 optimised on the calibration data, kept orthogonal.

The loss is the cross-entropy of the rotated, fake-quantized model on the calibration samples (weights on
the scheme's grid, and activations per token where the scheme quantizes them dynamically), with straight-
through gradients. Each step moves R along the Stiefel manifold by a Cayley transform,
``R <- (I + a/2 A)^-1 (I - a/2 A) R`` with ``A = G R^T - R G^T`` skew-symmetric, so R stays orthogonal to
rounding error whatever the step. It starts from the random Hadamard rotation; the calibration samples are
taken in turn, ``batch`` per step.

Unlike everything else in ``quantize``, this holds the whole model in memory (float32) while it learns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from core import numerics
from core.schemes import QuantArgs, Scheme, matches
from quantize.folding import Family
from quantize.rotation import Rotation, head_dim, rotate_layer, rotate_outside, rotation_family


@dataclass(frozen=True)
class LearnConfig:
    """The optimiser's bounds: steps, a wall-clock cap, the step size and the batch (samples per step)."""

    steps: int = 40
    max_seconds: float = 900.0
    lr: float = 0.1  # of 0.03, 0.1, 0.3, 1.0 (20 steps, demo model W4A16 RTN), 0.1 gave the lowest held-out loss
    batch: int = 1


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group: a descent direction that keeps ``r`` orthogonal."""
    a = grad @ r.T - r @ grad.T
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    return torch.linalg.solve(eye + lr / 2 * a, (eye - lr / 2 * a) @ r)


def _ste(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Fake-quantized forward, identity backward (straight-through)."""
    return x + (numerics.fake_quantize(x.detach(), args) - x).detach()


class _RotatedModel:
    """The model with norms folded once; ``params(rotation)`` gives every rotated, fake-quantized weight."""

    def __init__(self, model_dir: Path, scheme: Scheme, family: Family) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tie_word_embeddings=False)
        self.model.eval().requires_grad_(False)
        state = {k: v.float() for k, v in self.model.state_dict().items()}
        if tied:
            state.pop("lm_head.weight", None)
        identity = Rotation("identity", 0, torch.eye(config.hidden_size), torch.eye(head_dim(config)))
        outside = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
        self.outside = rotate_outside(outside, family, identity, tied)  # norms folded, head on its own
        self.layers = [{k[len(p):]: v for k, v in state.items() if k.startswith(p)}
                       for p in (f"model.layers.{i}." for i in range(config.num_hidden_layers))]
        self.layers = [rotate_layer(t, family, identity) for t in self.layers]
        self.family, self.scheme = family, scheme
        self.targets = {f"{name}.weight": scheme.weights_for(name) for name, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and scheme.quantizes_weights
                        and not matches(name, scheme.ignore)}
        self._hooks = [m.register_forward_pre_hook(self._quantize_input(scheme.input_activations))
                       for name, m in self.model.named_modules()
                       if f"{name}.weight" in self.targets and scheme.input_activations is not None
                       and scheme.input_activations.dynamic]

    @staticmethod
    def _quantize_input(acts: QuantArgs | None) -> Callable:
        per_token = replace(acts, strategy="channel", dynamic=False) if acts else None

        def hook(_module: torch.nn.Module, inputs: tuple) -> tuple:
            x = inputs[0]
            return (_ste(x.reshape(-1, x.shape[-1]), per_token).reshape(x.shape),)

        return hook

    def params(self, rotation: Rotation) -> dict[str, torch.Tensor]:
        out = rotate_outside(self.outside, self.family, rotation, tied=False)
        for i, layer in enumerate(self.layers):
            out.update({f"model.layers.{i}.{k}": v for k, v in rotate_layer(layer, self.family, rotation).items()})
        return {k: _ste(v, self.targets[k]) if k in self.targets else v for k, v in out.items()}

    def loss(self, rotation: Rotation, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(self.model, self.params(rotation), (ids,)).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def learn_rotation(model_dir: Path, start: Rotation, scheme: Scheme, samples: torch.Tensor,
                   config: LearnConfig = LearnConfig(),
                   log: Callable[[str], None] = print) -> tuple[Rotation, dict]:
    """R1 and R2 optimised from ``start`` on ``samples`` (token ids, one row a sample) for the loss of the
    model quantized by ``scheme``; returns the last matrices and what was measured."""
    from transformers import AutoConfig

    family = rotation_family(AutoConfig.from_pretrained(model_dir), start.kind)
    rotated = _RotatedModel(Path(model_dir), scheme, family)
    # the last two samples are held out to say whether it learned (all of them when there are too few)
    held = samples[-2:] if samples.shape[0] > 2 else samples
    trained = samples.shape[0] - 2 if samples.shape[0] > 2 else samples.shape[0]
    held_before = _mean_loss(rotated, start, held)
    r1, r2 = start.r1.double(), start.r2.double()
    began, losses = time.monotonic(), []
    for step in range(config.steps):
        if time.monotonic() - began > config.max_seconds:
            log(f"learned rotation: stopped at the {config.max_seconds:.0f} s cap after {step} steps")
            break
        rows = torch.arange(step * config.batch, (step + 1) * config.batch) % trained
        p1, p2 = r1.float().requires_grad_(), r2.float().requires_grad_()
        loss = rotated.loss(replace(start, r1=p1, r2=p2), samples[rows])
        loss.backward()
        losses.append(float(loss.detach()))
        r1, r2 = cayley_step(r1, p1.grad.double(), config.lr), cayley_step(r2, p2.grad.double(), config.lr)
        if step % 10 == 0:
            log(f"learned rotation: step {step + 1}/{config.steps}, loss {losses[-1]:.4f}")
    learned = replace(start, r1=r1.float(), r2=r2.float())
    held_after = _mean_loss(rotated, learned, held)
    log(f"learned rotation: {len(losses)} steps in {time.monotonic() - began:.0f} s; quantized loss on "
        f"{held.shape[0]} held-out samples {held_before:.4f} -> {held_after:.4f}")
    measured = {"steps": len(losses), "seconds": round(time.monotonic() - began, 1), "lr": config.lr,
                "heldout_samples": held.shape[0], "heldout_loss_start": round(held_before, 4),
                "heldout_loss_learned": round(held_after, 4)}
    return learned, measured


@torch.no_grad()
def _mean_loss(rotated: _RotatedModel, rotation: Rotation, samples: torch.Tensor) -> float:
    return sum(float(rotated.loss(rotation, samples[i:i + 1])) for i in range(samples.shape[0])) / samples.shape[0]
