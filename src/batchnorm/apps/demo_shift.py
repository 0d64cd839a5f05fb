"""Statistics that move: adapting to shifted inputs, and federated averaging, on the digits.

``python -m batchnorm.apps.demo_shift`` prints two tables, each figure the mean (min-max)
of the test accuracy over seeds 0 to 4 (``--quick``: a shorter budget; ``--seeds``:
others). It uses the training demo's digits, CNN, training loop and reproducibility
(:mod:`batchnorm.apps.demo`: one thread, deterministic algorithms, seeded generators).

**Shifted inputs.** A model trained on the clean images is evaluated on two shifted
copies of the test set, fixed before any result was seen and not tuned:

- ``inverted``: inverted contrast, ``1 - x`` (pixels are in [0, 1]);
- ``brighter, noisy``: a brightness offset plus noise, ``x + 0.5 + 0.2 * z``, ``z``
  standard normal from a generator seeded with the seed.

For each: the accuracy before adaptation, after ``bn.recalibrate(prior=0)`` (AdaBN: the
statistics re-estimated on the shifted inputs) and after ``bn.recalibrate(prior=N)``
(Schneider et al.'s prior-weighted adaptation: the trained statistics count as ``N``
samples) for each ``N`` of :data:`PRIORS`. The statistics are re-estimated on the
shifted test images themselves (their inputs only, no label: test-time adaptation), in
batches of 32, all 360 of them (``n = 360``).

**Federated averaging.** The training set is split into 4 disjoint shards (at random, and
by label: client ``k`` holds the digits ``d`` with ``d % 4 == k``). Each round, every
client takes the global model's parameters, trains one epoch on its shard (its moving
statistics are its own, carried over from round to round), and the server averages the
clients' parameters (weighted by shard size). The clients train in training mode, where
batch normalization uses each batch's statistics, so what the server does with the
statistics changes nothing in the training; it changes the global model's inference,
evaluated four ways after the last round: statistics forgotten (the server's stay as
initialized), the state dict averaged (moving variances averaged like parameters), the
statistics merged with ``bn.merge_statistics`` (weights: shard sizes), and, for reference,
``bn.recalibrate`` of the averaged model on all the training images (which needs the
data in one place, as federated learning does not allow).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import batchnorm as bn

from .demo import Data, evaluate, load_digits, make_cnn, reproducible, train

PRIORS = (100, 1000, 10000)
"""The ``prior`` values (in samples) of the adaptation rows."""

CLIENTS = 4


@dataclass(frozen=True)
class Budget:
    """How long the models train (the training demo's batch size and learning rate)."""

    epochs: int = 10  # the model adapted to shifted inputs
    rounds: int = 10  # federated rounds, one local epoch each
    batch_size: int = 32
    lr: float = 0.05


QUICK = Budget(epochs=3, rounds=3)


# ---------------------------------------------------------------- shifted inputs


def shifts(x: Tensor, seed: int) -> dict[str, Tensor]:
    """The shifted copies of ``x`` (see the module docstring), by name."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return {"inverted": 1 - x, "brighter, noisy": x + 0.5 + 0.2 * noise}


def shift_rows(data: Data, seed: int, budget: Budget) -> dict[str, float]:
    """Row label -> test accuracy of one seed's model, clean and under each shift."""
    x_test, y_test = data[2], data[3]
    torch.manual_seed(seed)
    model = make_cnn()
    train(model, data, epochs=budget.epochs, batch_size=budget.batch_size, lr=budget.lr,
          seed=seed)
    rows = {"clean test set": evaluate(model, x_test, y_test)[0]}
    for name, shifted in shifts(x_test, seed).items():
        rows[f"{name}: before adaptation"] = evaluate(model, shifted, y_test)[0]
        batches = list(shifted.split(budget.batch_size))
        for prior in (0, *PRIORS):
            adapted = copy.deepcopy(model)
            torch.manual_seed(seed)  # dropout runs in recalibrate's training mode
            bn.recalibrate(adapted, batches, prior=prior, progress=False)
            rows[f"{name}: recalibrate(prior={prior})"] = evaluate(adapted, shifted, y_test)[0]
    return rows


# ---------------------------------------------------------------- federated averaging


def client_shards(y: Tensor, split: str, seed: int) -> list[Tensor]:
    """The indices of each client's shard: ``"random"`` or ``"by label"`` (``y % 4``)."""
    if split == "random":
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        return list(order.tensor_split(CLIENTS))
    return [torch.nonzero(y % CLIENTS == k).flatten() for k in range(CLIENTS)]


def _average(tensors: list[Tensor], weights: list[float]) -> Tensor:
    total = sum(weights)
    return torch.stack([w / total * t.double()
                        for w, t in zip(weights, tensors, strict=True)]).sum(0)


def federated_rows(data: Data, seed: int, budget: Budget, split: str) -> dict[str, float]:
    """Row label -> test accuracy of the global model after FedAvg, per way of handling the
    statistics."""
    x, y, x_test, y_test = data
    shards = client_shards(y, split, seed)
    weights = [float(len(s)) for s in shards]
    torch.manual_seed(seed)
    server = make_cnn()
    clients = [copy.deepcopy(server) for _ in shards]
    for round_ in range(budget.rounds):
        for k, (client, shard) in enumerate(zip(clients, shards, strict=True)):
            with torch.no_grad():  # the parameters only: a client keeps its statistics
                for mine, global_ in zip(client.parameters(), server.parameters(), strict=True):
                    mine.copy_(global_)
            train(client, (x[shard], y[shard], x_test, y_test), epochs=1,
                  batch_size=budget.batch_size, lr=budget.lr,
                  seed=seed * 1000 + round_ * CLIENTS + k)
        with torch.no_grad():
            for name, parameter in server.named_parameters():
                parameter.copy_(_average([c.get_parameter(name) for c in clients], weights))
    rows = {"statistics forgotten (the server's initial ones)":
            evaluate(server, x_test, y_test)[0]}

    averaged = copy.deepcopy(server)
    with torch.no_grad():
        for name, buffer in averaged.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(_average([c.get_buffer(name) for c in clients], weights))
    rows["state dict averaged (variances averaged)"] = evaluate(averaged, x_test, y_test)[0]

    merged = copy.deepcopy(server)
    bn.merge_statistics(merged, clients, weights=weights)
    rows["bn.merge_statistics"] = evaluate(merged, x_test, y_test)[0]

    central = copy.deepcopy(server)
    torch.manual_seed(seed)
    bn.recalibrate(central, list(x.split(budget.batch_size)), progress=False)
    rows["reference: bn.recalibrate on all the training images"] = \
        evaluate(central, x_test, y_test)[0]
    return rows


# ---------------------------------------------------------------- tables


def run_all(budget: Budget, seed: int) -> dict[str, dict[str, float]]:
    """Table name -> row label -> accuracy, for one seed. Call it inside
    :func:`batchnorm.apps.demo.reproducible`."""
    data = load_digits(seed)
    return {"shifted inputs": shift_rows(data, seed, budget),
            **{f"FedAvg, {CLIENTS} clients, shards {split}":
               federated_rows(data, seed, budget, split) for split in ("random", "by label")}}


def table(per_seed: dict[int, dict[str, dict[str, float]]]) -> str:
    """Markdown tables: each row's accuracy, mean (min-max) over the seeds."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    over = f"mean (min-max) of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    parts = []
    for name, rows in first.items():
        lines = [f"| {name} | test accuracy, {over} |", "|---|---:|"]
        for label in rows:
            values = [100 * per_seed[s][name][label] for s in seeds]
            spread = "" if len(values) == 1 else f" ({min(values):.1f}-{max(values):.1f})"
            lines.append(f"| {label} | {statistics.fmean(values):.1f}%{spread} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(quick: bool = False, seeds: Sequence[int] = (0, 1, 2, 3, 4),
         budget: Budget | None = None,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
         ) -> dict[int, dict[str, dict[str, float]]]:
    """Run both tables for ``seeds`` and print them; return the accuracies per seed."""
    budget = budget or (QUICK if quick else Budget())
    per_seed = {}
    start = time.perf_counter()
    with reproducible():
        for seed in seeds:
            began = time.perf_counter()
            per_seed[seed] = run_all(budget, seed)
            log(f"seed {seed}: {time.perf_counter() - began:.0f} s")
    print(table(per_seed))
    print(f"\n{budget}; total {time.perf_counter() - start:.0f} s")
    return per_seed


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchnorm.apps.demo_shift",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a shorter budget ({QUICK.epochs} epochs, {QUICK.rounds} rounds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="the seeds (default 0 1 2 3 4)")
    args = parser.parse_args(argv)
    main(quick=args.quick, seeds=args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
