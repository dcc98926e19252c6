"""Lowering Pallas Triton kernels for a CUDA target on a machine without a GPU."""

import jax


def lower_for_h200(fn, *args) -> str:
    """The text of ``jax.jit(fn)`` lowered for an NVIDIA H200 (Pallas -> Triton IR), without a GPU.

    An abstract mesh names the device, so the Triton lowering sees its compute capability; interpret
    mode, which the CPU tests otherwise use, never runs this lowering.
    """
    mesh = jax.sharding.AbstractMesh(
        (1,),
        ("x",),
        (jax.sharding.AxisType.Explicit,),
        abstract_device=jax.sharding.AbstractDevice(
            device_kind="NVIDIA H200", num_cores=None, platform="gpu"
        ),
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
