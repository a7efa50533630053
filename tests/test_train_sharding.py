"""The sharded train step on 8 fake CPU devices (subprocess) equals the single-device step on the same global batch:
the loss and the updated parameters (relative 1e-6 of the parameters' norm and largest value), with the data axis alone (data=8) and with the
parameter-sharding axis (data=2 x fsdp=4, parameters and optimizer state split over fsdp)."""
import subprocess
import sys
import textwrap

import numpy as np

import helpers as testing

SCRIPT = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    from configs import baseline
    from vrtspike_jax import factory
    from vrtspike_jax.train import sharding, train_lib

    out = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    config = baseline.get_config("tiny")
    config.global_batch_size = 8
    config.optimizer.warmup_steps = 0
    # Adam divides by sqrt(v) + eps: with eps 1e-8, float32 rounding noise of gradients that are ~0 (e.g. attention
    # key biases, whose gradient is exactly 0) is normalised to +-lr, so summation order alone would move those
    # parameters by ~lr. A larger eps keeps the comparison about the sharding, not about amplified rounding noise.
    config.optimizer.eps = 1e-3
    config.mesh.fsdp_min_size = 256
    host_params = factory.initial_params(config)
    rng = np.random.default_rng(0)
    batches = [{"blur": rng.uniform(size=(8, 2, 64, 64, 3)).astype(np.float32),
                "sharp": rng.uniform(size=(8, 2, 64, 64, 3)).astype(np.float32),
                "spike_vox": rng.normal(size=(8, 2, 64, 64, 4)).astype(np.float32)}]
    for name, mesh_config, devices in (("single", {"data": 1, "fsdp": 1}, 1), ("data8", {"data": 8, "fsdp": 1}, 8),
                                       ("data2_fsdp4", {"data": 2, "fsdp": 4}, 8)):
        config.mesh.update(mesh_config)
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:devices])
        setup = train_lib.build_train_setup(config, mesh)
        params, train_state = setup.init_state(host_params, config.seed)
        sharded_leaves = sum("fsdp" in str(p.sharding.spec) for p in jax.tree.leaves(params))
        sharded_moments = sum("fsdp" in str(p.sharding.spec) for p in jax.tree.leaves(train_state["opt_state"]))
        step = setup.jit_step()
        losses = []
        for batch in batches:
            global_batch = sharding.global_batch(batch, mesh, setup.keys)
            assert len(global_batch["blur"].sharding.device_set) == devices
            params, train_state, metrics = step(params, train_state, global_batch, setup.vgg_params)
            losses.append(float(metrics["loss"]))
        flat = {"/".join(map(str, path)): np.asarray(leaf) for path, leaf in
                jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(f"{out}/{name}.npz", losses=np.array(losses), sharded=np.array([sharded_leaves, sharded_moments]),
                 **{"param:" + k: v for k, v in flat.items()})
    print("done")
''')


def test_sharded_steps_equal_the_single_device_step(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=testing.REPO_ROOT,
                            env=testing.subprocess_env(device_count=8), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, testing.tail(result)
    single = np.load(tmp_path / "single.npz")
    assert single["sharded"].tolist() == [0, 0]
    for name in ("data8", "data2_fsdp4"):
        sharded = np.load(tmp_path / f"{name}.npz")
        np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-6, err_msg=name)
        keys = [k for k in single.files if k.startswith("param:")]
        assert keys and sorted(keys) == sorted(k for k in sharded.files if k.startswith("param:"))
        diff = np.sqrt(sum(np.sum((sharded[k].astype(np.float64) - single[k]) ** 2) for k in keys))
        norm = np.sqrt(sum(np.sum(single[k].astype(np.float64) ** 2) for k in keys))
        assert diff <= 1e-6 * norm, (name, diff / norm)
        largest = max(float(np.abs(single[k]).max()) for k in keys)
        worst = max(keys, key=lambda k: float(np.abs(sharded[k] - single[k]).max()))
        assert float(np.abs(sharded[worst] - single[worst]).max()) <= 1e-6 * largest, (name, worst)
        if name == "data2_fsdp4":  # parameters and Adam moments really are split over the fsdp axis
            assert sharded["sharded"][0] > 50 and sharded["sharded"][1] >= 2 * sharded["sharded"][0]
