"""vrtspike-jax: spike-guided video deblurring (VRT + spike branch) in JAX / Flax NNX.

Importing the package changes nothing in the process: the entry points (main.py, scripts/*.py) make the
process-wide XLA settings first thing (vrtspike_jax/runtime.py).
"""
