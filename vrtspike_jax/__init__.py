"""vrtspike-jax: spike-guided video deblurring (VRT + spike branch) in JAX / Flax NNX."""
from vrtspike_jax import runtime as _runtime

_runtime.prefer_memory_scheduler_on_cpu()
