"""Batch order: deterministic, every row once per epoch, and length grouping cuts padding."""

import random

from vitune.data.dataset import BatchOrder


def test_order_is_a_pure_function_of_seed_and_step():
    lengths = [random.Random(0).randint(5, 100) for _ in range(100)]
    a, b = BatchOrder(lengths, 8, seed=3), BatchOrder(lengths, 8, seed=3)
    steps = [7, 0, 30, 12, 7]  # out of order, across epochs
    assert [a.indices(k) for k in steps] == [b.indices(k) for k in steps]
    assert BatchOrder(lengths, 8, seed=4).indices(0) != a.indices(0)


def test_each_epoch_visits_rows_once_and_epochs_differ():
    lengths = list(range(50))
    for group in (True, False):
        order = BatchOrder(lengths, 8, seed=0, group_by_length=group)
        epoch0 = [i for k in range(order.per_epoch) for i in order.indices(k)]
        epoch1 = [i for k in range(order.per_epoch, 2 * order.per_epoch) for i in order.indices(k)]
        assert len(epoch0) == len(set(epoch0)) == 48  # 6 full batches of 8
        assert epoch0 != epoch1


def test_grouping_reduces_padding():
    rng = random.Random(1)
    lengths = [rng.randint(10, 200) for _ in range(512)]

    def padding(order):
        batches = [order.indices(k) for k in range(order.per_epoch)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(BatchOrder(lengths, 16, 0, True)) < 0.5 * padding(BatchOrder(lengths, 16, 0, False))
