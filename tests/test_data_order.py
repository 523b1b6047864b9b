"""Which records make each training batch: shuffling, length grouping, resume."""

from __future__ import annotations

import random

import pytest
import torch

from train.loop import DataOrder, TrainConfig, _lengths
from vlm.errors import ConfigError


def _epoch(order: DataOrder) -> list[list[int]]:
    return [order.next_indices() for _ in range(order.size // (order.batch * order.world))]


def _padded(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_plain_order_is_the_seeded_permutation():
    batches = _epoch(DataOrder(20, 4, seed=3))
    assert sum(batches, []) == torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()


def test_grouping_by_length_keeps_the_records_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(1000)]
    plain, grouped = DataOrder(1000, 8, seed=0), DataOrder(1000, 8, seed=0, lengths=lengths)
    plain_batches, grouped_batches = _epoch(plain), _epoch(grouped)
    assert sorted(sum(grouped_batches, [])) == sorted(sum(plain_batches, []))  # same 125 full batches of records
    assert _padded(grouped_batches, lengths) < 0.85 * _padded(plain_batches, lengths)
    # batches are shuffled after grouping: not simply longest first
    firsts = [max(lengths[i] for i in b) for b in grouped_batches]
    assert firsts != sorted(firsts, reverse=True)
    # a new epoch is a new grouping, and the same seed gives the same one
    assert _epoch(grouped) != grouped_batches
    assert _epoch(DataOrder(1000, 8, seed=0, lengths=lengths)) == grouped_batches


def test_grouped_order_resumes_where_it_stopped():
    lengths = list(range(50, 0, -1))
    uninterrupted = DataOrder(50, 4, seed=1, world=2, rank=1, lengths=lengths)
    expected = [uninterrupted.next_indices() for _ in range(9)]
    first = DataOrder(50, 4, seed=1, world=2, rank=1, lengths=lengths)
    seen = [first.next_indices() for _ in range(4)]
    resumed = DataOrder(50, 4, seed=1, world=2, rank=1, lengths=lengths)
    resumed.epoch, resumed.offset = first.epoch, first.offset
    assert seen + [resumed.next_indices() for _ in range(5)] == expected


def test_grouping_needs_a_stage_that_measures_records():
    class Unmeasured:
        name = "clip"

    with pytest.raises(ConfigError, match="cannot group by length"):
        _lengths(Unmeasured(), [1, 2], TrainConfig(group_by_length=True))
    assert _lengths(Unmeasured(), [1, 2], TrainConfig()) is None
