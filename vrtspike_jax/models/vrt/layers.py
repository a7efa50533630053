"""Small building blocks shared by the VRT port, with PyTorch-compatible numerics and initialisation.

Everything here is channels-last. Linear layers keep Flax's `kernel` of shape (in, out), the transpose of a
PyTorch `weight`; 2-D convolutions keep `kernel` of shape (kh, kw, in, out) (HWIO).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default; Flax's own default (1e-6) moves the VRT output by 2e-3.


def torch_uniform_init(fan_in: int):
    """PyTorch's default Linear/Conv initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return _draw(key, shape, dtype, lambda g, sh: g.uniform(-bound, bound, sh),
                     lambda k, sh, dt: jax.random.uniform(k, sh, dt, -bound, bound))

    return init


def trunc_normal_init(std: float, bound: float = 2.0):
    """torch.nn.init.trunc_normal_(std=std, a=-bound, b=bound) (bounds absolute, as in timm/VRT)."""

    def init(key, shape, dtype=jnp.float32):
        return _draw(key, shape, dtype, lambda g, sh: np.clip(g.normal(0.0, std, sh), -bound, bound),
                     lambda k, sh, dt: std * jax.random.truncated_normal(k, -bound / std, bound / std, sh, dt))

    return init


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU(); jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


class Linear(nnx.Linear):
    """nnx.Linear with PyTorch's default initialisation and our dtype conventions."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, zero_init: bool = False, rngs: nnx.Rngs):
        init = nnx.initializers.zeros if zero_init else torch_uniform_init(in_features)
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=init, bias_init=init, rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm over the last axis with torch's eps (1e-5); statistics are computed in float32."""

    def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(dim, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *args, **kwargs):
        out_dtype = x.dtype if self.dtype is None else self.dtype
        y = super().__call__(x.astype(jnp.float32) if x.dtype != jnp.float64 else x, *args, **kwargs)
        return y.astype(out_dtype)


class Conv2d(nnx.Module):
    """A 2-D convolution on [N, H, W, C] with PyTorch semantics ('same' via explicit symmetric padding).

    Also stands in for VRT's Conv3d with kernel (1, k, k), which is a per-frame 2-D convolution: fold the frames
    into the batch before calling.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0,
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32, zero_init: bool = False,
                 rngs: nnx.Rngs):
        fan_in = in_channels * kernel_size * kernel_size
        init = nnx.initializers.zeros if zero_init else torch_uniform_init(fan_in)
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels),
                                     param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,), param_dtype)) if use_bias else None
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...].astype(dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), kernel, window_strides=(1, 1),
            padding=((self.padding, self.padding), (self.padding, self.padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class MlpGEGLU(nnx.Module):
    """VRT's Mlp_GEGLU: fc2(GELU(fc11(x)) * fc12(x)), exact GELU, no dropout at inference."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, *,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        out_features = out_features or in_features
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc11 = Linear(in_features, hidden_features, **kw)
        self.fc12 = Linear(in_features, hidden_features, **kw)
        self.fc2 = Linear(hidden_features, out_features, **kw)

    def __call__(self, x):
        return self.fc2(gelu(self.fc11(x)) * self.fc12(x))


class HostKey:
    """Parameter-initialisation randomness drawn on the host with NumPy, as a stand-in for `nnx.Rngs`.

    `.params()` returns the HostKey itself; the initialisers of this package draw from it with NumPy. Why not
    jax.random: eager jax.random compiles one kernel per parameter shape (10 s for the small VRT), jit-compiling
    the whole initialisation takes minutes (1500 threefry calls), and nnx.Rngs' counter updates are quadratic while
    tracing. Host initialisation of the 18M-parameter VRT takes well under a second and is deterministic by seed;
    the same seed gives the same parameters on every host.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.generator = np.random.default_rng(self.seed)

    @classmethod
    def from_rngs(cls, rngs) -> "HostKey":
        """From an nnx.Rngs (one key drawn from its `params` stream), an int seed, or a HostKey (returned as is).

        Parameters are host values: build models eagerly, or under `nnx.eval_shape` for shapes only (a traced key
        has no value, so seed 0 is used there).
        """
        if isinstance(rngs, HostKey):
            return rngs
        if isinstance(rngs, (int, np.integer)):
            return cls(int(rngs))
        key_data = jax.random.key_data(rngs.params())
        if isinstance(key_data, jax.core.Tracer):
            return cls(0)
        key_data = np.asarray(key_data).ravel().astype(np.uint64)
        return cls(int((key_data[0] << np.uint64(32)) ^ key_data[-1]) % (2 ** 63))

    def params(self) -> "HostKey":
        return self

    __call__ = params


def _draw(key, shape, dtype, host_fn, jax_fn):
    if isinstance(key, HostKey):
        return jnp.asarray(host_fn(key.generator, shape), dtype)
    return jax_fn(key, shape, dtype)


def variance_scaling_init(scale: float, mode: str, distribution: str):
    """jax.nn.initializers.variance_scaling for kernels ([..., in, out]), drawn on the host for a HostKey."""
    jax_init = jax.nn.initializers.variance_scaling(scale, mode, distribution)

    def host(generator, shape):
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / max(1.0, fan)
        if distribution == "uniform":
            bound = np.sqrt(3.0 * variance)
            return generator.uniform(-bound, bound, shape)
        if distribution == "normal":
            return generator.normal(0.0, np.sqrt(variance), shape)
        # truncated_normal: standard normal truncated to [-2, 2], rescaled to unit variance (as jax)
        std = np.sqrt(variance) / 0.87962566103423978
        values = generator.normal(0.0, 1.0, shape)
        bad = np.abs(values) > 2.0
        while bad.any():
            values[bad] = generator.normal(0.0, 1.0, int(bad.sum()))
            bad = np.abs(values) > 2.0
        return values * std

    def init(key, shape, dtype=jnp.float32):
        return _draw(key, shape, dtype, host, jax_init)

    return init


he_normal_init = lambda: variance_scaling_init(2.0, "fan_in", "truncated_normal")  # noqa: E731
lecun_normal_init = lambda: variance_scaling_init(1.0, "fan_in", "truncated_normal")  # noqa: E731  (nnx.Linear's)
xavier_uniform_init = lambda: variance_scaling_init(1.0, "fan_avg", "uniform")  # noqa: E731


# ----------------------------------------------------------------------------------------------------------------
# Orderings of the backward pass for XLA's scheduler

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gradients_before_input(state, x, flows, tie_parameters: bool = True):
    """Identity on (a stage's parameters, its input, its flows). In the backward pass each batch row of the
    input's cotangent is made to depend on that row of every flow cotangent and, with `tie_parameters`, on every
    parameter cotangent of the stage (plus zero times one element of each), so that the stage's whole backward
    pass finishes before the backward pass of the stages before it begins.

    Used at each stage's input and at its alignment's input. Without it XLA:CPU's scheduler left the weight and
    flow gradients of a stage's alignment (and the activation-sized buffers they read) for late: stage 7's were
    still alive while stage 1's backward pass ran, at the train step's memory peak (docs/PERFORMANCE.md, "Where
    the memory peak sits").

    A parameter cotangent's element is shared by the whole batch: when the parameters or the batch are split over
    devices, each such tie is a collective (VRTConfig.tie_parameter_gradients, off there by default)."""
    return state, x, flows


def _gradients_before_input_fwd(state, x, flows, tie_parameters):
    return (state, x, flows), None


def _gradients_before_input_bwd(tie_parameters, _, cotangents):
    grad_state, grad_x, grad_flows = cotangents
    grad_x = _after_rows(grad_x, grad_flows)
    if tie_parameters:
        grad_x = _after_all(grad_x, grad_state)
    return grad_state, grad_x, grad_flows


gradients_before_input.defvjp(_gradients_before_input_fwd, _gradients_before_input_bwd)


def parameter_gradients_first(modules, x):
    """(modules, x) unchanged, with x taken through `gradients_before_input`: in the backward pass x's cotangent
    waits for the parameter cotangents of `modules` (a module or a tuple of modules), so that XLA:CPU does not leave
    their weight gradients, and the activations those read, for after the backward pass of the code before."""
    graphdef, state = nnx.split(modules)
    state, x, _ = gradients_before_input(state, x, (), True)
    return nnx.merge(graphdef, state), x


def _first_elements(tree):
    """One float32 scalar that depends on every floating leaf of `tree` (the sum of their first elements)."""
    firsts = [leaf.reshape(-1)[:1].astype(jnp.float32) for leaf in jax.tree.leaves(tree) if _floating(leaf)]
    return jnp.sum(jnp.concatenate(firsts)) if firsts else jnp.zeros((), jnp.float32)


def _after_all(values, tree):
    """`values` (floating leaves) plus zero times one element of every floating leaf of `tree`: each then depends
    on all of `tree`. The element is shared by the whole batch (a collective when `tree` is split over devices)."""
    zero = jnp.zeros((), jnp.float32) * _first_elements(tree)
    return jax.tree.map(lambda v: v + zero.astype(v.dtype) if _floating(v) else v, values)


def _floating(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size > 0


def _after_rows(values, tree):
    """`values` plus zero times, for each batch row, one element of that row of every floating leaf of `tree` with
    the same leading (batch) dimension: each row of `values` then depends on those rows, and only on them. Reading
    within a batch row needs nothing from other devices when the batch is split over devices (an element shared
    by the whole batch would be a collective per tie). Leaves of `values` without a matching leaf are returned
    as they are."""
    rows = {}
    for leaf in jax.tree.leaves(tree):
        if _floating(leaf) and leaf.ndim:
            b = leaf.shape[0]
            row = leaf.reshape(b, -1)[:, :1].astype(jnp.float32)
            rows[b] = row if b not in rows else rows[b] + row

    def tie(v):
        if not (_floating(v) and v.ndim) or v.shape[0] not in rows:
            return v
        zero = (jnp.zeros((), jnp.float32) * rows[v.shape[0]]).astype(v.dtype)
        return v + zero.reshape((v.shape[0],) + (1,) * (v.ndim - 1))

    return jax.tree.map(tie, values)


def checkpoint_after_cotangent(fn):
    """jax.checkpoint(fn) with nothing saved but the inputs, whose recomputation in the backward pass waits for
    the output's cotangent: the inputs after the first (the activations; the first is the parameter state) get
    zero times one element of each batch row of it.

    With jax.checkpoint the recomputation depends on forward values only, and XLA:CPU's scheduler started the
    recomputed alignments of stages 1 and 7 early in the backward pass, so that their buffers were alive at its
    memory peak (docs/PERFORMANCE.md, "Where the memory peak sits")."""

    @jax.custom_vjp
    def wrapped(state, *args):
        return fn(state, *args)

    def forward(state, *args):
        return fn(state, *args), (state, args)

    def backward(saved, cotangent):
        state, args = saved
        args = _after_rows(args, cotangent)
        _, vjp = jax.vjp(fn, state, *args)
        return vjp(cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped


def sequential_chunks(fn, chunk: int):
    """fn(state, *args) -> out, with every leaf of args and out split along its first (problem) axis, run over
    chunks of `chunk` problems one after another, in the forward pass and in the backward pass.

    The backward pass recomputes each chunk from the saved inputs and takes its gradient; the next chunk's inputs
    get zero times one element of every gradient of the chunk before, so its recomputation waits for that
    gradient, and only one chunk's intermediates are alive at a time. (Optimization barriers between statically
    unrolled chunks did not bound memory: XLA:CPU drops them before it schedules. A lax.scan over the chunks did,
    but XLA:CPU ran the sampling gathers and scatters inside its body about 6x slower; docs/PERFORMANCE.md.)

    Each tie reads one element shared by all problems: with the problem axis split over devices it would be a
    collective per chunk, so this is for one device (VRTConfig.alignment_chunk)."""

    def pieces(tree):
        m = jax.tree.leaves(tree)[0].shape[0]
        return [jax.tree.map(lambda t: t[i:i + chunk], tree) for i in range(0, m, chunk)]

    def concatenate(outs):
        return jax.tree.map(lambda *ts: jnp.concatenate(ts, axis=0), *outs)

    def forward_only(state, args):
        outs = []
        for piece in pieces(args):
            outs.append(fn(state, *(_after_all(piece, outs[-1]) if outs else piece)))
        return concatenate(outs)

    @jax.custom_vjp
    def chunked(state, args):
        return forward_only(state, args)

    def forward(state, args):
        return forward_only(state, args), (state, args)

    def backward(saved, cotangent):
        state, args = saved
        grad_state, grad_args = None, []
        for piece, piece_cotangent in zip(pieces(args), pieces(cotangent)):
            if grad_args:
                piece = _after_all(piece, (grad_state, grad_args[-1]))
            _, vjp = jax.vjp(lambda st, a: fn(st, *a), state, piece)
            piece_grad_state, piece_grad_args = vjp(piece_cotangent)
            grad_state = piece_grad_state if grad_state is None else jax.tree.map(jnp.add, grad_state,
                                                                                    piece_grad_state)
            grad_args.append(piece_grad_args)
        return grad_state, concatenate(grad_args)

    chunked.defvjp(forward, backward)
    return lambda state, *args: chunked(state, args)
