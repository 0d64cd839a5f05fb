"""The demo of statistics that move (batchnorm.apps.demo_shift): its shifts and shards are
what its docstring says, and a tiny run prints every row of both tables."""

from __future__ import annotations

import pytest
import torch

from batchnorm.apps import demo_shift

TINY = demo_shift.Budget(epochs=1, rounds=1)


def test_the_shifts_are_inverted_contrast_and_a_seeded_offset_plus_noise():
    x = torch.rand(6, 1, 8, 8)
    shifted = demo_shift.shifts(x, seed=3)
    assert torch.equal(shifted["inverted"], 1 - x)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(shifted["brighter, noisy"], x + 0.5 + 0.2 * noise)
    assert torch.equal(demo_shift.shifts(x, seed=3)["brighter, noisy"],
                       shifted["brighter, noisy"])  # deterministic for a seed


@pytest.mark.parametrize("split", ["random", "by label"])
def test_the_client_shards_are_disjoint_and_cover_the_training_set(split):
    y = torch.arange(50) % 10
    shards = demo_shift.client_shards(y, split, seed=0)
    assert len(shards) == demo_shift.CLIENTS
    assert sorted(torch.cat(shards).tolist()) == list(range(50))
    if split == "by label":
        assert all(set((y[s] % demo_shift.CLIENTS).tolist()) == {k}
                   for k, s in enumerate(shards))


@pytest.mark.slow  # trains a CNN and a round of 4 clients twice: 10 to 30 s
def test_a_tiny_run_prints_every_row_of_both_tables(capsys):
    per_seed = demo_shift.main(seeds=[0], budget=TINY, log=lambda _: None)
    tables = per_seed[0]
    rows = tables["shifted inputs"]
    priors = [f"recalibrate(prior={p})" for p in (0, *demo_shift.PRIORS)]
    for shift in ("inverted", "brighter, noisy"):
        assert [label for label in rows if label.startswith(shift)] == \
            [f"{shift}: before adaptation"] + [f"{shift}: {p}" for p in priors]
    for split in ("random", "by label"):
        assert list(tables[f"FedAvg, 4 clients, shards {split}"]) == [
            "statistics forgotten (the server's initial ones)",
            "state dict averaged (variances averaged)", "bn.merge_statistics",
            "reference: bn.recalibrate on all the training images"]
    accuracies = [a for table in tables.values() for a in table.values()]
    assert all(0 <= a <= 1 for a in accuracies)
    printed = capsys.readouterr().out
    assert printed.count("| test accuracy, seed 0 |") == 3
    assert "| bn.merge_statistics |" in printed
