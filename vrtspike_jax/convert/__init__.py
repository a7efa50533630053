"""Converters from official PyTorch checkpoints to our Flax modules (no torch needed for .npz files)."""
from vrtspike_jax.convert.vrt import (CheckpointError, load_official_vrt, load_official_weights_into,
                                      load_state_dict_into, official_key_of_path, official_key_to_path,
                                      official_parameter_slots,
                                      read_state_dict, read_tensor_file)

__all__ = ["CheckpointError", "load_official_vrt", "load_official_weights_into", "load_state_dict_into",
           "official_key_of_path", "official_key_to_path", "official_parameter_slots",
           "read_state_dict", "read_tensor_file"]
