"""The VRT port reproduces the official PyTorch VRT (fixtures in ../shared/fixtures) and guards its inputs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vrtspike_jax.convert import load_official_vrt
from vrtspike_jax.models.vrt import VRT, check_input_shape, config_from_official_kwargs, preset
from vrtspike_jax.models.vrt.warping import deform_conv2d

from conftest import rel_l2

TOL = 1e-5  # relative L2, the bound (the official float32-vs-float64 spread is 1e-6)


def video(a):  # (N, D, C, H, W) -> (N, D, H, W, C)
    return np.asarray(a).transpose(0, 1, 3, 4, 2)


def features(a):  # (N, C, D, H, W) -> (N, D, H, W, C)
    return np.asarray(a).transpose(0, 2, 3, 4, 1)


@nnx.jit
def _run(model, frames):
    return model(frames, return_intermediates=True)


@pytest.fixture(scope="module", params=["vrt_small_seed0.npz", "vrt_small_seed1_padded.npz"])
def fixture_run(request, load_fixture, fixture_file):
    z = load_fixture(request.param)
    kwargs = json.loads(str(z["config_json"]))
    model = load_official_vrt(fixture_file(request.param), **kwargs)
    out, inter = _run(model, jnp.asarray(video(z["input"])))
    return request.param, z, model, np.asarray(out), jax.tree.map(np.asarray, inter)


def test_output_matches_official(fixture_run):
    name, z, _, out, _ = fixture_run
    assert out.shape == video(z["output"]).shape
    assert rel_l2(out, video(z["output"])) <= TOL, name


def test_flows_and_aligned_images_match(fixture_run):
    name, z, _, _, inter = fixture_run
    for i in range(4):
        for direction in ("backward", "forward"):
            ref = video(z[f"inter/flows_{direction}/{i}"])
            assert rel_l2(inter[f"flows_{direction}"][i], ref) <= TOL, (name, direction, i)
    for direction in ("backward", "forward"):
        np.testing.assert_array_equal(inter[f"aligned_image_{direction}"],
                                      video(z[f"inter/aligned_image_{direction}"]))
    assert rel_l2(inter["conv_first_out"], features(z["inter/conv_first_out"])) <= TOL


def test_every_stage_output_matches(fixture_run):
    name, z, _, _, inter = fixture_run
    for s in range(1, 8):
        assert rel_l2(inter[f"stage{s}_out"], features(z[f"inter/stage{s}_out"])) <= TOL, (name, s)
    for j in (1, 2):
        assert rel_l2(inter[f"stage8_{j}_out"], features(z[f"inter/stage8_{j}_out"])) <= TOL, (name, j)


def test_stage1_parallel_warping_matches(fixture_run):
    name, z, model, _, inter = fixture_run
    if "inter/stage1/pa_input" not in z:
        pytest.skip(f"{name} stores no stage-1 warping input")
    pa_input = jnp.asarray(z["inter/stage1/pa_input"].transpose(0, 1, 3, 4, 2))
    backward, forward = model.stages[0].parallel_warp(pa_input, [jnp.asarray(inter["flows_backward"][0])],
                                                      [jnp.asarray(inter["flows_forward"][0])])
    assert rel_l2(backward, video(z["inter/stage1/pa_backward"])) <= TOL
    assert rel_l2(forward, video(z["inter/stage1/pa_forward"])) <= TOL
    # The first DCN call, with the exact offset and mask the official network handed to torchvision.
    dcn = model.stages[0].pa_deform
    nchw = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))
    out = deform_conv2d(pa_input[:, -1], nchw(z["inter/stage1/dcn_call0/offset"]), dcn.weight[...],
                        dcn.bias[...], nchw(z["inter/stage1/dcn_call0/mask"]))
    assert rel_l2(out, nchw(z["inter/stage1/dcn_call0/output"])) <= TOL


def test_execution_options_do_not_change_the_function(load_fixture, fixture_file):
    """scan over blocks, remat (of blocks, and of each block's attention) and attention / alignment chunking compute
    the same function."""
    z = load_fixture("vrt_small_seed1_padded.npz")
    kwargs = json.loads(str(z["config_json"]))
    config = config_from_official_kwargs(**kwargs).replace(scan_blocks=True, remat="full", remat_attention=True,
                                                            attention_chunk_windows=5, alignment_chunk=3)
    per_head = config.replace(attention_chunk_windows=0, attention_per_head=True, remat="dots_saveable")
    for cfg in (config, per_head):
        model = load_official_vrt(fixture_file("vrt_small_seed1_padded.npz"), config=cfg)
        out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(video(z["input"])))
        assert rel_l2(out, video(z["output"])) <= TOL, cfg


@pytest.mark.parametrize("name,count", [("deblur", 18_320_007), ("small_fixture", 1_914_795),
                                        ("sr_reds", 30_676_435)])
def test_parameter_counts_match_official(name, count):
    model = nnx.eval_shape(lambda: VRT(preset(name), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count


@pytest.mark.parametrize("shape,message", [
    ((1, 6, 60, 64, 3), "multiples of 8 and at least 64; got H=60, W=64"),
    ((1, 6, 64, 68, 3), "multiples of 8 and at least 64; got H=64, W=68"),
    ((1, 6, 56, 64, 3), "multiples of 8 and at least 64; got H=56, W=64"),
    ((1, 1, 64, 64, 3), "at least 2 frames, got D=1"),
    ((1, 6, 64, 64, 4), "3 channels"),
    ((6, 64, 64, 3), r"\[N, D, H, W, C\]"),
])
def test_bad_sizes_fail_before_compute(shape, message):
    model = nnx.eval_shape(lambda: VRT(preset("small_fixture"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=message):
        check_input_shape(shape)
    with pytest.raises(ValueError, match=message):
        model(jnp.zeros(shape))


def _variable(module, path):
    for key in path:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def test_gradients_finite_and_match_finite_differences():
    """d loss / d theta through the whole model (SpyNet, DCN, attention, reconstruction) against central
    differences along a half-gradient, half-random direction of a few parameters (float32: agreement to ~1e-2
    relative)."""
    config = preset("small_fixture", depths=(2, 2, 2, 2, 2, 2, 2, 1, 1), indep_reconsts=(8,))
    model = VRT(config, rngs=nnx.Rngs(3))
    for stage in model.stages:  # make the zero-initialised DCN offset heads non-trivial
        last = stage.pa_deform.conv_offset[-1]
        last.kernel[...] = 0.02 * jax.random.normal(jax.random.key(1), last.kernel.shape)
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.random((1, 2, 64, 64, 3), np.float32))
    target = jnp.asarray(rng.random((1, 2, 64, 64, 3), np.float32))

    def loss(m):
        return jnp.mean((m(frames) - target) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value))
    flat = dict(nnx.to_flat_state(grads))
    assert all(np.all(np.isfinite(np.asarray(g[...]))) for g in flat.values())
    # The central differences take the loss of the model's float32 output in float64: a float32 mean over the
    # 24,576 outputs rounds by ~1e-8, up to 1 % of some probes' loss differences, and how it rounds depends on the
    # reduction kernel XLA picks (YNNPACK's, or XLA's own with runtime.CPU_REDUCE_FLAG: there the float32 loss
    # failed this check). The analytic gradient is JAX's.
    output_jit = nnx.jit(lambda m: m(frames))
    target64 = np.asarray(target, np.float64)

    def loss_jit(m):
        return float(np.mean((np.asarray(output_jit(m), np.float64) - target64) ** 2))
    probes = [("conv_last", "kernel"), ("stages", 0, "pa_deform", "conv_offset", 3, "kernel"),
              ("stages", 0, "residual_group1", "blocks", "attn", "qkv_mut", "kernel"),
              ("stage8", 0, "residual_group", "blocks", "attn", "relative_position_bias_table"),
              ("spynet", "basic_module", 5, "convs", 4, "kernel")]
    for path in probes:
        grad = np.asarray(flat[path][...])
        assert np.abs(grad).max() > 0, path
        # Half along the gradient, half random: a purely random direction of a large tensor is nearly orthogonal
        # to its gradient, and a derivative that small drowns in float32 rounding of the loss. Along this
        # direction a gradient that is wrong in size or in direction still shows.
        noise = rng.standard_normal(grad.shape).astype(np.float32)
        direction = grad / np.linalg.norm(grad) + noise / np.linalg.norm(noise)
        direction /= np.linalg.norm(direction)
        analytic = float(np.sum(grad * direction))
        var = _variable(model, path)
        base = np.asarray(var[...])
        # A step that moves the loss by ~1e-4 of its value: far above float32 rounding (~1e-7 of it), small
        # enough for the piecewise-linear samplers to stay linear on average.
        eps = min(5e-5 * float(value) / abs(analytic), 1e-2 * float(np.linalg.norm(base)))
        values = []
        for t in (eps, -eps):
            var[...] = jnp.asarray(base + t * direction)
            values.append(float(loss_jit(model)))
        var[...] = jnp.asarray(base)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-7, (path, numeric, analytic)


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("with_labels", [True, False])
def test_window_attention_has_the_value_and_gradients_of_softmax_attention(per_head, with_labels):
    """attention.window_attention writes out its gradient (probabilities recomputed from the saved log-sum-exp,
    the bias's sum over windows as a matrix-vector product): value and the gradients of q, k, v and the bias equal
    autodiff of plain softmax attention with the bias and the official -100 region mask, one head at a time or all
    heads at once."""
    from vrtspike_jax.models.vrt.attention import window_attention

    rng = np.random.default_rng(0)
    heads, windows, n, hd = 3, 5, 32, 8
    q, k, v, weight = (jnp.asarray(rng.standard_normal((heads, windows, n, hd)), jnp.float32) for _ in range(4))
    bias = jnp.asarray(rng.standard_normal((heads, n, n)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, (windows, n)), jnp.int32) if with_labels else None

    def plain(q, k, v, bias):
        logits = jnp.einsum("hbqd,hbkd->hbqk", q * 0.25, k) + bias[:, None]
        if labels is not None:
            logits = logits + jnp.where(labels[:, :, None] == labels[:, None, :], 0.0, -100.0)[None]
        return jnp.einsum("hbqk,hbkd->hbqd", jax.nn.softmax(logits, axis=-1), v)

    def loss(attend, *args):
        return jnp.sum(jnp.tanh(attend(*args)) * weight)

    ours = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda *b: window_attention(*b, labels, 0.25, per_head), *a), argnums=(0, 1, 2, 3)))
    reference = jax.jit(jax.value_and_grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2, 3)))
    (value, grads), (value_ref, grads_ref) = ours(q, k, v, bias), reference(q, k, v, bias)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for name, grad, grad_ref in zip("qkvb", grads, grads_ref):
        assert grad.shape == grad_ref.shape and grad.dtype == grad_ref.dtype, name
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=2e-6 * float(jnp.max(jnp.abs(grad_ref))),
                                   err_msg=name)
    np.testing.assert_allclose(window_attention(q, k, v, bias, labels, 0.25, per_head), plain(q, k, v, bias),
                               rtol=1e-5, atol=1e-6)


def test_drop_path_masks_keep_each_sample_with_one_minus_the_block_rate():
    from vrtspike_jax.models.vrt.attention import draw_keep_masks

    masks = np.asarray(draw_keep_masks(jax.random.key(3), [0.0, 0.2, 0.5], 20_000))
    assert masks.shape == (3, 2, 20_000) and masks.dtype == bool
    assert masks[0].all()                                    # rate 0: every sample kept
    np.testing.assert_allclose(masks[1:].mean(axis=-1), [[0.8, 0.8], [0.5, 0.5]], atol=0.015)
    assert (masks[1, 0] != masks[1, 1]).any() and (masks[1] != masks[2]).any()   # independent draws


@pytest.mark.parametrize("remat", ["none", "full"])
def test_drop_path_in_a_group_is_the_drawn_masks_whether_blocks_are_scanned_or_not(remat):
    """A TMSA group in training (an rng given): scanned and unrolled blocks draw the same masks from the group's key,
    and the output is the blocks applied one by one with those masks (dropped residuals rescaled by 1 / keep)."""
    from vrtspike_jax.models.vrt.attention import TMSAG, draw_keep_masks

    rates = [0.0, 0.4, 0.6, 0.8]
    x = jax.random.normal(jax.random.key(0), (6, 2, 8, 8, 8))
    rng = jax.random.key(7)
    outs = {}
    for scan in (True, False):
        group = TMSAG(8, 4, 2, (2, 4, 4), mut_attn=False, drop_path=rates, remat=remat, scan_blocks=scan,
                      rngs=nnx.Rngs(1))
        outs[scan] = np.asarray(group(x, rng))
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-5, atol=1e-5)

    masks = draw_keep_masks(rng, rates, x.shape[0])
    from vrtspike_jax.models.vrt.attention import compute_region_labels, get_window_size

    window, shift = get_window_size((2, 8, 8), group.window_size, group.shift_size)
    labels = compute_region_labels(2, 8, 8, window, shift)
    y = x
    graphdef, stacked = nnx.split(group.blocks)
    for i in range(4):   # block i: index i of the stacked parameters, unshifted for even i, shifted for odd i
        block = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[i], stacked))
        y = block(y, labels, masks[i], rates[i], shift_size=(0, 0, 0) if i % 2 == 0 else group.shift_size)
    np.testing.assert_allclose(outs[False], np.asarray(y), rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[False], np.asarray(group(x, None)), atol=1e-3)   # some residuals were dropped


def test_a_group_stores_its_blocks_stacked_with_the_values_of_blocks_drawn_one_by_one():
    """TMSAG keeps one TMSA module whose parameters have a leading block axis (one optimizer leaf per parameter
    kind, not per block); block i's slice is exactly the block that TMSA(...) drawn i-th from the same Rngs would be,
    so initial values do not depend on the storage."""
    from vrtspike_jax.models.vrt.attention import TMSA, TMSAG

    group = TMSAG(8, 3, 2, (2, 4, 4), mut_attn=True, rngs=nnx.Rngs(3))
    rngs = nnx.Rngs(3)
    separate = [nnx.state(TMSA(8, 2, (2, 4, 4), (0, 0, 0), mut_attn=True, rngs=rngs), nnx.Param) for _ in range(3)]
    stacked = nnx.state(group.blocks, nnx.Param)
    leaves = jax.tree.leaves(stacked)
    assert leaves and all(leaf.shape[0] == 3 for leaf in leaves)
    for i, state in enumerate(separate):
        for got, want in zip(jax.tree.leaves(jax.tree.map(lambda leaf: leaf[i], stacked)), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(leaves[0][0]), np.asarray(leaves[0][1]))   # distinct blocks


@pytest.mark.parametrize("tie_parameters", [True, False])
def test_a_stages_gradients_come_before_its_input_gradient_unchanged(tie_parameters):
    """vrt.gradients_before_input is the identity and leaves every gradient as it was: it only adds zero times
    elements of the stage's flow (and parameter) cotangents to the input's (an ordering for XLA's scheduler)."""
    from vrtspike_jax.models.vrt.vrt import gradients_before_input

    rng = np.random.default_rng(1)
    state = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "b": jnp.asarray(rng.standard_normal(3))}
    x = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    flows = [jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)]

    def stage(state, x, flows):
        return jnp.sum(jnp.tanh(x @ state["w"] + state["b"] + flows[0]) ** 2)

    def tied(state, x, flows):
        return stage(*gradients_before_input(state, x, flows, tie_parameters))

    plain = jax.jit(jax.value_and_grad(stage, argnums=(0, 1, 2)))(state, x, flows)
    ours = jax.jit(jax.value_and_grad(tied, argnums=(0, 1, 2)))(state, x, flows)
    assert ours[0] == plain[0]
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_array_equal(a, b)


def test_a_stage_has_the_same_value_and_gradients_with_and_without_remat_and_its_ordering_ties():
    """A whole stage (mutual and self TMSA groups, flow-guided DCN alignment, fusion MLP) rematerialised with its
    ordering ties (the self group's, the alignment's, the fusion MLP's and each TMSA block MLP's parameter gradients
    before their input gradients), with its alignment problems in sequential chunks (alignment_chunk), and with each
    block's attention recomputed once more after its MLP's backward pass (remat_attention), computes the value and
    every gradient (parameters, input, flows) of the plain stage."""
    from vrtspike_jax.models.vrt.stages import Stage

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 3, 16, 16, 8)), jnp.float32)
    # Bilinear sampling's gradient jumps where a sampling position crosses an integer, so the variants (whose
    # float32 sums run in other orders) are compared at a point where every DCN sampling position is at least 0.1
    # pixel from one: flows of whole pixels plus 0.5 +- 0.2 and offset residues under 0.2 pixel (the last offset
    # conv's noise below). With flows drawn from a normal, one DCN position lay 4e-6 pixel below an integer, and
    # on an AMD EPYC host at --xla_backend_optimization_level=0 the plain stage put it on the integer: 0.4 % apart.
    whole_pixels = lambda: np.round(2 * rng.standard_normal((1, 2, 16, 16, 2))) + 0.5  # noqa: E731
    flows = [jnp.asarray(whole_pixels() + rng.uniform(-0.2, 0.2, (1, 2, 16, 16, 2)), jnp.float32)]
    flows_fw = [jnp.asarray(whole_pixels() + rng.uniform(-0.2, 0.2, (1, 2, 16, 16, 2)), jnp.float32)]
    results = []
    # 2 x 2 alignment problems (backward and forward, 2 frame pairs): alignment_chunk 2 runs them in 2 chunks.
    for remat, tie, chunk, attention in (("none", True, 0, False), ("full", True, 0, False), ("full", False, 0, False),
                                         ("full", True, 2, False), ("full", True, 0, True)):
        stage = Stage(8, 8, 2, 2, (2, 8, 8), reshape="none", deformable_groups=2, remat=remat,
                      tie_parameter_gradients=tie, alignment_chunk=chunk, remat_attention=attention,
                      rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(stage)
        noise = np.random.default_rng(4)     # away from the zero-initialised offset conv, the same for each stage

        def perturb(path, p):
            last_offset_conv = "conv_offset" in jax.tree_util.keystr(path) and "[3]" in jax.tree_util.keystr(path)
            return p + (1e-4 if last_offset_conv else 0.1) * jnp.asarray(noise.standard_normal(p.shape), p.dtype)

        state = jax.tree_util.tree_map_with_path(perturb, state)

        def loss(state, x, fb, ff, graphdef=graphdef):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, fb, ff)) ** 2)

        results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(state, x, flows, flows_fw))
    plain, tied, untied, chunked, attention_again = results
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(plain[1]))    # every gradient reaches its input
    # The ties add zeros; the programs may still sum in another order (measured: 2e-7 relative).
    assert tied[0] == untied[0]
    for a, b in zip(jax.tree.leaves(tied[1]), jax.tree.leaves(untied[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))
    # Against the plain stage, float32 sums in another order (measured: 7e-6 of each leaf's largest gradient).
    for variant in (tied, chunked, attention_again):
        np.testing.assert_allclose(variant[0], plain[0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(variant[1]), jax.tree.leaves(plain[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5 * float(np.abs(b).max()))


def test_a_block_recomputed_after_its_output_cotangent_has_the_gradients_of_jax_checkpoint():
    """layers.checkpoint_after_cotangent: the value and every gradient of the function (parameters, an activation,
    a per-sample input, one with another leading dimension, which is left untied)."""
    from vrtspike_jax.models.vrt.layers import checkpoint_after_cotangent

    rng = np.random.default_rng(2)
    state = {"w": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)        # [B, tokens, C]
    keep = jnp.asarray([1.0, 0.5], jnp.float32)                           # [B]
    table = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)         # leading dimension not the batch

    def block(state, x, keep, table):
        return jnp.tanh(x @ state["w"] + table[:3]) * keep[:, None, None] + x

    def loss(fn):
        return lambda *args: jnp.sum(jnp.sin(fn(*args)) ** 2)

    args = (state, x, keep, table)
    plain = jax.jit(jax.value_and_grad(loss(jax.checkpoint(block)), argnums=(0, 1, 2, 3)))(*args)
    ours = jax.jit(jax.value_and_grad(loss(checkpoint_after_cotangent(block)), argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_array_equal(ours[0], plain[0])
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_array_equal(a, b)
