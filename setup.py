"""vrtspike-jax: spike-guided video deblurring (VRT + spike branch) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="vrtspike-jax",
    version="0.1.0",
    description="JAX/Flax implementation of spike-guided video deblurring on a VRT backbone",
    python_requires=">=3.11",
    packages=find_packages(include=["vrtspike_jax", "vrtspike_jax.*", "data_pipelines", "data_pipelines.*"]),
    install_requires=[
        # Bounds resolve on Python 3.11 (jax 0.10.2) and admit the GPU image (Python 3.12, jax 0.11).
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.14",
        "einops>=0.8",
        "numpy>=1.26",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "clu>=0.0.12",
        "tensorboard>=2.16",
        "tensorflow-cpu>=2.21,<2.23; platform_system=='Linux'",
        "tensorflow>=2.21,<2.23; platform_system!='Linux'",
        "tensorflow-datasets>=4.9.10",
        "scikit-image>=0.24",
        "scipy>=1.11",
        "pillow>=10",
        "psutil>=5.9",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # pytest 9.2 builds node ids from a structured id that pytest-xdist 3.8's `--dist loadgroup` does not update
        # (pytest-dev/pytest-xdist#1386): the groups of tests/conftest.py are then silently ignored and every module
        # fixture (the reference training run, the comparison's runs) is made on both workers.
        "test": ["pytest>=8,<9.2", "pytest-xdist>=3.6"],
    },
)
