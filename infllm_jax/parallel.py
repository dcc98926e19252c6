"""Data and context parallelism for InfLLM-V2 with ``jax.sharding`` (no Flax).

A mesh has two axes: ``"data"`` shards the batch, ``"seq"`` shards the sequence (context parallelism).
Everything outside attention is per token, so under ``jax.jit`` XLA partitions it along both axes
with no communication. Attention runs under ``jax.shard_map`` on every mesh of more than one device,
a data-only one included: XLA cannot partition a Pallas kernel (a custom call to it), so under plain
``jax.jit`` it would all-gather the batch and run the whole batch's attention on every device. Inside
the ``shard_map`` attention needs every key: ``context_parallel_attention`` all-gathers K and V along
the sequence (the compressed keys of stage 1 are then
computed locally from the gathered keys, which costs less than gathering them separately), and
attends from the local query slice with ``q_offset`` = its first global position. Autodiff turns the
all-gather into a reduce-scatter of dK/dV, so the backward needs nothing extra.

Why all-gather rather than a ring over KV shards: each query token of InfLLM-V2 visits 96 scattered
blocks anywhere in its past, chosen from scores over *all* compressed keys, so a ring would have to
run stage 1 and the sparse attention once per step of the ring and merge partial softmaxes. The
gathered K/V of one layer is ``2 * T * Hkv * D`` elements (128 MiB at 128K tokens, Hkv=2, D=128,
bf16), small next to the activations that context parallelism splits.
"""

import dataclasses

import jax
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from infllm_jax.config import SparseConfig
from infllm_jax.ops import infllmv2_attention

__all__ = [
    "DATA_AXIS",
    "SEQ_AXIS",
    "TrainShardings",
    "attention_runs_per_shard",
    "batch_sharding",
    "context_parallel_attention",
    "make_mesh",
    "param_shardings",
    "seq_parallel_size",
    "train_shardings",
]

DATA_AXIS = "data"
SEQ_AXIS = "seq"


def make_mesh(*, seq: int = 1, devices: list | None = None) -> Mesh:
    """A ``("data", "seq")`` mesh over ``devices`` (default: all), ``seq`` devices per sequence.

    Raises:
      ValueError: if the device count is not a multiple of ``seq``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if seq < 1 or len(devices) % seq:
        raise ValueError(f"seq={seq} must be a positive divisor of the device count {len(devices)}")
    return jax.make_mesh(
        (len(devices) // seq, seq), (DATA_AXIS, SEQ_AXIS), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def seq_parallel_size(mesh=None) -> int:
    """Devices along ``"seq"`` of ``mesh`` (default: the mesh set with ``jax.set_mesh``), 1 if none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or SEQ_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[SEQ_AXIS]


def attention_runs_per_shard(mesh=None) -> bool:
    """Whether attention layers run under ``shard_map`` on ``mesh`` (default: the one set with
    ``jax.set_mesh``): a mesh of ``make_mesh`` (axes ``"data"`` and ``"seq"``) with more than one device.

    Meshes with other axis names keep plain ``jax.jit`` semantics (XLA then replicates the attention
    kernels over the batch: correct, but without the speedup).
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return False
    return {DATA_AXIS, SEQ_AXIS} <= set(mesh.axis_names) and mesh.size > 1


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of ``[B, T, ...]`` batches: batch over ``"data"``, tokens over ``"seq"``."""
    return NamedSharding(mesh, P(DATA_AXIS, SEQ_AXIS))


def param_shardings(params, mesh: Mesh, *, fsdp: bool = False):
    """Shardings for a pytree of parameters (or optimizer state of the same structure).

    Replicated by default. With ``fsdp`` each array of rank >= 2 is sharded over ``"data"`` along its
    first axis whose size the data-axis size divides (FSDP/ZeRO-3 style: XLA all-gathers a weight where
    it is used and reduce-scatters its gradient); arrays without such an axis stay replicated.
    """
    n = mesh.shape[DATA_AXIS]

    def rule(x):
        shape = getattr(x, "shape", ())
        if fsdp and n > 1 and len(shape) >= 2:
            for axis, size in enumerate(shape):
                if size % n == 0:
                    spec = [None] * len(shape)
                    spec[axis] = DATA_AXIS
                    return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(rule, params)


@dataclasses.dataclass(frozen=True)
class TrainShardings:
    """Where the pieces of a training step live on a mesh.

    Attributes:
      mesh: the ``("data", "seq")`` mesh; steps trace under ``jax.set_mesh(mesh)`` so that attention
        layers see it and switch to ``context_parallel_attention`` (per-shard attention).
      params, opt_state: pytrees of ``NamedSharding`` matching the parameters and optimizer state.
      batch: sharding of every ``[B, T]`` batch array.
    """

    mesh: Mesh
    params: object
    opt_state: object
    batch: NamedSharding

    @property
    def replicated(self) -> NamedSharding:
        """A replicated sharding on the mesh (metrics, scalars)."""
        return NamedSharding(self.mesh, P())


def train_shardings(mesh: Mesh, params, opt_state, *, fsdp: bool = False) -> TrainShardings:
    """Shardings for ``train_step(params, opt_state, batch)`` on ``mesh`` (``param_shardings`` rule)."""
    return TrainShardings(
        mesh=mesh,
        params=param_shardings(params, mesh, fsdp=fsdp),
        opt_state=param_shardings(opt_state, mesh, fsdp=fsdp),
        batch=batch_sharding(mesh),
    )


def context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cfg: SparseConfig,
    *,
    mesh=None,
    implementation: str | None = None,
    select_q: jax.Array | None = None,
    select_k: jax.Array | None = None,
) -> jax.Array:
    """``infllmv2_attention`` with the batch sharded over ``"data"`` and the sequence over ``"seq"``.

    Call it inside ``jax.jit`` on global arrays; the shapes and results are those of
    ``infllmv2_attention`` on the whole sequence. With a ``"seq"`` size of 1 it is plain data
    parallelism: each device attends over its own batch shard (the all-gathers are no-ops).

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]``; ``T`` divisible by the ``"seq"`` size and ``B`` by
        the ``"data"`` size.
      cfg: sparse configuration.
      mesh: a mesh with ``"data"`` and ``"seq"`` axes (default: the one set with ``jax.set_mesh``).
      implementation, select_q, select_k: as in ``infllmv2_attention``.

    Returns:
      ``[B, T, Hq, D]`` in ``q.dtype``, sharded like ``q``.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    n_seq = seq_parallel_size(mesh)
    b, t = q.shape[:2]
    if t % n_seq or b % mesh.shape[DATA_AXIS]:
        raise ValueError(
            f"context parallelism needs T={t} divisible by seq={n_seq} "
            f"and B={b} divisible by data={mesh.shape[DATA_AXIS]}"
        )
    selection = tuple(x for x in (select_q, select_k) if x is not None)
    if len(selection) == 1:
        raise ValueError("pass both select_q and select_k, or neither")

    def gather(x):
        return lax.all_gather(x, SEQ_AXIS, axis=1, tiled=True)

    def local(q, k, v, *selection):
        offset = lax.axis_index(SEQ_AXIS) * q.shape[1]
        sel = {"select_q": selection[0], "select_k": gather(selection[1])} if selection else {}
        return infllmv2_attention(
            q, gather(k), gather(v), cfg, implementation=implementation, q_offset=offset, **sel
        )

    spec = P(DATA_AXIS, SEQ_AXIS)
    n_in = 3 + len(selection)
    # check_vma=False: pallas_call outputs (implementation="pallas") carry no varying-manual-axes type.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * n_in, out_specs=spec, check_vma=False)(
        q, k, v, *selection
    )
