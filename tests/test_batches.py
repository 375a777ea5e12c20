"""Step plans: the same rows per step on any number of workers, every row once per epoch, less padding."""

from __future__ import annotations

import random

import pytest

from srd_ray.distill.batches import BatchLayout, plan_epoch

random.seed(0)
LENGTHS = [random.randint(20, 300) for _ in range(203)]
RESPONSE = [max(1, n // 3) for n in LENGTHS]


def rows_of(plan) -> list[int]:
    return sorted(i for micro in plan.groups for part in micro for i in part)


@pytest.mark.parametrize("grouped", [True, False])
def test_a_step_holds_the_same_rows_on_1_2_or_4_workers(grouped):
    plans = {
        world: plan_epoch(LENGTHS, RESPONSE, BatchLayout(16 // world, 2, world, grouped), seed=7) for world in (1, 2, 4)
    }
    assert len(plans[1]) == len(plans[2]) == len(plans[4])
    for one, two, four in zip(plans[1], plans[2], plans[4], strict=True):
        assert rows_of(one) == rows_of(two) == rows_of(four)
        assert one.num_items == two.num_items == sum(RESPONSE[i] for i in rows_of(one))
    for world, steps in plans.items():
        for step in steps:
            assert all(len(micro) == world for micro in step.groups), "every worker gets each micro-batch"
            assert all(0 < len(part) <= 16 // world for micro in step.groups for part in micro)


def test_every_row_once_per_epoch_and_the_partial_step():
    layout = BatchLayout(batch_size=4, accumulation=1, world=2)  # 8 rows a step; 203 = 25 * 8 + 3
    steps = plan_epoch(LENGTHS, RESPONSE, layout, seed=3)
    assert len(steps) == layout.steps_per_epoch(203) == 26
    seen = [i for step in steps for i in rows_of(step)]
    assert sorted(seen) == list(range(203)), "no row twice, none missing"
    assert sum(len(part) for micro in steps[-1].groups for part in micro) == 3
    # 1 leftover row cannot give both workers a row: it waits for the next epoch's reshuffle.
    assert BatchLayout(4, 1, 2).steps_per_epoch(201) == 25


def test_length_grouping_cuts_padding_and_keeps_randomness():
    layout = BatchLayout(batch_size=8, accumulation=1, world=1)
    plain = plan_epoch(LENGTHS, RESPONSE, BatchLayout(8, 1, 1, group_by_length=False), seed=5)
    grouped = plan_epoch(LENGTHS, RESPONSE, layout, seed=5)

    def padding(steps):
        return sum(s.padding for s in steps) / sum(s.positions for s in steps)

    assert padding(grouped) < padding(plain) / 3
    assert padding(grouped) < 0.1
    assert [rows_of(s) for s in plan_epoch(LENGTHS, RESPONSE, layout, seed=6)] != [rows_of(s) for s in grouped]
    assert [rows_of(s) for s in plan_epoch(LENGTHS, RESPONSE, layout, seed=5)] == [rows_of(s) for s in grouped]


def test_padding_is_counted_per_micro_batch():
    lengths, response = [10, 4, 4, 2], [3, 2, 2, 1]
    (step,) = plan_epoch(lengths, response, BatchLayout(2, 2, 1), seed=0)
    # Sorted 10, 4 | 4, 2: positions 2*10 + 2*4 = 28, real tokens 20.
    assert (step.positions, step.padding, step.num_items) == (28, 8, 8)
