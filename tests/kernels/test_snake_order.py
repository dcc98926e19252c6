"""``tiling.snake_order``: the tile order of balanced persistent launches (pure function, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.tiling import MosaicTile, snake_order


def _by_cta(order, ctas):
    """``{cta: [items in its run order]}`` for CTAs that take positions ``c, c + C, ...``."""
    order = np.asarray(order)
    return {c: order[c::ctas].tolist() for c in range(ctas)}


def test_rounds_go_by_descending_cost_to_ctas_in_snake_order():
    # Two CTAs, three rounds (the last one short): costs of items 0..4.
    costs = jnp.array([1, 5, 7, 2, 3])
    order = np.asarray(snake_order(costs, 2))
    # Round 0 {0, 1}: 1 (cost 5) to CTA 0, 0 to CTA 1; round 1 {2, 3}: reversed, so the cheaper 3 to
    # CTA 0; round 2 {4}: its only item to CTA 0 (odd rounds reverse among their own items).
    np.testing.assert_array_equal(order, [1, 0, 3, 2, 4])
    assert _by_cta(order, 2) == {0: [1, 3, 4], 1: [0, 2]}


def test_ties_keep_the_launch_order():
    np.testing.assert_array_equal(snake_order(jnp.zeros(6, jnp.int32), 3), [0, 1, 2, 5, 4, 3])


def test_fewer_items_than_ctas():
    np.testing.assert_array_equal(snake_order(jnp.array([2, 9, 4]), 8), [1, 2, 0])


@settings(max_examples=60, deadline=None)
@given(
    costs=st.lists(st.integers(0, 300), min_size=1, max_size=200),
    ctas=st.integers(1, 17),
)
def test_is_a_permutation_that_keeps_rounds_and_alternates(costs, ctas):
    order = np.asarray(snake_order(jnp.array(costs, jnp.int32), ctas))
    n = len(costs)
    assert order.dtype == np.int32 and sorted(order.tolist()) == list(range(n))
    costs = np.asarray(costs)
    for start in range(0, n, ctas):
        items = order[start : start + ctas]
        # Each round runs its own items (concurrent CTAs stay on neighbouring tiles) ...
        assert set(items.tolist()) == set(range(start, min(start + ctas, n)))
        # ... descending by cost in even rounds, ascending in odd ones.
        ranked = costs[items] if (start // ctas) % 2 == 0 else costs[items][::-1]
        assert (np.diff(ranked) <= 0).all()


def test_balanced_needs_a_persistent_launch():
    with pytest.raises(ValueError, match="needs persistent=True"):
        MosaicTile(balanced=True)
    assert MosaicTile(balanced=True, persistent=True).balanced
