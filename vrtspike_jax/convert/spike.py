"""S-VRT spike-branch `state_dict` -> our NNX modules (no torch needed: any name -> array mapping works,
e.g. an `np.load`ed .npz).

Name maps (PyTorch name -> ours), PyTorch layouts converted as noted:
  Conv3d `X.weight (O, I, kt, kh, kw)` -> `X.kernel (kt, kh, kw, I, O)`;  `X.bias` -> `X.bias`
  Linear `X.weight (out, in)`         -> `X.kernel (in, out)` (= W.T);    `X.bias` -> `X.bias`
  LayerNorm `X.weight`, `X.bias`      -> `X.scale`, `X.bias`
  MultiheadAttention `in_proj_weight (3C, C)` rows q | k | v -> `q_proj/k_proj/v_proj.kernel` (each W.T),
    `in_proj_bias (3C,)` -> the three biases, `out_proj.{weight,bias}` -> `out_proj`.

Module by module (S-VRT class -> ours; S-VRT key prefix inside the module):
  SpikeEncoder3D -> SpikeEncoder3D:  in_proj, res0.{j}.conv{1,2}, downs.{i}, residuals.{i}.{j}.conv{1,2}
  SpikeTemporalSelfAttention -> SpikeTemporalSABlock:  ln1, attn (MHA), ln2, mlp.0 -> mlp.fc1, mlp.2 -> mlp.fc2
  SpikeTemporalSA -> SpikeTemporalSA:  blocks.{i}.<block keys>
  TemporalCrossAttnFuseBlock -> TemporalCrossAttnFuse:  ln_q, ln_kv, attn.attn (MHA), ln_ffn,
    ffn.0 -> ffn.fc1, ffn.2 -> ffn.fc2
  MultiScaleTemporalCrossAttnFuse -> MultiScaleTemporalCrossAttnFuse:  fuse_blocks.{i}.<block keys>

In S-VRT's VRTWithSpike these sit under `spike_encoder.`, `spike_temporal_sa.` and `cross_attn_fuse.`;
pass that as `prefix`. Every key under `prefix` must be consumed and every parameter found with the
right shape; otherwise one ValueError lists all missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrtspike_jax.models.fusion import MultiScaleTemporalCrossAttnFuse, TemporalCrossAttnFuse
from vrtspike_jax.models.spike._temporal_layers import TemporalMultiHeadAttention
from vrtspike_jax.models.spike.encoder import ResidualBlock3D, SpikeEncoder3D
from vrtspike_jax.models.spike.temporal_sa import SpikeTemporalSA, SpikeTemporalSABlock


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One PyTorch tensor: its name, the shape it must have, and how to write it into our params."""

    torch_key: str
    torch_shape: tuple[int, ...]
    assign: Callable[[np.ndarray], None]


def _setter(variable: nnx.Variable, transform: Callable[[np.ndarray], np.ndarray] = lambda a: a):
    def assign(array: np.ndarray) -> None:
        value = np.asarray(transform(np.asarray(array)))
        if value.shape != tuple(variable.shape):  # guarded by torch_shape; kept as a safety net
            raise ValueError(f"internal: converted shape {value.shape} != parameter shape {variable.shape}")
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))

    return assign


def _linear_entries(name: str, linear: nnx.Linear) -> Iterator[_Entry]:
    d_in, d_out = linear.kernel.shape
    yield _Entry(f"{name}.weight", (d_out, d_in), _setter(linear.kernel, lambda w: w.T))
    yield _Entry(f"{name}.bias", (d_out,), _setter(linear.bias))


def _layer_norm_entries(name: str, norm: nnx.LayerNorm) -> Iterator[_Entry]:
    yield _Entry(f"{name}.weight", tuple(norm.scale.shape), _setter(norm.scale))
    yield _Entry(f"{name}.bias", tuple(norm.bias.shape), _setter(norm.bias))


def _conv3d_entries(name: str, conv: nnx.Conv) -> Iterator[_Entry]:
    kt, kh, kw, cin, cout = conv.kernel.shape
    yield _Entry(f"{name}.weight", (cout, cin, kt, kh, kw),
                 _setter(conv.kernel, lambda w: w.transpose(2, 3, 4, 1, 0)))
    yield _Entry(f"{name}.bias", (cout,), _setter(conv.bias))


def _mha_entries(name: str, attn: TemporalMultiHeadAttention) -> Iterator[_Entry]:
    dim = attn.dim
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)

    def assign_weight(packed: np.ndarray) -> None:
        for index, proj in enumerate(projections):
            _setter(proj.kernel, lambda w: w.T)(packed[index * dim:(index + 1) * dim])

    def assign_bias(packed: np.ndarray) -> None:
        for index, proj in enumerate(projections):
            _setter(proj.bias)(packed[index * dim:(index + 1) * dim])

    yield _Entry(f"{name}.in_proj_weight", (3 * dim, dim), assign_weight)
    yield _Entry(f"{name}.in_proj_bias", (3 * dim,), assign_bias)
    yield from _linear_entries(f"{name}.out_proj", attn.out_proj)


def _residual_entries(name: str, block: ResidualBlock3D) -> Iterator[_Entry]:
    yield from _conv3d_entries(f"{name}.conv1", block.conv1)
    yield from _conv3d_entries(f"{name}.conv2", block.conv2)


def _encoder_entries(encoder: SpikeEncoder3D) -> Iterator[_Entry]:
    yield from _conv3d_entries("in_proj", encoder.in_proj)
    for j, block in enumerate(encoder.res0):
        yield from _residual_entries(f"res0.{j}", block)
    for i, down in enumerate(encoder.downs):
        yield from _conv3d_entries(f"downs.{i}", down)
    for i, blocks in enumerate(encoder.residuals):
        for j, block in enumerate(blocks):
            yield from _residual_entries(f"residuals.{i}.{j}", block)


def _tsa_block_entries(block: SpikeTemporalSABlock, prefix: str = "") -> Iterator[_Entry]:
    yield from _layer_norm_entries(f"{prefix}ln1", block.ln1)
    yield from _mha_entries(f"{prefix}attn", block.attn)
    yield from _layer_norm_entries(f"{prefix}ln2", block.ln2)
    yield from _linear_entries(f"{prefix}mlp.0", block.mlp.fc1)
    yield from _linear_entries(f"{prefix}mlp.2", block.mlp.fc2)


def _fuse_block_entries(block: TemporalCrossAttnFuse, prefix: str = "") -> Iterator[_Entry]:
    yield from _layer_norm_entries(f"{prefix}ln_q", block.ln_q)
    yield from _layer_norm_entries(f"{prefix}ln_kv", block.ln_kv)
    yield from _mha_entries(f"{prefix}attn.attn", block.attn)
    yield from _layer_norm_entries(f"{prefix}ln_ffn", block.ln_ffn)
    yield from _linear_entries(f"{prefix}ffn.0", block.ffn.fc1)
    yield from _linear_entries(f"{prefix}ffn.2", block.ffn.fc2)


def _entries(module: nnx.Module) -> list[_Entry]:
    if isinstance(module, SpikeEncoder3D):
        return list(_encoder_entries(module))
    if isinstance(module, SpikeTemporalSABlock):
        return list(_tsa_block_entries(module))
    if isinstance(module, SpikeTemporalSA):
        return [e for i, b in enumerate(module.blocks) for e in _tsa_block_entries(b, f"blocks.{i}.")]
    if isinstance(module, TemporalCrossAttnFuse):
        return list(_fuse_block_entries(module))
    if isinstance(module, MultiScaleTemporalCrossAttnFuse):
        return [e for i, b in enumerate(module.fuse_blocks) for e in _fuse_block_entries(b, f"fuse_blocks.{i}.")]
    raise TypeError(
        f"no S-VRT name map for {type(module).__name__}; expected SpikeEncoder3D, SpikeTemporalSABlock, "
        "SpikeTemporalSA, TemporalCrossAttnFuse or MultiScaleTemporalCrossAttnFuse"
    )


def torch_state_keys(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The S-VRT `state_dict` names (relative to the module) and PyTorch shapes `module` expects."""
    return {entry.torch_key: entry.torch_shape for entry in _entries(module)}


def load_torch_state(module: nnx.Module, state: Mapping[str, np.ndarray], prefix: str = "",
                     source: str = "state_dict") -> None:
    """Write the S-VRT tensors `state[prefix + key]` into `module`'s parameters, in place.

    Args:
      module: a SpikeEncoder3D, SpikeTemporalSABlock, SpikeTemporalSA, TemporalCrossAttnFuse or
        MultiScaleTemporalCrossAttnFuse; it may be abstract (built under `nnx.eval_shape`), which skips
        the random initialisation.
      state: name -> array in PyTorch layout (a torch state_dict converted to numpy, or an `np.load`ed .npz).
      prefix: prepended to every S-VRT key, e.g. "spike_encoder." or "param/encoder/"; keys not starting
        with it are ignored, keys starting with it must all be used.
      source: a name for `state` (e.g. the file path) used in error messages.

    Raises:
      ValueError naming every missing, unexpected and mis-shaped key (nothing is written in that case).
    """
    entries = _entries(module)
    available = {key[len(prefix):] for key in state.keys() if key.startswith(prefix)}
    expected = {entry.torch_key for entry in entries}
    problems = []
    missing = sorted(expected - available)
    unexpected = sorted(available - expected)
    if missing:
        problems.append("missing keys: " + ", ".join(prefix + k for k in missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(prefix + k for k in unexpected))
    arrays = {}
    for entry in entries:
        if entry.torch_key not in available:
            continue
        array = np.asarray(state[prefix + entry.torch_key])
        if array.shape != entry.torch_shape:
            problems.append(f"{prefix + entry.torch_key}: expected shape {entry.torch_shape}, found {array.shape}")
        arrays[entry.torch_key] = array
    if problems:
        raise ValueError(
            f"cannot load {type(module).__name__} from {source} (prefix {prefix!r}): " + "; ".join(problems)
        )
    for entry in entries:
        entry.assign(arrays[entry.torch_key])
