"""Barrier helpers shared by the Mosaic GPU kernels (attention tile phases and selection scoring)."""

import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import pl, plgpu

__all__ = ["wait_last_releases"]


def wait_last_releases(free_bars, uses, slots: int) -> None:
    """Waits for the releases of the last ``slots`` of ``uses`` uses of a ``slots``-buffer ring.

    A producer waits for a buffer's release only before refilling it, so the releases of the last
    ``slots`` uses are never waited for; a CTA must consume every barrier phase before it exits.

    Args:
      free_bars: one or more barrier arrays ``[slots]`` that the consumers arrive on when they release
        a buffer (e.g. a K ring's and a V ring's, which share their slots).
      uses: buffers used so far (traced), slot ``use % slots`` each.
      slots: buffers in the ring.
    """

    @pl.loop(jnp.maximum(uses - slots, 0), uses)
    def _(use):
        slot = lax.rem(use, slots)
        for bars in free_bars:
            plgpu.barrier_wait(bars.at[slot])
