"""Which parameters train, and how fast: named parameter groups, each frozen, trained, or trained at a learning-rate
multiplier, for the whole run or after its first N steps (config `optimizer.groups`).

Groups (a parameter belongs to the first group whose pattern matches its path in the model's state):
  spynet             vrt/spynet/...                          the optical-flow network
  deform             vrt/stages/<i>/pa_deform/...             the deformable convolutions (offsets and weights:
                                                             KAIR's `fix_keys: ["spynet", "deform"]` match these)
  backbone           vrt/...  (the rest of VRT)
  spike_encoder      spike_encoder/...
  spike_temporal_sa  spike_temporal_sa/...
  fusion             cross_attn_fuse/...
  lora               lora/...  the LoRA factors of VRT's TMSA projections (config `lora`, train/lora.py)

Per group, `optimizer.groups.<name>`:
  lr_multiplier  the group's learning rate is the schedule's times this (default 1).
  frozen_steps   0: trains from the start; N > 0: frozen for the first N steps, then trains (KAIR's `fix_iter`);
                 -1: frozen for the whole run.

How (optax masks over the parameter tree, no hand-written optimizer): global-norm clipping, then
`optax.multi_transform` over one label per distinct treatment:
  - frozen for the run: `optax.set_to_zero()` (no optimizer state); the train step also stops its gradients, so XLA
    drops their weight-gradient work;
  - frozen for N steps: `optax.transforms.conditionally_mask(adamw, count >= N)`: zero updates and an untouched AdamW
    state (moments and bias-correction count start at step N, as PyTorch's AdamW first sees the parameter's
    gradient then); the train step zeroes the group's gradients before clipping while frozen (as KAIR's
    requires_grad=False leaves them out of the norm);
  - a multiplier m != 1: `chain(adamw, scale(m))`, equal to AdamW at m times the learning rate (decoupled weight
    decay included), so the logged learning rate stays the schedule's.
Without any setting away from the defaults the optimizer is the plain `chain(clip, adamw)` (same state tree as
before groups existed, so older checkpoints resume).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import jax

GROUPS: Tuple[Tuple[str, str], ...] = (
    ("spynet", r"^vrt/spynet/"),
    ("deform", r"^vrt/stages/\d+/pa_deform/"),
    ("backbone", r"^vrt/"),
    ("spike_encoder", r"^spike_encoder/"),
    ("spike_temporal_sa", r"^spike_temporal_sa/"),
    ("fusion", r"^cross_attn_fuse/"),
    ("lora", r"^lora/"),
)
GROUP_NAMES = tuple(name for name, _ in GROUPS)
ALWAYS = -1


def group_of(path: str) -> str:
    """The group of a parameter path ('vrt/stages/0/pa_deform/conv_offset/0/kernel' -> 'deform')."""
    for name, pattern in GROUPS:
        if re.match(pattern, path):
            return name
    raise ValueError(f"parameter {path!r} is in no parameter group ({', '.join(GROUP_NAMES)})")


def path_tree(params) -> Any:
    """The parameter tree with each leaf replaced by its path 'a/b/c'."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), params)


def group_tree(params) -> Any:
    """The parameter tree with each leaf replaced by its group name."""
    return jax.tree.map(group_of, path_tree(params))


def group_settings(config) -> Dict[str, Tuple[float, int]]:
    """{group: (lr_multiplier, frozen_steps)} from `config.optimizer.groups` (any config `run_config.read` takes; a
    saved run config that predates a group is read with that group's defaults)."""
    from vrtspike_jax.train import run_config

    groups = run_config.read(config).optimizer.groups
    return {name: (groups[name].lr_multiplier, groups[name].frozen_steps) for name in GROUP_NAMES}


def is_default(settings: Mapping[str, Tuple[float, int]]) -> bool:
    return all(m == 1.0 and n == 0 for m, n in settings.values())


def label_of(setting: Tuple[float, int]) -> str:
    """One optax label per distinct treatment: 'frozen', 'lr<m>', 'lr<m>_after<N>'."""
    multiplier, frozen_steps = setting
    if frozen_steps == ALWAYS:
        return "frozen"
    label = f"lr{multiplier:g}"
    return f"{label}_after{frozen_steps}" if frozen_steps > 0 else label


def check(settings: Mapping[str, Tuple[float, int]]) -> None:
    """ValueError for a negative multiplier, frozen_steps < -1, or every group frozen for the run."""
    for name, (multiplier, frozen_steps) in settings.items():
        if not multiplier >= 0:
            raise ValueError(f"optimizer.groups.{name}.lr_multiplier={multiplier:g}: expected >= 0 (use "
                             "frozen_steps=-1 to freeze the group)")
        if frozen_steps < ALWAYS:
            raise ValueError(f"optimizer.groups.{name}.frozen_steps={frozen_steps}: expected -1 (frozen for the "
                             "run), 0 (trains from the start) or N > 0 (frozen for the first N steps)")
    if all(n == ALWAYS for _, n in settings.values()):
        raise ValueError("optimizer.groups: every group has frozen_steps=-1, nothing would train")


def gradient_gate(labels, settings: Mapping[str, Tuple[float, int]]):
    """`gate(params, step) -> params` for the loss: stops the gradients of groups frozen at `step` (values unchanged).

    `labels` is `group_tree(params)`. Groups frozen for the run get `stop_gradient` (their weight-gradient work is
    dead code for XLA); groups frozen for the first N steps get zero gradients while step < N.
    """
    import jax.numpy as jnp

    def gate_leaf(x, group, step):
        frozen_steps = settings[group][1]
        if frozen_steps == ALWAYS:
            return jax.lax.stop_gradient(x)
        if frozen_steps > 0:
            return jnp.where(step < frozen_steps, jax.lax.stop_gradient(x), x)
        return x

    def gate(params, step):
        return jax.tree.map(lambda x, group: gate_leaf(x, group, step), params, labels)

    return gate


def trainable_count(params, settings: Mapping[str, Tuple[float, int]]) -> Dict[str, int]:
    """{group: number of parameters} and 'trainable' (groups not frozen for the run) and 'total'."""
    import numpy as np

    counts: Dict[str, int] = {name: 0 for name in GROUP_NAMES}
    for leaf, group in zip(jax.tree.leaves(params), jax.tree.leaves(group_tree(params))):
        counts[group] += int(np.prod(leaf.shape))
    counts["trainable"] = sum(c for g, c in counts.items() if g in settings and settings[g][1] != ALWAYS)
    counts["total"] = sum(counts[g] for g in GROUP_NAMES)
    return counts
