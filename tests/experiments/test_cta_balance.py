"""experiments/cta_balance.py: the profiled kernels get a profile buffer and one named range per
persistent-loop iteration, and get their modules back afterwards; a launch's balance from a profiler
trace; the script refuses to run without a GPU."""

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture
def balance(experiment):
    return experiment("cta_balance")


def test_profiled_kernels_get_a_profile_buffer_and_scoped_loops_then_their_modules_back(balance, tmp_path):
    modules = [module for module, _ in balance.KERNELS.values()]
    before = [module.plgpu for module in modules]
    queue_lax = balance.mgpu_sync.lax
    with balance.profiled(tmp_path):
        for module, real in zip(modules, before, strict=True):
            params = module.plgpu.CompilerParams(approx_math=True)
            assert params.approx_math and params.profile_dir == str(tmp_path) and params.profile_space > 0
            assert module.plgpu.nd_loop is not real.nd_loop
            # Everything else comes from the real module.
            assert module.plgpu.kernel is real.kernel and module.plgpu.wgmma is real.wgmma
        # The work queue's loop (dynamic launches) is scoped too.
        assert balance.mgpu_sync.lax.while_loop is not queue_lax.while_loop
        assert balance.mgpu_sync.lax.rem is queue_lax.rem
    assert [module.plgpu for module in modules] == before and balance.mgpu_sync.lax is queue_lax


class _FakePlgpu:
    """``nd_loop`` that runs its body once with carry 0 and records its arguments."""

    def __init__(self):
        self.calls = []

    def nd_loop(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return lambda body: body(None, carry=jnp.int32(0))


def test_scoped_nd_loop_runs_the_body_in_the_named_scope(balance):
    fake = _FakePlgpu()

    def loop(x):
        return balance._scoped_nd_loop(fake)((2,), collective_axes="cta")(lambda info, carry: carry + x)

    jaxpr = jax.make_jaxpr(loop)(jnp.int32(3))
    assert fake.calls == [(((2,),), {"collective_axes": "cta"})]
    # The equations the body traces carry the scope on their name stack.
    assert [str(eqn.source_info.name_stack) for eqn in jaxpr.eqns] == [balance._SCOPE]
    assert jax.core.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, jnp.int32(3))[0] == 3


def test_scoped_while_loop_runs_the_body_in_the_named_scope(balance):
    def loop(x):
        return balance._scoped_while_loop(jax.lax)(lambda c: c < 3, lambda c: c + x, jnp.int32(0))

    jaxpr = jax.make_jaxpr(loop)(jnp.int32(1))
    (while_eqn,) = jaxpr.eqns
    body = while_eqn.params["body_jaxpr"].jaxpr
    assert [str(eqn.source_info.name_stack) for eqn in body.eqns] == [balance._SCOPE]
    assert jax.core.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, jnp.int32(1))[0] == 3


def _events(ranges_by_cta, warpgroups=3, warpgroup=0):
    """Profiler-trace events: ``ranges_by_cta[c]`` = ``[(start_us, end_us), ...]`` of one warpgroup,
    plus a busy range of another warpgroup and another scope that the stats must ignore."""
    events = []
    for cta, ranges in ranges_by_cta.items():
        tid = 1 + warpgroup + warpgroups * cta
        for start, end in ranges:
            events += [{"name": "tile", "ph": "B", "ts": start, "tid": tid}]
            events += [{"name": "tile", "ph": "E", "ts": end, "tid": tid}]
        other = 1 + (warpgroup + 1) % warpgroups + warpgroups * cta
        events += [{"name": "tile", "ph": "B", "ts": 0.0, "tid": other}]
        events += [{"name": "tile", "ph": "E", "ts": 99.0, "tid": other}]
        events += [{"name": "other", "ph": "B", "ts": 0.0, "tid": tid}]
        events += [{"name": "other", "ph": "E", "ts": 50.0, "tid": tid}]
    return {"traceEvents": events}


def test_launch_stats_measures_the_spans_of_each_cta_and_its_tiles(balance):
    # CTA 0: two tiles of 1 and 3 us (span 4 us = 4,000 "cycles"); CTA 1: one tile of 2 us.
    trace = _events({0: [(10.0, 11.0), (11.0, 14.0)], 1: [(20.0, 22.0)]})
    stats = balance.launch_stats(trace)
    assert stats["ctas"] == 2 and stats["tiles"] == 3 and stats["tiles_per_cta"] == [1, 2]
    assert stats["span_cycles"] == {"mean": 3000, "min": 2000, "max": 4000}
    assert stats["tail_fraction"] == pytest.approx(1 - 3000 / 4000)
    assert stats["tile_cycles"]["mean"] == 2000 and stats["tile_cycles"]["max"] == 3000
    assert stats["tile_cycles"]["std"] == round((2 / 3) ** 0.5 * 1000)


def test_launch_stats_of_a_trace_without_tiles(balance):
    assert balance.launch_stats({"traceEvents": []}) == {"ctas": 0}


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal on a machine without a GPU")
def test_main_refuses_to_run_without_a_gpu(balance, tmp_path):
    with pytest.raises(SystemExit, match="needs a Hopper GPU"):
        balance.main(["--out", str(tmp_path)])
