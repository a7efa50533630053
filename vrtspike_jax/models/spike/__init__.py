"""Spike branch: SpikeEncoder3D (Conv3D residual pyramid) and SpikeTemporalSA (attention along time)."""
from vrtspike_jax.models.spike.encoder import ResidualBlock3D, SpikeEncoder3D
from vrtspike_jax.models.spike.temporal_sa import SpikeTemporalSA, SpikeTemporalSABlock

__all__ = ["ResidualBlock3D", "SpikeEncoder3D", "SpikeTemporalSA", "SpikeTemporalSABlock"]
