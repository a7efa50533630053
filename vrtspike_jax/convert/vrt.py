"""Official PyTorch VRT state_dict -> our Flax NNX VRT.

The official names (models/network_vrt.py) are mapped one to one onto our parameters, with the layout changes:
Linear (out, in) -> kernel (in, out); Conv2d (O, I, kh, kw) and per-frame Conv3d (O, I, 1, kh, kw) -> HWIO;
LayerNorm weight -> scale; the DCN weight keeps the PyTorch layout. Every official parameter must be used exactly
once and every parameter of ours filled; buffers that are pure functions of the configuration
(relative_position_index, position_bias, SpyNet's mean/std) may be absent and are checked when present.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrtspike_jax.models.vrt import VRT, VRTConfig, config_from_official_kwargs
from vrtspike_jax.models.vrt.attention import TMSA, TMSAG, relative_position_index, sine_position_encoding
from vrtspike_jax.models.vrt.spynet import IMAGENET_MEAN, IMAGENET_STD


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the configured model (names the file and the key)."""


BUFFER_SUFFIXES = ("relative_position_index", "position_bias")
SPYNET_BUFFERS = ("spynet.mean", "spynet.std")


# ----------------------------------------------------------------------------------------------------------------
# Reading files

def read_tensor_file(path) -> Dict[str, np.ndarray]:
    """name -> NumPy array of every tensor in a `.npz` archive or a PyTorch `.pth` state_dict.

    A `.pth` may hold the dict directly or under 'params' / 'params_ema' / 'state_dict' (reading it needs torch);
    floating tensors come back as float32 and a leading 'module.' (DataParallel) is dropped from names. Every
    failure is a CheckpointError that names the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if path.is_dir() or not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: not a readable .npz archive (it is not a zip file: truncated, or a file "
                                  f"of another format renamed to .npz?)")
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: np.asarray(archive[key]) for key in archive.files}
        except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError
            raise CheckpointError(f"{path}: not a readable .npz archive ({exc})") from exc
    if suffix in (".pth", ".pt", ".ckpt"):
        try:
            import torch  # noqa: F401  (optional dependency)
        except ImportError as exc:
            raise CheckpointError(
                f"{path}: reading a PyTorch checkpoint needs torch, which is not installed. Install torch, or "
                f"convert the file to .npz on a machine that has it (np.savez(out, **{{k: v.numpy() for k, v in "
                f"state_dict.items()}})).") from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: torch.load failed ({exc})") from exc
        if isinstance(obj, Mapping):
            for wrapper in ("params", "params_ema", "state_dict"):
                if wrapper in obj and isinstance(obj[wrapper], Mapping):
                    obj = obj[wrapper]
                    break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj)}")
        tensors = {}
        for key, value in obj.items():
            if not hasattr(value, "detach"):
                raise CheckpointError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__})")
            arr = value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
            tensors[key[len("module."):] if key.startswith("module.") else key] = arr
        return tensors
    raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r}; expected .npz or .pth")


def read_state_dict(path) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Reads an official VRT state_dict from `.npz` or `.pth`; returns (params, buffers) as NumPy arrays.

    `.npz`: keys are official names, or official names behind a `param/` / `buffer/` prefix (as in
    ../shared/fixtures); with prefixes present, other keys (inputs, outputs, metadata) are ignored.
    `.pth`: a torch file holding the dict directly or under 'params' / 'params_ema' / 'state_dict' (needs torch).
    """
    tensors = read_tensor_file(path)
    prefixed = any(k.startswith(("param/", "buffer/")) for k in tensors)
    params, buffers = {}, {}
    for key, value in tensors.items():
        if prefixed:
            if key.startswith("param/"):
                params[key[len("param/"):]] = value
            elif key.startswith("buffer/"):
                buffers[key[len("buffer/"):]] = value
        else:
            (buffers if _is_buffer_name(key) else params)[key] = value
    return params, buffers


def _is_buffer_name(key: str) -> bool:
    return key.endswith(BUFFER_SUFFIXES) or key in SPYNET_BUFFERS


# ----------------------------------------------------------------------------------------------------------------
# Name mapping

Transform = Callable[[np.ndarray], np.ndarray]


def _linear(w):
    return np.ascontiguousarray(w.T)


def _conv(w):
    if w.ndim == 5:  # Conv3d with kernel (1, kh, kw): a per-frame 2-D conv
        if w.shape[2] != 1:
            raise ValueError(f"expected a Conv3d with temporal kernel 1, got weight shape {w.shape}")
        w = w[:, :, 0]
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _same(w):
    return w


def _map_leaf(module_kind: str, pname: str) -> Tuple[str, Transform]:
    if module_kind == "norm":
        return {"weight": "scale", "bias": "bias"}[pname], _same
    if module_kind == "linear":
        return {"weight": "kernel", "bias": "bias"}[pname], (_linear if pname == "weight" else _same)
    if module_kind == "conv":
        return {"weight": "kernel", "bias": "bias"}[pname], (_conv if pname == "weight" else _same)
    raise KeyError(module_kind)


def official_key_to_path(key: str, config: VRTConfig) -> Optional[Tuple[tuple, Transform]]:
    """Our parameter path and layout transform for an official parameter name, or None if it has no counterpart."""
    parts = key.split(".")
    pname = parts[-1]
    mod = parts[:-1]

    def leaf(prefix: tuple, kind: str):
        name, fn = _map_leaf(kind, pname)
        return prefix + (name,), fn

    try:
        if mod == ["conv_first"] or mod == ["conv_last"]:
            return leaf((mod[0],), "conv")
        if mod == ["conv_before_upsample", "0"]:
            return leaf(("conv_before_upsample",), "conv")
        if len(mod) == 2 and mod[0] == "upsample":
            idx = int(mod[1])
            n_convs = 1 if config.upscale == 3 else int(np.log2(config.upscale))
            if idx % 5 or idx // 5 > n_convs:
                return None
            if idx // 5 == n_convs:
                return leaf(("upsample", "conv_out"), "conv")
            return leaf(("upsample", "convs", idx // 5), "conv")
        if mod == ["norm"]:
            return leaf(("norm",), "norm")
        if mod == ["conv_after_body"]:
            return leaf(("conv_after_body",), "linear")
        m = re.fullmatch(r"spynet\.basic_module\.(\d)\.basic_module\.(\d)", ".".join(mod))
        if m:
            level, idx = int(m.group(1)), int(m.group(2))
            if idx % 2:
                return None
            return leaf(("spynet", "basic_module", level, "convs", idx // 2), "conv")
        if mod[0].startswith("stage") and mod[0] != "stage8":
            s = int(mod[0][len("stage"):]) - 1
            base = ("stages", s)
            rest = mod[1:]
            if rest == ["reshape", "1"]:
                return leaf(base + ("reshape_norm",), "norm")
            if rest == ["reshape", "2"]:
                return leaf(base + ("reshape_linear",), "linear")
            if rest in (["linear1"], ["linear2"]):
                return leaf(base + (rest[0],), "linear")
            if rest[0] in ("residual_group1", "residual_group2"):
                return _map_block(base + (rest[0],), rest[1:], pname)
            if rest == ["pa_deform"]:
                return base + ("pa_deform", pname), _same
            if len(rest) == 3 and rest[:2] == ["pa_deform", "conv_offset"]:
                idx = int(rest[2])
                if idx % 2:
                    return None
                return leaf(base + ("pa_deform", "conv_offset", idx // 2), "conv")
            if len(rest) == 2 and rest[0] == "pa_fuse":
                return leaf(base + ("pa_fuse", rest[1]), "linear")
            return None
        if mod[0] == "stage8":
            j = int(mod[1])
            if j == 0:
                if mod[2:] == ["1"]:
                    return leaf(("stage8_norm",), "norm")
                if mod[2:] == ["2"]:
                    return leaf(("stage8_linear",), "linear")
                return None
            base = ("stage8", j - 1)
            if mod[2:] == ["linear"]:
                return leaf(base + ("linear",), "linear")
            if mod[2] == "residual_group":
                return _map_block(base + ("residual_group",), mod[3:], pname)
        return None
    except (KeyError, ValueError, IndexError):
        return None


def _map_block(group: tuple, rest, pname: str):
    """rest = ['blocks', b, <submodule...>] inside a TMSAG."""
    if len(rest) < 3 or rest[0] != "blocks":
        return None
    base = group + ("blocks", int(rest[1]))
    sub = rest[2:]
    if sub in (["norm1"], ["norm2"]):
        name, fn = _map_leaf("norm", pname)
        return base + (sub[0], name), fn
    if sub == ["attn"] and pname == "relative_position_bias_table":
        return base + ("attn", pname), _same
    if len(sub) == 2 and sub[0] == "attn" and sub[1] in ("qkv_self", "qkv_mut", "proj"):
        name, fn = _map_leaf("linear", pname)
        return base + ("attn", sub[1], name), fn
    if len(sub) == 2 and sub[0] == "mlp" and sub[1] in ("fc11", "fc12", "fc2"):
        name, fn = _map_leaf("linear", pname)
        return base + ("mlp", sub[1], name), fn
    return None


# ----------------------------------------------------------------------------------------------------------------
# Loading

def _model_params(model) -> Dict[tuple, nnx.Param]:
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


class _BlockSlot:
    """Block i's part of a TMSA group's stacked parameter (leading axis: the block), read like a parameter:
    `slot.shape`, `slot[...]`. Loading writes the whole stack at once (`_write_slots`), not block by block."""

    def __init__(self, param: nnx.Param, index: int):
        self.param = param
        self.index = index

    @property
    def shape(self):
        return tuple(self.param.shape[1:])

    def __getitem__(self, item):
        return self.param[...][self.index][item]


def official_parameter_slots(model) -> Dict[tuple, Any]:
    """{path: parameter} of a VRT in the official state_dict's granularity: a TMSA group's stacked parameters
    (`TMSAG.blocks`, leading axis: the block) appear once per block, as (..., 'blocks', i, <submodule...>, name) ->
    a `_BlockSlot`; every other parameter as itself. The paths are those `official_key_to_path` gives."""
    slots: Dict[tuple, Any] = {}
    stacked = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, TMSAG) and node.blocks is not None:
            for sub, param in nnx.iter_graph(node.blocks):
                if isinstance(param, nnx.Param):
                    stacked.add(id(param))
                    for i in range(node.depth):
                        slots[tuple(path) + ("blocks", i) + tuple(sub)] = _BlockSlot(param, i)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and id(node) not in stacked:
            slots[tuple(path)] = node
    return slots


def _expected_buffer(key: str, model: VRT) -> Optional[np.ndarray]:
    """Our value of an official buffer (they are pure functions of the configuration)."""
    if key == "spynet.mean":
        return IMAGENET_MEAN.reshape(1, 3, 1, 1)
    if key == "spynet.std":
        return IMAGENET_STD.reshape(1, 3, 1, 1)
    attn_key = key.rsplit(".", 1)[0]
    path = official_key_to_path(attn_key + ".relative_position_bias_table", model.config)
    if path is None:
        return None
    node = model
    for p in path[0][:-1]:
        if isinstance(p, int) and isinstance(node, TMSA):   # a block index into a group's stacked blocks
            continue
        node = node[p] if isinstance(p, int) else getattr(node, p)
    if key.endswith("relative_position_index"):
        return relative_position_index(node.window_size)
    if key.endswith("position_bias"):
        if not node.mut_attn:
            return None
        return sine_position_encoding(node.window_size[1:], node.dim // 2)
    return None


def load_state_dict_into(model: VRT, params: Mapping[str, np.ndarray], buffers: Mapping[str, np.ndarray],
                         source: str = "state_dict") -> VRT:
    """Fills every parameter of `model` from official `params`; checks `buffers`. Raises CheckpointError naming
    the file (`source`) and each missing, extra or mis-shaped key; then the model is left as it was (every key is
    checked before any parameter is written)."""
    ours = official_parameter_slots(model)
    filled = {}   # path -> (official key, array)
    problems = []
    for key, value in params.items():
        mapped = official_key_to_path(key, model.config)
        if mapped is None or mapped[0] not in ours:
            problems.append(f"unexpected key {key!r} {tuple(value.shape)} (no such parameter in the configured VRT)")
            continue
        path, fn = mapped
        try:
            array = fn(np.asarray(value, np.float32))
        except ValueError as exc:
            problems.append(f"key {key!r}: {exc}")
            continue
        target = ours[path]
        if array.shape != tuple(target.shape):
            problems.append(f"key {key!r} has shape {tuple(value.shape)}; the configured VRT expects "
                            f"{_official_shape(tuple(target.shape), fn)}")
            continue
        if path in filled:
            problems.append(f"key {key!r} fills {'.'.join(map(str, path))}, already filled by {filled[path][0]!r}")
            continue
        filled[path] = (key, array)
    missing = [p for p in ours if p not in filled]
    if missing:
        official = sorted(official_key_of_path(p, model.config) for p in missing)
        problems.append(f"missing {len(missing)} parameter(s): " + ", ".join(official[:20]) +
                        (" ..." if len(official) > 20 else ""))
    for key, value in buffers.items():
        expected = _expected_buffer(key, model)
        if expected is None:
            problems.append(f"unexpected buffer {key!r} {tuple(np.shape(value))}")
            continue
        value = np.asarray(value)
        if value.shape != expected.shape:
            problems.append(f"buffer {key!r} has shape {value.shape}, expected {expected.shape}")
        elif np.issubdtype(expected.dtype, np.integer):
            if not np.array_equal(value, expected):
                problems.append(f"buffer {key!r} differs from the relative position index of its window")
        elif not np.allclose(value, expected, rtol=1e-5, atol=1e-6):
            problems.append(f"buffer {key!r} differs from the value the configuration implies "
                            f"(max |diff| {np.abs(value - expected).max():.3g})")
    if problems:
        raise CheckpointError(f"{source}: cannot load into VRT({_short(model.config)}):\n  " + "\n  ".join(problems))
    _write_slots(ours, {path: array for path, (_, array) in filled.items()})
    return model


def _write_slots(slots: Mapping[tuple, Any], values: Mapping[tuple, np.ndarray]) -> None:
    """Writes `values` (every slot's array) into the model: each parameter once, a TMSA group's stacked parameter
    from its blocks' arrays stacked in block order."""
    stacked: Dict[int, Tuple[nnx.Param, Dict[int, np.ndarray]]] = {}
    for path, slot in slots.items():
        if isinstance(slot, _BlockSlot):
            stacked.setdefault(id(slot.param), (slot.param, {}))[1][slot.index] = values[path]
        else:
            slot[...] = jnp.asarray(values[path], slot[...].dtype)
    for param, blocks in stacked.values():
        param[...] = jnp.asarray(np.stack([blocks[i] for i in range(len(blocks))]), param[...].dtype)


def _official_shape(our_shape, fn):
    if fn is _linear:
        return our_shape[::-1]
    if fn is _conv:
        kh, kw, i, o = our_shape
        return (o, i, kh, kw)
    return our_shape


def official_key_of_path(path, config: VRTConfig) -> str:
    """The official state_dict name of our parameter at `path` (a tuple as in `nnx.iter_graph`, or its dotted
    string): the exact inverse of `official_key_to_path` (indices of Sequentials, SpyNet's and the DCN offset convs'
    skipped activations, stage 8's numbering and the upsampler's layout are undone)."""
    parts = [str(p) for p in (path.split(".") if isinstance(path, str) else path)]
    *mod, leaf = parts
    pname = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    if len(mod) == 5 and mod[:2] == ["spynet", "basic_module"] and mod[3] == "convs":
        mod = ["spynet", "basic_module", mod[2], "basic_module", str(2 * int(mod[4]))]
    elif mod == ["conv_before_upsample"]:
        mod = ["conv_before_upsample", "0"]
    elif mod[:1] == ["upsample"]:
        n_convs = 1 if config.upscale == 3 else int(np.log2(config.upscale))
        index = 5 * n_convs if mod[1:] == ["conv_out"] else 5 * int(mod[2])
        mod = ["upsample", str(index)]
    elif mod == ["stage8_norm"]:
        mod = ["stage8", "0", "1"]
    elif mod == ["stage8_linear"]:
        mod = ["stage8", "0", "2"]
    elif mod[:1] == ["stage8"]:
        mod = ["stage8", str(int(mod[1]) + 1)] + mod[2:]
    elif mod[:1] == ["stages"]:
        rest = mod[2:]
        if rest == ["reshape_norm"]:
            rest = ["reshape", "1"]
        elif rest == ["reshape_linear"]:
            rest = ["reshape", "2"]
        elif rest[:2] == ["pa_deform", "conv_offset"]:
            rest = ["pa_deform", "conv_offset", str(2 * int(rest[2]))]
        mod = [f"stage{int(mod[1]) + 1}"] + rest
    return ".".join(mod + [pname])


def _short(config: VRTConfig) -> str:
    return (f"embed_dims={list(config.embed_dims)}, depths={list(config.depths)}, "
            f"deformable_groups={config.deformable_groups}, upscale={config.upscale}")


def load_official_vrt(path, config: Optional[VRTConfig] = None, seed: int = 0, **official_kwargs) -> VRT:
    """Our VRT with the official weights from `path` (.npz of state_dict names, or .pth when torch is installed).

    The architecture comes from `config`, or from the official constructor keywords (e.g. the values in
    main_test_vrt.py for the task; official defaults otherwise). The model is called on [N, D, H, W, 3] float32
    frames in [0, 1] (RGB) and returns the restored frames in the same layout.
    """
    if config is None:
        config = config_from_official_kwargs(**official_kwargs)
    elif official_kwargs:
        raise TypeError("give either config or official keyword arguments, not both")
    params, buffers = read_state_dict(path)
    model = VRT(config, rngs=nnx.Rngs(seed))
    return load_state_dict_into(model, params, buffers, source=os.fspath(path))


def _read_orbax_vrt_params(path: Path) -> Dict[tuple, np.ndarray]:
    """Flat {path: array} of the VRT parameters in a converted (scripts/convert_vrt_checkpoint.py) or trained
    checkpoint folder holding `params/` (the parameters of a VRTWithSpike, whose VRT lives under 'vrt')."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(os.fspath(path / "params"))
    except Exception as exc:  # orbax raises various types for unreadable folders
        raise CheckpointError(f"{path}: cannot read the Orbax parameters in {path / 'params'} ({exc})") from exc
    if not isinstance(tree, Mapping) or "vrt" not in tree:
        raise CheckpointError(f"{path}: the checkpoint's parameters have no 'vrt' part (found "
                              f"{sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__})")
    flat = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(prefix + (int(key) if isinstance(key, str) and key.isdigit() else key,), value)
        else:
            flat[prefix] = np.asarray(node)

    walk((), tree["vrt"])
    return flat


def load_official_weights_into(model, path):
    """Loads VRT weights into an existing VRT, or into the VRT part of a VRTWithSpike (whose spike branch keeps its
    own initialisation); returns the model. `path` is an official state_dict (`.npz`, or `.pth` with torch) or a
    checkpoint folder written by scripts/convert_vrt_checkpoint.py (or a training step folder). The architectures
    must agree; every parameter must be filled (errors name the key)."""
    vrt = getattr(model, "vrt", model)
    if not isinstance(vrt, VRT):
        raise TypeError(f"expected a VRT or a VRTWithSpike, got {type(model).__name__}")
    path = Path(path)
    if path.is_dir():
        flat = _read_orbax_vrt_params(path)
        ours = _model_params(vrt)
        slots = official_parameter_slots(vrt)
        if set(flat) != set(ours) and set(flat) == set(slots):
            # Written before TMSA groups stored their blocks stacked (2026-11-30): one entry per block.
            ours = slots
        problems = [f"missing {'.'.join(map(str, p))}" for p in ours if p not in flat]
        problems += [f"unexpected {'.'.join(map(str, p))}" for p in flat if p not in ours]
        problems += [f"{'.'.join(map(str, p))} has shape {flat[p].shape}, the configured VRT expects "
                     f"{tuple(ours[p].shape)}" for p in ours if p in flat and flat[p].shape != tuple(ours[p].shape)]
        if problems:
            raise CheckpointError(f"{path}: cannot load into VRT({_short(vrt.config)}):\n  " + "\n  ".join(problems))
        _write_slots(ours, flat)
        return model
    params, buffers = read_state_dict(path)
    load_state_dict_into(vrt, params, buffers, source=os.fspath(path))
    return model
