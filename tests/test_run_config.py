"""The typed training config (vrtspike_jax/train/run_config.py): read once, frozen, every key known and typed."""
import dataclasses

import pytest

from configs import baseline
from vrtspike_jax.inference import TileSpec
from vrtspike_jax.train import checkpointing, run_config
from vrtspike_jax.train.preflight import ConfigError


@pytest.mark.parametrize("variant", [""] + sorted(baseline.VARIANTS))
def test_every_variant_reads_and_round_trips(variant):
    source = baseline.get_config(variant)
    config = run_config.read(source)
    # What checkpoints save of the typed config is what the ConfigDict was (references and placeholders resolved).
    assert run_config.to_dict(config) == checkpointing.config_to_dict(source)
    assert run_config.read(run_config.to_dict(config)) == config
    assert run_config.read(config) is config


def test_values_are_typed_and_the_config_is_frozen():
    config = run_config.read(baseline.get_config("tiny,lora"))
    assert isinstance(config.optimizer.warmup_steps, int) and isinstance(config.optimizer.learning_rate, float)
    assert isinstance(config.eval.tile, TileSpec) and isinstance(config.lora.targets, tuple)
    assert config.optimizer.groups["backbone"] == run_config.GroupSettings(1.0, -1)
    assert config.model.spike_bins == config.data.num_bins      # the reference of the defaults, resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optimizer.learning_rate = 1.0
    with pytest.raises(AttributeError):
        config.data.num_bins = 3


def test_the_lean_variant_turns_on_every_memory_lever_of_the_model_it_builds():
    """`:lean` (docs/TRAINING.md section 2d): the model built from the config gets all four levers, and only they
    differ from the default's."""
    from vrtspike_jax import factory

    default = factory.model_config(baseline.get_config("tiny").model)
    lean = factory.model_config(baseline.get_config("tiny,lean").model)
    assert (lean.vrt.remat_stages, lean.vrt.remat_attention, lean.vrt.alignment_chunk, lean.fusion_chunk_rows) == \
        (True, True, 2, 32)
    assert dataclasses.replace(lean, vrt=dataclasses.replace(
        lean.vrt, remat_stages=default.vrt.remat_stages, remat_attention=default.vrt.remat_attention,
        alignment_chunk=default.vrt.alignment_chunk), fusion_chunk_rows=default.fusion_chunk_rows) == default


def _saved(variant="tiny"):
    return checkpointing.config_to_dict(baseline.get_config(variant))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["optimizer"].update(lernig_rate=1.0),
     "unknown config key 'optimizer.lernig_rate': did you mean 'optimizer.learning_rate'?"),
    (lambda d: d["optimizer"].pop("warmup_steps"), "config key 'optimizer.warmup_steps' is missing"),
    (lambda d: d["optimizer"].update(warmup_steps=2.5), "optimizer.warmup_steps=2.5: expected an integer"),
    (lambda d: d["checkpoint"].update(keep_last="three"), "checkpoint.keep_last='three': expected an integer"),
    (lambda d: d["optimizer"].update(restart_at=-1), "optimizer.restart_at=-1: expected 0"),
    (lambda d: d["optimizer"].update(ema_decay=1.0), "optimizer.ema_decay=1.0: expected 0 (no EMA)"),
    (lambda d: d["eval"]["tile"].update(spatial=100), "eval.tile: TileSpec.spatial must be 0 (whole frame) or a "
                                                      "multiple of 8"),
    (lambda d: d.update(mesh=4), "mesh=4: expected a section"),
])
def test_bad_configs_are_one_line_errors_naming_the_key(edit, message):
    values = _saved()
    edit(values)
    with pytest.raises(ConfigError) as info:
        run_config.read(values)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_saved_config_of_an_older_version_reads_with_the_new_names_and_defaults():
    values = _saved()
    values["model"]["init_vrt_from"] = "weights/vrt_gopro"      # where the start weights used to be
    del values["init"]["vrt_from"]
    del values["lora"]                                          # saved before LoRA existed
    del values["optimizer"]["groups"]["lora"]
    with pytest.raises(ConfigError, match="'lora' is missing"):
        run_config.read(values)
    config = run_config.read(values, fill_defaults=True)
    assert config.init.vrt_from == "weights/vrt_gopro" and "init_vrt_from" not in config.model
    assert config.lora.rank == 0 and config.optimizer.groups["lora"] == run_config.GroupSettings(1.0, 0)
    assert config.total_steps == baseline.get_config("tiny").total_steps   # saved values win over the defaults
