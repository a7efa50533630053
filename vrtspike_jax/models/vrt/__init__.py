"""The VRT port (official JingyunLiang/VRT models/network_vrt.py) in Flax NNX, channels-last."""
from vrtspike_jax.models.vrt.config import (PRESETS, VRTConfig, check_input_shape, config_from_official_kwargs,
                                            deblur_config, preset, small_fixture_config, sr_reds_config)
from vrtspike_jax.models.vrt.vrt import VRT

__all__ = ["PRESETS", "VRT", "VRTConfig", "check_input_shape", "config_from_official_kwargs", "deblur_config",
           "preset", "small_fixture_config", "sr_reds_config"]
