"""The sampling ops of the VRT port against torchvision / F.grid_sample / F.interpolate fixtures."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrtspike_jax.models.vrt import warping


def nhwc(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def test_flow_warp_cases(load_fixture):
    z = load_fixture("flow_warp_cases.npz")
    cases = json.loads(str(z["cases_json"]))
    assert len(cases) == 12
    for case in cases:
        out = np.asarray(warping.flow_warp(jnp.asarray(nhwc(z[case["input"]])), jnp.asarray(z[case["flow"]]),
                                           case["interp_mode"], case["padding_mode"]))
        ref = nhwc(z[case["output"]])
        if case["interp_mode"] == "nearest4":
            np.testing.assert_array_equal(out, ref, err_msg=case["name"])
        else:
            np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6, err_msg=case["name"])


def test_deform_conv2d_cases(load_fixture):
    z = load_fixture("deform_conv2d_cases.npz")
    cases = json.loads(str(z["cases_json"]))
    assert len(cases) == 7
    for case in cases:
        get = lambda key: None if case[key] is None else z[case[key]]
        mask = get("mask")
        out = warping.deform_conv2d(
            jnp.asarray(nhwc(get("input"))), jnp.asarray(nhwc(get("offset"))), jnp.asarray(get("weight")),
            None if get("bias") is None else jnp.asarray(get("bias")),
            None if mask is None else jnp.asarray(nhwc(mask)),
            stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
        np.testing.assert_allclose(np.asarray(out), nhwc(get("output")), rtol=0, atol=1e-6, err_msg=case["name"])


def _reference_deform_conv2d(images, offset, weight, mask, stride, padding, dilation):
    """torchvision's deform_conv2d written out group by group and tap by tap, differentiated by JAX's autodiff:
    the reference for deform_conv2d's hand-written gradient."""
    n, h, w, cin = images.shape
    cout, cin_per_wgroup, kh, kw = weight.shape
    taps = kh * kw
    groups = offset.shape[-1] // (2 * taps)
    cg = cin // groups
    _, ho, wo, _ = offset.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    by_group = images.reshape(n, h, w, groups, cg)
    sample_index, group_index = jnp.arange(n)[:, None, None, None], jnp.arange(groups)
    columns = []
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            y = (jnp.arange(ho) * sh - ph + i * dh)[None, :, None, None] + offset[..., 2 * k::2 * taps]
            x = (jnp.arange(wo) * sw - pw + j * dw)[None, None, :, None] + offset[..., 2 * k + 1::2 * taps]
            y0, x0 = jnp.floor(y), jnp.floor(x)
            value = 0.0
            for row, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for col, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    inside = (row >= 0) & (row <= h - 1) & (col >= 0) & (col <= w - 1)
                    corner = by_group[sample_index, jnp.clip(row, 0, h - 1).astype(jnp.int32),
                                      jnp.clip(col, 0, w - 1).astype(jnp.int32), group_index]   # [n, ho, wo, G, cg]
                    value = value + jnp.where(inside, wy * wx, 0.0)[..., None] * corner
            if mask is not None:
                value = value * mask[..., k::taps][..., None]
            columns.append(value.reshape(n, ho, wo, cin))
    columns = jnp.stack(columns, axis=-1).reshape(n, ho, wo, cin // cin_per_wgroup, cin_per_wgroup, taps)
    weight = weight.reshape(cin // cin_per_wgroup, cout // (cin // cin_per_wgroup), cin_per_wgroup, taps)
    out = jnp.einsum("nhwgck,gock->nhwgo", columns, weight, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(n, ho, wo, cout)


def _value_and_vjp(f):
    """jit of (cotangent, *args) -> (f(*args), f's vector-Jacobian product with the cotangent)."""
    def run(cotangent, *args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cotangent)
    return jax.jit(run)


def test_deform_conv2d_gradients_match_autodiff_of_a_written_out_reference(load_fixture):
    """deform_conv2d's gradient (its rematerialised tap loop and the sampling's hand-written gradient) against
    autodiff of the plain formula, on every fixture case (offset groups, weight groups, stride, dilation, samples
    outside the image, no mask), with a random output cotangent: the gradients of the input, the offsets, the mask
    and the weight."""
    z = load_fixture("deform_conv2d_cases.npz")
    rng = np.random.default_rng(0)
    for case in json.loads(str(z["cases_json"])):
        get = lambda key: None if case[key] is None else jnp.asarray(z[case[key]])
        images, offset, weight = jnp.asarray(nhwc(get("input"))), jnp.asarray(nhwc(get("offset"))), get("weight")
        mask = None if get("mask") is None else jnp.asarray(nhwc(get("mask")))
        geometry = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
        ours = lambda i, o, m, w: warping.deform_conv2d(i, o, w, None, m, **geometry)
        theirs = lambda i, o, m, w: _reference_deform_conv2d(i, o, w, m, **geometry)
        args = (images, offset, mask, weight)
        cotangent = jnp.asarray(rng.normal(size=nhwc(get("output")).shape), jnp.float32)
        out, grads = _value_and_vjp(ours)(cotangent, *args)
        ref_out, ref_grads = _value_and_vjp(theirs)(cotangent, *args)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=0, atol=1e-5, err_msg=case["name"])
        for name, got, want in zip(("input", "offset", "mask", "weight"), grads, ref_grads):
            if want is None:
                assert got is None, (case["name"], name)
                continue
            scale = float(np.abs(np.asarray(want)).max())
            assert scale > 0, (case["name"], name)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * scale,
                                       err_msg=f"{case['name']}: gradient of the {name}")


@pytest.mark.parametrize("name,call", [
    ("up_to_32multiple", lambda a: warping.resize_bilinear(a, (64, 96), align_corners=False)),
    ("down_from_32multiple", lambda a: warping.resize_bilinear(a, (50, 70), align_corners=False)),
    ("flow_up2_align_corners", lambda a: warping.resize_bilinear(a, (6, 10), align_corners=True)),
    ("replicate_pad_bottom_right", lambda a: warping.pad_replicate_end(a, 1, 1)),
    ("avg_pool2_odd", warping.avg_pool2x2),
])
def test_spynet_resize_cases(load_fixture, name, call):
    z = load_fixture("spynet_resize_cases.npz")
    out = np.asarray(call(jnp.asarray(nhwc(z[f"{name}/input"]))))
    np.testing.assert_allclose(out, nhwc(z[f"{name}/output"]), rtol=0, atol=1e-6)


def test_flow_warp_rejects_mismatched_flow():
    with pytest.raises(ValueError, match="flow must have shape"):
        warping.flow_warp(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 9, 2)))


def test_zero_flow_is_identity_and_integer_flow_shifts():
    rng = np.random.default_rng(0)
    img = rng.random((2, 9, 11, 4)).astype(np.float32)
    out = warping.flow_warp(jnp.asarray(img), jnp.zeros((2, 9, 11, 2)))
    np.testing.assert_array_equal(np.asarray(out), img)
    flow = np.zeros((2, 9, 11, 2), np.float32)
    flow[..., 0] = 2.0  # sample two pixels to the right
    out = np.asarray(warping.flow_warp(jnp.asarray(img), jnp.asarray(flow)))
    np.testing.assert_array_equal(out[:, :, :-2], img[:, :, 2:])
    np.testing.assert_array_equal(out[:, :, -2:], 0.0)  # zeros padding
    out = np.asarray(warping.flow_warp(jnp.asarray(img), jnp.asarray(flow), padding_mode="border"))
    np.testing.assert_array_equal(out[:, :, -2:], img[:, :, -1:].repeat(2, axis=2))


BATCH_SHARDED_DCN = """
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from vrtspike_jax.models.vrt import warping

mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
batch, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
rng = np.random.default_rng(0)
put = lambda shape, sharding, scale=1.0: jax.device_put(jnp.asarray(rng.normal(size=shape) * scale, jnp.float32),
                                                       sharding)
images, offset = put((4, 16, 16, 16), batch), put((4, 16, 16, 2 * 4 * 9), batch, 3.0)
mask, weight = put((4, 16, 16, 4 * 9), batch), put((16, 16, 3, 3), whole)
flow = put((4, 16, 16, 2), batch, 4.0)

def loss(images, offset, mask, weight, flow):
    out = warping.deform_conv2d(images, offset, weight, None, mask)
    return jnp.sum(out ** 2) + jnp.sum(warping.flow_warp(images, flow) ** 2)

text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(images, offset, mask, weight, flow).compile().as_text()
for computation in re.split(r"\\n(?=\\S)", text):
    for line in computation.splitlines():
        m = re.search(r" = (.+?) (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\\(", line)
        if m:   # one line per array (a combined collective has a tuple of them)
            for shape in re.findall(r"[a-z0-9]+\\[[0-9,]*\\]", m.group(1)):
                print("COLLECTIVE", computation.split(" ", 1)[0], m.group(2), shape)
"""


def test_batch_sharded_sampling_gradients_need_no_activation_sized_collective():
    """With the batch split over devices, the gradients of deform_conv2d and flow_warp are computed where the samples
    are: the only collective is the weight gradient's sum over the batch (16x16x3x3), outside the tap loop. (The
    scatter of the image gradient over a flattened batch index made XLA all-reduce the whole image gradient, four
    times per tap, and inside deform_conv2d's loop those collectives ran out of order in a two-process CPU run.)"""
    import subprocess
    import sys

    import helpers as testing

    result = subprocess.run([sys.executable, "-c", BATCH_SHARDED_DCN], capture_output=True, text=True, timeout=300,
                            env=testing.subprocess_env(device_count=2))
    assert result.returncode == 0, result.stderr[-3000:]
    collectives = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("COLLECTIVE")]
    assert collectives, "the weight gradient's sum over the batch should be one collective"
    for computation, kind, shape in collectives:
        size = int(np.prod([int(d) for d in shape[shape.index("[") + 1:-1].split(",") if d]))
        assert computation == "ENTRY" and kind == "all-reduce" and size <= 16 * 16 * 3 * 3, (computation, kind, shape)
