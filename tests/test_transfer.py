"""The transfer scheme of distributed sampling: properties over any assignment of patches to processes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.transfer import lower_bound, plan_transfers


@st.composite
def batches(draw):
    world = draw(st.integers(1, 9))
    b = draw(st.integers(1, 8))
    owner = draw(st.lists(st.integers(0, world - 1), min_size=world * b, max_size=world * b))
    return np.array(owner), world, b


@settings(max_examples=400, deadline=None)
@given(batches())
def test_plan_properties(case):
    owner, world, b = case
    plan = plan_transfers(owner, world, b)
    counts = np.bincount(owner, minlength=world)
    # every process ends with exactly b patches, and every patch lands exactly once
    assert (np.bincount(plan.dest, minlength=world) == b).all()
    assert sorted(np.concatenate([plan.batch_of(r) for r in range(world)]).tolist()) == list(range(world * b))
    # conservation: what each process holds after = before - sent + received
    assert (counts - plan.moves.sum(1) + plan.moves.sum(0) == b).all()
    # no process both sends and receives
    senders, receivers = plan.moves.sum(1) > 0, plan.moves.sum(0) > 0
    assert not (senders & receivers).any()
    assert np.diag(plan.moves).sum() == 0
    # minimal: the moved count equals the lower bound (total surplus), and only surplus moves
    assert plan.moved == lower_bound(owner, world, b) == int(np.maximum(counts - b, 0).sum())
    assert ((plan.dest != plan.owner).sum()) == plan.moved
    # the paper's signed t_ij: antisymmetric, row sums = net receipts = b - c_i
    assert (plan.t == -plan.t.T).all()
    assert (plan.t.sum(1) == b - counts).all()
    # sends/receives lists agree with the matrix
    for r in range(world):
        assert len(plan.sends(r)) == plan.moves[r].sum()
        assert len(plan.receives(r)) == plan.moves[:, r].sum()
        for k, to in plan.sends(r):
            assert plan.owner[k] == r and plan.dest[k] == to


def test_hand_example():
    # 3 processes, b = 2: process 0 holds 4 patches, 1 holds 2, 2 holds none
    owner = np.array([0, 0, 1, 0, 1, 0])
    plan = plan_transfers(owner, 3, 2)
    assert plan.moves.tolist() == [[0, 0, 2], [0, 0, 0], [0, 0, 0]]
    assert plan.t.tolist() == [[0, 0, -2], [0, 0, 0], [2, 0, 0]]
    assert plan.batch_of(0).tolist() == [0, 1] and plan.batch_of(2).tolist() == [3, 5]
    assert plan.moved == 2


def test_bad_batches():
    with pytest.raises(ValueError, match="not 2 processes x 2"):
        plan_transfers(np.array([0, 1, 1]), 2, 2)
    with pytest.raises(ValueError, match="ranks"):
        plan_transfers(np.array([0, 2]), 2, 1)
