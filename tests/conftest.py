"""Test-wide JAX settings: 32-bit (Pallas interpret mode needs it) and no silent rank promotion.

On CPU the host platform is split into 8 devices so that sharded code (data and context parallelism)
is tested without GPUs; unsharded computations still run on one device.
"""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import pytest

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_rank_promotion", "raise")
# float32 references at full precision on GPUs too (XLA would otherwise use TF32 for f32 matmuls).
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
