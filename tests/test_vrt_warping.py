"""The sampling ops of the VRT port against torchvision / F.grid_sample / F.interpolate fixtures."""
import json

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
