"""Barrier and scheduling helpers shared by the Mosaic GPU kernels (attention tile phases and
selection scoring)."""

import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, memref
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from pallas_kernels._compat import pl, plgpu

__all__ = [
    "announced_item",
    "queue_loop",
    "take_next_item",
    "take_queued_item",
    "wait_last_queued_release",
    "wait_last_releases",
]


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


def take_next_item(counter, slot) -> None:
    """A work queue's next item: one thread of the calling warpgroup atomically adds 1 to ``counter``
    and writes the value before the add into ``slot``; the warpgroup then synchronises, so that each of
    its threads may read ``slot``.

    Persistent kernels whose CTAs take their tiles from one counter in this way run them in launch
    order but balance themselves: a CTA that finishes early takes the next tile. Pallas has no
    fetch-and-add for Mosaic GPU (``plgpu.atomic_add`` returns nothing), so this is one PTX ``atom``
    through ``plgpu.inline_mgpu``, which the Mosaic GPU interpreter cannot run.

    Args:
      counter: ``[1]`` int32 GMEM ref that starts at 0 (``pl.get_global`` of a semaphore: zeroed for
        every launch).
      slot: ``[1]`` int32 SMEM ref.
    """

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
    def take(_, counter, slot):
        i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
        address = llvm.ptrtoint(i64, mgpu_utils.memref_ptr(counter))
        with mgpu_utils.single_thread(scope=mgpu_utils.ThreadSubset.WARPGROUP):
            # Generic addressing: a global address is the same in the generic space.
            old = llvm.inline_asm(i32, [address], "atom.add.u32 $0, [$1], 1;", "=r,l", has_side_effects=True)
            memref.store(old, slot, [arith.constant(ir.IndexType.get(), 0)])
        mgpu_utils.warpgroup_barrier()

    take(counter, slot)


# A persistent kernel's work queue: the memory warpgroup takes each item from the counter when it
# starts loading it (``take_queued_item``) and announces it in the item's buffer (two buffers, as the
# kernels' query buffers); the compute warpgroups read it there (``announced_item``). An item past the
# grid ends every warpgroup's ``queue_loop``.


def take_queued_item(counter, item_smem, ready, free, i):
    """The memory warpgroup's ``i``-th item: once the compute warpgroups released buffer ``i % 2``'s
    previous item (``free``; from ``i = 2`` on), takes the counter's next value into the buffer's slot
    of ``item_smem`` (``[2, 1]`` int32) and arrives on its ``ready`` barrier; returns the item."""
    buf = lax.rem(i, 2)

    @pl.when(i >= 2)
    def _():
        plgpu.barrier_wait(free.at[buf])

    for slot in range(2):
        pl.when(buf == slot)(lambda slot=slot: take_next_item(counter, item_smem.at[slot]))
    plgpu.barrier_arrive(ready.at[buf])
    return item_smem[buf, 0]


def announced_item(item_smem, ready, i):
    """A compute warpgroup's ``i``-th item, once the memory warpgroup announced it."""
    buf = lax.rem(i, 2)
    plgpu.barrier_wait(ready.at[buf])
    return item_smem[buf, 0]


def queue_loop(n_items, next_item, body):
    """``carry = body(item, i, carry)`` (from 0) for the items ``next_item(i)`` gives, the warpgroup's
    ``i``-th, until one is ``>= n_items``; returns the number of items run and the last carry.

    For the memory warpgroup (``next_item`` = ``take_queued_item``) every item's buffer was released
    before the next one was taken, but the last one's: wait for it (``wait_last_queued_release``).
    """

    def step(carry):
        i, item, acc = carry
        acc = body(item, i, acc)
        # Only after the item's work: the memory warpgroup takes the next item when it is done loading.
        return i + 1, next_item(i + 1), acc

    i, _, acc = lax.while_loop(lambda c: c[1] < n_items, step, (jnp.int32(0), next_item(0), jnp.int32(0)))
    return i, acc


def wait_last_queued_release(free, n) -> None:
    """The memory warpgroup's wait for the release of the last of its ``n`` queued items."""

    @pl.when(n >= 1)
    def _():
        plgpu.barrier_wait(free.at[lax.rem(n - 1, 2)])
