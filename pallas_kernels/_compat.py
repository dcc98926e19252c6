"""Version-dependent Pallas imports in one place (jax 0.11.x).

Most kernels use the Triton-lowered Pallas GPU backend, deprecated since jax 0.11.0 but present in
0.11.2 and 0.12 (KERNELS.md §2.1); the attention's forward and dQ tile phases, its dK/dV and the
selection's scoring also have Mosaic GPU versions (``plgpu``). Keeping the imports here lets the
kernels move to ``jax_triton`` or Mosaic GPU by editing one module.
"""

import warnings

from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

__all__ = ["SWIZZLED_128B", "dot", "pl", "plgpu", "pltriton", "silence_triton_deprecation", "triton_params"]

# SMEM layout of the Mosaic kernels' WGMMA operand tiles: 8-row x 64-column (128-byte at 16 bits) tiles,
# 128-byte swizzle.
SWIZZLED_128B = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

# 2-D tensor-core dot with optional transposes (``pl.dot`` moved to the Triton module in 0.10.2).
dot = pltriton.dot


def triton_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    """Explicit Triton compiler parameters.

    Always passed: with ``compiler_params=None`` the GPU backend that ``pallas_call`` picks differs
    between jax releases and jax main (KERNELS.md §2.1).
    """
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def silence_triton_deprecation() -> None:
    """Hides the "jax-pallas-triton" DeprecationWarning emitted on every Triton lowering."""
    warnings.filterwarnings(
        "ignore", message=".*Pallas Triton backend is deprecated.*", category=DeprecationWarning
    )
