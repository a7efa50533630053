"""LoRA (low-rank adaptation) of VRT's TMSA projections, as a reparameterisation of the parameter tree (config `lora`).

A target kernel `W` (in, out) of a TMSA block (`vrt/stages/<i>/residual_group<j>/blocks/{attn,mlp}/<name>`; a
group's blocks are stored stacked, so the kernel is [depth, in, out] and the factors get the same leading axis)
gets two adapter factors, `a` (in, r) and `b` (r, out), and the model runs with

    W_eff = W + (alpha / r) * a @ b

which is LoRA's `h = x W + (alpha / r) x a b` (Hu et al. 2021; PEFT's `lora_B(lora_A(x)) * scaling` with
`scaling = lora_alpha / r`) folded into the weight. Initialisation as PEFT's: `a` ~ U(-1/sqrt(in), 1/sqrt(in))
(kaiming_uniform with a = sqrt(5)), `b` = 0, so the adapted model starts exactly as the plain one. Biases are not
adapted (PEFT's bias="none").

Where the factors live: `params["lora"]`, a nested dict that mirrors the target modules' paths, each holding
{"a", "b"} (e.g. params["lora"]["vrt"]["stages"][0]["residual_group1"]["blocks"]["attn"]["qkv_self"]["a"], of shape
[depth, in, r]). They form the parameter group `lora` (train/param_groups.py); the `lora` config variant freezes
VRT's own groups for the run, so only the factors (and the spike path) train. `apply` gives the model's plain
parameter tree (what `nnx.merge` takes): inside the train step, for validation, and when a checkpoint is loaded
(`merge` writes it as a plain checkpoint: scripts/merge_lora.py). Checkpoints hold the full state (VRT's frozen
weights and the factors).

Why a reparameterisation and not adapter modules: the model's code and parameter tree stay those of VRT, so a merged
tree restores into the plain model with no conversion, and the un-merged and merged forwards share every op. The
cost: the step forms `W_eff` and its gradient (in x out per target, small next to the activations).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

KEY = "lora"
TARGET_NAMES = ("qkv_self", "qkv_mut", "proj", "fc11", "fc12", "fc2")
_TMSA = r"^vrt/stages/\d+/residual_group\d+/blocks/(attn|mlp)/({names})/kernel$"
_RNG_SALT = 0x10AA   # the factors' init stream: fold_in(key(seed), salt), apart from the model's own init


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    targets: Tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def pattern(self) -> re.Pattern:
        return re.compile(_TMSA.format(names="|".join(re.escape(t) for t in self.targets)))


def spec_from_config(config) -> Optional[LoRASpec]:
    """The run config's `lora` section as a LoRASpec (any config `run_config.read` takes); None for rank 0 (no
    LoRA)."""
    from vrtspike_jax.train import run_config

    section = run_config.read(config).lora
    if section.rank == 0:
        return None
    spec = LoRASpec(section.rank, section.alpha, section.targets)
    check(spec)
    return spec


def check(spec: LoRASpec) -> None:
    """ValueError (one line, naming the key and value) for a bad rank, alpha or target name."""
    if spec.rank < 1:
        raise ValueError(f"lora.rank={spec.rank}: expected 0 (no LoRA) or a rank >= 1, e.g. 8")
    if not spec.alpha > 0:
        raise ValueError(f"lora.alpha={spec.alpha:g}: expected > 0 (the update is scaled by alpha / rank)")
    unknown = [t for t in spec.targets if t not in TARGET_NAMES]
    if unknown or not spec.targets:
        raise ValueError(f"lora.targets={list(spec.targets)}: expected a non-empty subset of {list(TARGET_NAMES)} "
                         "(the TMSA attention qkv_self, qkv_mut, proj and MLP fc11, fc12, fc2 projections)")


def _path(key: Tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in key)


def targets_of(params, spec: LoRASpec) -> Dict[Tuple[Any, ...], Tuple[int, ...]]:
    """{module key (the kernel's key without 'kernel'): kernel shape} of every target kernel in a model tree."""
    pattern = spec.pattern()
    flat = traverse_util.flatten_dict(params)
    found = {key[:-1]: tuple(leaf.shape) for key, leaf in flat.items() if key[0] != KEY and pattern.match(_path(key))}
    if not found:
        raise ValueError(f"lora.targets={list(spec.targets)}: no TMSA kernel of this model matches")
    return found


def init_adapters(params, spec: LoRASpec, seed: int) -> Dict[str, Any]:
    """The factors of every target (float32 NumPy, drawn on the host from `seed`): a ~ U(+-1/sqrt(in)), b = 0."""
    key = jax.random.fold_in(jax.random.key(int(seed)), _RNG_SALT)
    flat = {}
    for i, (module, shape) in enumerate(sorted(targets_of(params, spec).items(), key=lambda kv: _path(kv[0]))):
        *lead, fan_in, fan_out = shape
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, fan_in, spec.rank), jnp.float32, -bound, bound)
        flat[module + ("a",)] = np.asarray(a)
        flat[module + ("b",)] = np.zeros((*lead, spec.rank, fan_out), np.float32)
    return traverse_util.unflatten_dict(flat)


def with_adapters(params, spec: Optional[LoRASpec], seed: int) -> Dict[str, Any]:
    """`params` plus `params["lora"]` (new factors) when `spec` is set; `params` itself otherwise."""
    if spec is None:
        return params
    return {**params, KEY: init_adapters(params, spec, seed)}


def abstract_adapters(abstract_params, spec: LoRASpec) -> Dict[str, Any]:
    """The factors' ShapeDtypeStructs for a model's abstract parameter tree (restore targets, shardings)."""
    flat = {}
    for module, shape in targets_of(abstract_params, spec).items():
        *lead, fan_in, fan_out = shape
        flat[module + ("a",)] = jax.ShapeDtypeStruct((*lead, fan_in, spec.rank), jnp.float32)
        flat[module + ("b",)] = jax.ShapeDtypeStruct((*lead, spec.rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def apply(params, spec: Optional[LoRASpec]):
    """The plain model tree: every target kernel `W + (alpha / r) a @ b`, without `params["lora"]` (traceable).

    A tree without factors (no LoRA) is returned as it is.
    """
    if spec is None or KEY not in params:
        return params
    flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != KEY})
    adapters = traverse_util.flatten_dict(params[KEY])
    for key, a in adapters.items():
        if key[-1] != "a":
            continue
        module = key[:-1]
        b = adapters[module + ("b",)]
        kernel = flat[module + ("kernel",)]
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(spec.scale, a.dtype)
        flat[module + ("kernel",)] = kernel + delta.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def merge(params, spec: Optional[LoRASpec]):
    """`apply` on the host: the factors folded into plain float32 weights (NumPy), for a plain checkpoint."""
    return jax.tree.map(np.asarray, jax.jit(apply, static_argnums=1)(params, spec))


__all__ = ["KEY", "LoRASpec", "TARGET_NAMES", "abstract_adapters", "apply", "check", "init_adapters", "merge",
           "spec_from_config", "targets_of", "with_adapters"]
