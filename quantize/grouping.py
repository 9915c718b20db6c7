"""Group sizes against layer shapes: fail early when one does not fit, or pick per layer (``--group-size auto``)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter, defaultdict

from core.schemes import Override, Scheme, SchemeError

AUTO_GROUP_SIZES = (128, 64, 32, 16, 8)  # 128 first: the size most GPTQ/AWQ kernels and checkpoints use

# vLLM fuses these into one layer (qkv_proj, gate_up_proj): all parts must carry one scheme.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def check_group_fit(scheme: Scheme, targets: list[str], shapes: dict[str, list[int]]) -> None:
    """Fails before any work when a layer's weight group size does not divide its inputs."""
    bad = {}
    for name in targets:
        args = scheme.weights_for(name)
        width = shapes[f"{name}.weight"][1]
        if args.strategy == "group" and width % args.group_size:
            bad[name] = (width, args.group_size)
    if bad:
        widths = sorted({w for w, _ in bad.values()})
        fits = [s for s in (256, 128, 64, 32, 16) if all(w % s == 0 for w in widths)]
        listing = ", ".join(f"{n} ({w} inputs, group {g})" for n, (w, g) in list(bad.items())[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise SchemeError(f"the group size does not divide the inputs of {len(bad)} layers: {listing}{more}; "
                          f"group sizes that fit every layer: {', '.join(map(str, fits)) or 'none'}, "
                          f"or pass --group-size auto to pick the largest that fits per layer")


def check_fused_consistent(scheme: Scheme, targets: list[str]) -> None:
    """vLLM loads q/k/v (and gate/up) as one fused layer, which needs one scheme for all its parts."""
    by_parent = defaultdict(dict)
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        by_parent[parent][leaf] = scheme.weights_for(name)
    for parent, leaves in by_parent.items():
        for parts in FUSED:
            found = {leaves[p] for p in parts if p in leaves}
            if len(found) > 1:
                raise SchemeError(f"{parent}: {', '.join(parts)} get different schemes, but vLLM fuses them into "
                                  f"one layer; give the override a pattern that matches all of them or none")


def _leaf_pattern(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``re:.*\\.mlp\\.down_proj$`` (the same module in every layer)."""
    suffix = re.sub(r"^.*?\.\d+\.", "", name)
    return "re:.*\\." + re.escape(suffix) + "$"


def auto_group_sizes(scheme: Scheme, targets: list[str], shapes: dict[str, list[int]]) -> tuple[Scheme, str]:
    """The scheme with, per layer, the largest of ``AUTO_GROUP_SIZES`` that divides its inputs (the most
    common size as the default, the others as overrides) and a line that says what was chosen."""
    if scheme.weights.strategy != "group":
        raise SchemeError(f"--group-size auto applies to grouped schemes (w4a16); {scheme.name} is per "
                          f"{scheme.weights.strategy}")
    chosen = {}
    for name in targets:
        if scheme.weights_for(name) != scheme.weights:
            continue  # the user's own override decides this layer
        width = shapes[f"{name}.weight"][1]
        fitting = [g for g in AUTO_GROUP_SIZES if width % g == 0]
        if not fitting:
            raise SchemeError(f"{name} has {width} inputs: no group size in {AUTO_GROUP_SIZES} divides it")
        chosen[name] = fitting[0]
    default = Counter(chosen.values()).most_common(1)[0][0]
    sizes_by_pattern: dict[str, set[int]] = defaultdict(set)
    for name, size in chosen.items():
        sizes_by_pattern[_leaf_pattern(name)].add(size)
    overrides = []
    for size in sorted(set(chosen.values()) - {default}, reverse=True):
        targets_of: list[str] = []
        for name in (n for n, s in chosen.items() if s == size):
            pattern = _leaf_pattern(name)  # one pattern for the module in every layer, unless sizes differ
            target = pattern if sizes_by_pattern[pattern] == {size} else name
            if target not in targets_of:
                targets_of.append(target)
        overrides.append(Override(tuple(targets_of), dataclasses.replace(scheme.weights, group_size=size)))
    resolved = dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, group_size=default),
                                   overrides=(*scheme.overrides, *overrides))
    summary = "; ".join(f"{size} for {sum(1 for s in chosen.values() if s == size)} layers"
                        for size in sorted(set(chosen.values()), reverse=True))
    return resolved, f"group size auto: {summary}"
