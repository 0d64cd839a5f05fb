"""The training demo: what batch normalization does, and each way it goes wrong.

``python -m batchnorm demo`` trains small convolutional networks (Conv-BN-ReLU-Pool
blocks, Dense-BN-ReLU-Dropout, a classifier: the seed's ``create_cnn_with_batchnorm``
scaled to 8x8 images) on the handwritten digits shipped in ``batchnorm/data``,
with the same seed and budget for every run, and prints one table: per run, its test
accuracy and test loss (the held-out fifth of the digits, evaluated in inference mode
unless the row says otherwise), its training loss (the mean over the last epoch's
batches, in training mode) and its time, with what the row teaches.
``python -m batchnorm.apps.demo --seeds 0 1 2 3 4`` runs it for several seeds and
reports the mean and range of every figure, and checks each lesson on every seed:
a lesson that does not hold on all of them is printed with how many it holds on.

Reproducible on any machine, for a seed: the demo runs on one torch thread and one
numba thread (set on entry, restored on exit: its tensors are 8x8 images, too small
for threads to pay, and a reduction split across threads sums in a different order
on a different thread count), with ``torch.use_deterministic_algorithms(True)``,
every random draw from a seeded generator (data split and batch order from
explicit ``torch.Generator`` objects; weight initialization and dropout from
torch's global generator, seeded before each model and each training run, inside
``torch.random.fork_rng`` so that the caller's random state is left as it was).
The numbers then depend on the seed, the torch build and the CPU's instruction
set only, not on the thread count or on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import json
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

import batchnorm as bn

Data = tuple[Tensor, Tensor, Tensor, Tensor]

# torch and numba threads for the demo's runs (see the module docstring).
THREADS = 1


@dataclass
class Budget:
    """How long every run trains: the same for all, so the rows compare."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    small_batch_epochs: int = 3
    finetune_steps: int = 60
    early_steps: int = 10


QUICK = Budget(epochs=3, small_batch_epochs=1, finetune_steps=60, early_steps=10)

# The demo's layers average with momentum 0.9: on a budget of a few hundred steps
# TensorFlow's 0.99 still remembers the first batches (one of the rows shows it).
MOMENTUM = 0.9


@dataclass
class Run:
    key: str  # a short, stable identifier (the claims and the tests refer to it)
    name: str
    lesson: str
    accuracy: float | None  # on the test set
    training_loss: float | None  # mean over the last epoch's batches, in training mode
    seconds: float
    note: str = ""
    test_loss: float | None = None  # on the test set, as evaluated for ``accuracy``
    curve: list[tuple[float, float]] = field(default_factory=list)
    panel: str = ""  # which chart panel shows its learning curve, if any
    claims: tuple[str, ...] = ()  # the keys of the claims (CLAIMS) behind its lesson


@dataclass(frozen=True)
class Claim:
    """A lesson of the table as a comparison that must hold on every seed.

    Run ``better`` must end more accurate than run ``worse`` on the test set (with
    ``epoch``: at that point of their learning curves; with ``metric="training_loss"``:
    with a lower training loss over the last epoch); ``better="ValueError"`` means that
    ``worse`` must raise instead of giving an accuracy.
    """

    key: str
    text: str
    better: str
    worse: str
    epoch: float | None = None
    metric: str = "accuracy"

    def gap(self, runs: dict[str, Run]) -> float | None:
        """How far ``better`` is ahead of ``worse`` (None: a figure is missing)."""
        if self.better == "ValueError":
            return 1.0 if runs[self.worse].note == "ValueError" else -1.0
        good, bad = runs[self.better], runs[self.worse]
        if self.epoch is not None:
            return _at(good.curve, self.epoch) - _at(bad.curve, self.epoch)
        if self.metric == "training_loss":
            if good.training_loss is None or bad.training_loss is None:
                return None
            return bad.training_loss - good.training_loss
        if good.accuracy is None or bad.accuracy is None:
            return None
        return good.accuracy - bad.accuracy


CLAIMS = (
    Claim("ahead_early", "BatchNorm is ahead after one epoch", "bn", "baseline", epoch=1.0),
    Claim("trains_further", "BatchNorm is still ahead at the end of the budget",
          "bn", "baseline"),
    Claim("single_refused", "training-mode evaluation of single samples raises",
          "ValueError", "eval_train_1"),
    Claim("eval_train_worse", "training-mode evaluation on batches of 8 is worse than "
          "inference mode", "bn", "eval_train_8"),
    Claim("slow_momentum_early", "momentum 0.99 is behind momentum 0.9 after one epoch",
          "bn", "momentum_099", epoch=1.0),
    Claim("slow_momentum", "momentum 0.99 is behind momentum 0.9 at the end", "bn",
          "momentum_099"),
    Claim("never_updated", "never-updated statistics wreck inference", "bn", "never_updated"),
    Claim("debias", "debias=True is ahead of debias=False early in training",
          "early_debias", "early"),
    Claim("finetune_drops", "fine-tuning on batches of 2 without bn.freeze loses accuracy",
          "bn", "finetune"),
    Claim("freeze", "bn.freeze is ahead of the same fine-tuning without it",
          "finetune_frozen", "finetune"),
    Claim("renorm_loss", "renorm ends with a lower training loss than plain on batches of 4",
          "small_renorm", "small", metric="training_loss"),
    Claim("renorm", "renorm is more accurate than plain on batches of 4", "small_renorm",
          "small"),
    Claim("ghost", "ghost batches of 2 are less accurate than plain on batches of 4",
          "small", "small_ghost"),
)


def _at(curve: Sequence[Sequence[float]], epoch: float) -> float:
    """The curve's accuracy at the last point up to ``epoch``."""
    points = [a for e, a in curve if e <= epoch + 1e-9]
    return points[-1] if points else float("nan")


def load_digits(seed: int) -> Data:
    """The 1,797 digits as (N, 1, 8, 8) floats in [0, 1], split 80/20 by ``seed``."""
    with resources.files("batchnorm.apps").joinpath("data/digits.csv.gz").open("rb") as raw:
        table = np.loadtxt(gzip.open(raw), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def make_cnn(batchnorm: bool = True, after_activation: bool = False,
             **bn_options) -> nn.Sequential:
    """Conv-BN-ReLU-Pool twice, Dense-BN-ReLU-Dropout, Dense: the seed's CNN for 8x8 inputs.

    ``after_activation=True`` swaps every BN with the ReLU after it (Conv-ReLU-BN-Pool,
    Dense-ReLU-BN-Dropout), against the seed's advice to normalize before the
    activation. The layers before a BatchNorm get no bias (BN's beta makes it
    redundant); the others, those before a ReLU included, do.

    >>> [type(m).__name__ for m in make_cnn(after_activation=True)[:4]]
    ['Conv2d', 'ReLU', 'BatchNorm', 'MaxPool2d']
    """

    options = {"momentum": MOMENTUM, **bn_options}

    def block(layer: Callable[[bool], nn.Module], features: int) -> list[nn.Module]:
        if not batchnorm:
            return [layer(True), nn.ReLU()]
        if after_activation:
            return [layer(True), nn.ReLU(), bn.BatchNorm(features, **options)]
        return [layer(False), bn.BatchNorm(features, **options), nn.ReLU()]

    return nn.Sequential(
        *block(lambda bias: nn.Conv2d(1, 16, 3, padding=1, bias=bias), 16), nn.MaxPool2d(2),
        *block(lambda bias: nn.Conv2d(16, 32, 3, padding=1, bias=bias), 32), nn.MaxPool2d(2),
        nn.Flatten(),
        *block(lambda bias: nn.Linear(128, 64, bias=bias), 64), nn.Dropout(0.3),
        nn.Linear(64, 10),
    )


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):  # full batches only
        yield order[start:start + batch_size]


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512,
             training_mode: bool = False) -> tuple[float, float]:
    """Accuracy and mean loss; ``training_mode=True`` is the classic mistake."""
    model.train(training_mode)
    correct, total_loss = 0, 0.0
    # A mistaken training-mode evaluation must not also corrupt the statistics:
    # its updates are recorded and dropped.
    with torch.no_grad(), bn.deferred_updates() as updates:
        for start in range(0, len(y), batch_size):
            logits = model(x[start:start + batch_size])
            target = y[start:start + batch_size]
            total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
        updates.discard()
    model.eval()
    return correct / len(y), total_loss / len(y)


def train(model: nn.Module, data: Data, *, epochs: int, batch_size: int, lr: float, seed: int,
          max_steps: int | None = None, apply_updates: bool = True,
          progress: Callable | None = None, label: str = "") -> tuple[float, list]:
    """SGD with momentum; return the last epoch's mean loss and a test-accuracy curve.

    The curve holds (epochs trained, test accuracy) four times per epoch. The batch
    order comes from a generator seeded with ``seed``; dropout draws from torch's
    global generator, seeded here with ``seed``.
    """
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=lr, momentum=0.9)
    steps_per_epoch = len(y) // batch_size
    total = steps_per_epoch * epochs if max_steps is None else max_steps
    bar = progress(total=total, desc=label, leave=False) if progress else None
    curve: list[tuple[float, float]] = []
    losses: list[float] = []
    step = 0
    for _ in range(epochs):
        model.train()
        losses = []
        for index in _batches(len(y), batch_size, generator):
            with bn.deferred_updates() as updates:
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if apply_updates:
                    updates.apply()
                else:  # the forgotten-UPDATE_OPS row: dropped on purpose
                    updates.discard()
            losses.append(loss.item())
            step += 1
            if bar:
                bar.update(1)
            if step % max(1, steps_per_epoch // 4) == 0:  # four points per epoch
                curve.append((step / steps_per_epoch, evaluate(model, x_test, y_test)[0]))
                model.train()
            if step == max_steps:
                break
        if step == max_steps:
            break
    if bar:
        bar.close()
    return float(np.mean(losses)), curve


def run_all(budget: Budget, seed: int, progress: Callable | None = None) -> list[Run]:
    """Train every configuration of the table for one seed; return the runs in table order.

    Call it inside :func:`reproducible` for results that do not depend on the machine.
    """
    data = load_digits(seed)
    x_test, y_test = data[2], data[3]
    runs: list[Run] = []

    def trained(key, name, lesson, model, *, panel="", claims=(), **options) -> nn.Sequential:
        start = time.perf_counter()
        options = {"epochs": budget.epochs, "batch_size": budget.batch_size,
                   "lr": budget.lr, **options}
        loss, curve = train(model, data, seed=seed, progress=progress, label=name.strip(),
                            **options)
        accuracy, test_loss = evaluate(model, x_test, y_test)
        runs.append(Run(key, name, lesson, accuracy, loss, time.perf_counter() - start,
                        test_loss=test_loss, curve=curve, panel=panel, claims=claims))
        return model

    def seeded(factory: Callable[[], nn.Sequential]) -> nn.Sequential:
        torch.manual_seed(seed)
        return factory()

    budget_panel = f"batches of {budget.batch_size}"
    trained("baseline", "without BatchNorm", "the baseline: same network, same budget",
            seeded(lambda: make_cnn(batchnorm=False)), panel=budget_panel)
    model = trained("bn", "with BatchNorm",
                    "far ahead after one epoch; still ahead at the end, by less",
                    seeded(make_cnn), panel=budget_panel, claims=("ahead_early", "trains_further"))

    accuracy: float | None
    loss: float | None
    for batch_size in (1, 8):
        name = f"  evaluated with training=True, batches of {batch_size}"
        start = time.perf_counter()
        try:
            accuracy, loss = evaluate(model, x_test, y_test, batch_size=batch_size,
                                      training_mode=True)
            note, lesson = "", "normalized with each test batch's own statistics: worse"
            claims = ("eval_train_worse",)
        except ValueError:
            accuracy = loss = None
            note, claims = "ValueError", ("single_refused",)
            lesson = "one sample has no variance: refused (TensorFlow returns zeros)"
        runs.append(Run(f"eval_train_{batch_size}", name, lesson, accuracy, None,
                        time.perf_counter() - start, note, test_loss=loss, claims=claims))

    trained("momentum_099", "  momentum 0.99 (TensorFlow's default) on this short budget",
            "slow averages remember the first batches: behind 0.9, most of all early",
            seeded(lambda: make_cnn(momentum=0.99)), panel=budget_panel,
            claims=("slow_momentum_early", "slow_momentum"))
    trained("never_updated", "  statistics never updated (updates deferred, never applied)",
            "trains as well (its training loss is that of BatchNorm's row), but inference "
            "uses the initial 0/1 averages: the test set falls apart",
            seeded(make_cnn), apply_updates=False, panel=budget_panel, claims=("never_updated",))
    # The seed documents advise normalizing before the nonlinearity: the same network with
    # each BatchNorm after its ReLU, reported as it comes out (no claim rests on it).
    trained("bn_after_activation", "  BatchNorm after the activation (Conv-ReLU-BN)",
            "against the seed's advice (before it): compare with the row with BatchNorm",
            seeded(lambda: make_cnn(after_activation=True)), panel=budget_panel)

    for debias in (False, True):
        trained("early_debias" if debias else "early",
                f"  evaluated after {budget.early_steps} steps (momentum 0.99), debias={debias}",
                "averages still near their initial 0/1" if not debias else
                "corrected for the initial value: usable early",
                seeded(functools.partial(make_cnn, momentum=0.99, debias=debias)),
                max_steps=budget.early_steps, claims=("debias",))

    # Transfer-learning style fine-tuning: only the classifier head is trained, on
    # 200 samples in batches of 2. Unless frozen, every BatchNorm still runs in
    # training mode and its moving statistics drift to those tiny batches.
    subset = torch.arange(len(data[1])) < 200
    few = (data[0][subset], data[1][subset], x_test, y_test)
    for frozen in (False, True):
        tuned = copy.deepcopy(model)
        for param in tuned[:-1].parameters():
            param.requires_grad_(False)
        if frozen:
            bn.freeze(tuned)
        start = time.perf_counter()
        loss, curve = train(tuned, few, epochs=1000, batch_size=2, lr=budget.lr, seed=seed,
                            max_steps=budget.finetune_steps, progress=progress,
                            label="fine-tuning")
        accuracy, test_loss = evaluate(tuned, x_test, y_test)
        runs.append(Run(
            "finetune_frozen" if frozen else "finetune",
            f"  head fine-tuned on batches of 2, {'with' if frozen else 'without'} bn.freeze",
            "pretrained statistics kept: ahead of the same fine-tuning unfrozen" if frozen else
            "statistics overwritten by 2-sample batches: accuracy drops",
            accuracy, loss, time.perf_counter() - start, test_loss=test_loss, curve=curve,
            claims=("freeze",) if frozen else ("finetune_drops",)))

    small = {"epochs": budget.small_batch_epochs, "batch_size": 4, "lr": budget.lr / 4,
             "panel": "batches of 4"}
    trained("small", "  batches of 4, plain BatchNorm", "noisy statistics from 4 samples",
            seeded(make_cnn), **small)
    trained("small_renorm", "  batches of 4, renorm",
            "Batch Renormalization corrects toward the averages: lower training loss than plain",
            seeded(lambda: make_cnn(renorm=True, renorm_momentum=MOMENTUM, renorm_clipping={
                "rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5})), claims=("renorm_loss",), **small)
    trained("small_ghost", "  batches of 4, ghost batches of 2",
            "ghost batches make statistics noisier still: behind plain",
            seeded(lambda: make_cnn(virtual_batch_size=2)), claims=("ghost",), **small)
    return runs


# ---------------------------------------------------------------- reproducibility


def _numba():
    try:
        import numba
    except ImportError:  # the library runs without its fast path
        return None
    return numba


@contextmanager
def reproducible(threads: int = THREADS) -> Iterator[None]:
    """``threads`` torch and numba threads, deterministic algorithms, the caller's RNG kept.

    Everything is restored on exit: the thread counts, the deterministic-algorithms
    setting and torch's global random state.
    """
    numba = _numba()
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             numba.get_num_threads() if numba else None)
    torch.set_num_threads(threads)
    if numba:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        if numba:
            numba.set_num_threads(saved[3])


def _progress_bars() -> Callable | None:
    """tqdm when stderr is a terminal; nothing in a log or a pipe (one line per seed there)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm


# ---------------------------------------------------------------- several seeds


@dataclass
class Row:
    """One run of the table across seeds."""

    key: str
    name: str
    lesson: str
    accuracy: list[float | None]
    test_loss: list[float | None]
    training_loss: list[float | None]
    seconds: list[float]
    note: str
    claims: tuple[str, ...]


def rows(per_seed: dict[int, list[Run]]) -> list[Row]:
    """The runs of every seed, gathered by run (in table order)."""
    first = next(iter(per_seed.values()))
    out = []
    for i, run in enumerate(first):
        same = [runs[i] for runs in per_seed.values()]
        out.append(Row(run.key, run.name, run.lesson, [r.accuracy for r in same],
                       [r.test_loss for r in same], [r.training_loss for r in same],
                       [r.seconds for r in same], run.note, tuple(run.claims)))
    return out


def check_claims(per_seed: dict[int, list[Run]]) -> list[dict]:
    """Every claim's gap on every seed, and on how many seeds it holds (gap > 0)."""
    out = []
    for claim in CLAIMS:
        gaps = [claim.gap({r.key: r for r in runs}) for runs in per_seed.values()]
        out.append({**asdict(claim), "gaps": gaps,
                    "holds": sum(g is not None and g > 0 for g in gaps), "seeds": len(gaps)})
    return out


def _spread(values: Sequence[float], scale: float = 1.0, digits: int = 1,
            unit: str = "") -> str:
    """``mean`` for one value, ``mean (min-max)`` for several."""
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit}"
    low, high = min(values) * scale, max(values) * scale
    return f"{mean:.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"


def table(per_seed: dict[int, list[Run]] | list[Run]) -> str:
    """The runs as a markdown table: mean (min-max) over the seeds when there are several.

    A lesson resting on a claim that does not hold on every seed says on how many it does.
    The line under the table says what each column measures: the test set's accuracy and
    loss, in inference mode unless the row says otherwise, and the training loss.
    """
    if isinstance(per_seed, list):
        per_seed = {0: per_seed}
    n = len(per_seed)
    holds = {c["key"]: c for c in check_claims(per_seed)}
    over = "" if n == 1 else f", mean (min-max) of {n} seeds"
    lines = [f"| run | test accuracy{over} | test loss | training loss (last epoch) | "
             "time (s) | what it teaches |", "|---|---:|---:|---:|---:|---|"]

    def losses(values: list[float | None]) -> str:
        present = [v for v in values if v is not None]
        return "" if len(present) < len(values) else _spread(present, digits=3)

    for row in rows(per_seed):
        # A run without a note (a ValueError) has its accuracy on every seed.
        accuracy = row.note or _spread(cast("list[float]", row.accuracy), 100, unit="%")
        lesson = row.lesson
        weakest = min((holds[k]["holds"] for k in row.claims), default=n)
        if weakest < n:
            lesson += f" (holds on {weakest} of {n} seeds only)"
        lines.append(f"| {row.name.strip()} | {accuracy} | {losses(row.test_loss)} | "
                     f"{losses(row.training_loss)} | {statistics.fmean(row.seconds):.1f} | "
                     f"{lesson} |")
    lines += ["", textwrap.fill(TABLE_NOTE, 100)]
    return "\n".join(lines)


TABLE_NOTE = ("test accuracy and test loss (cross-entropy): the held-out fifth of the digits, "
              "evaluated in inference mode, with the moving averages (the rows evaluated with "
              "training=True: in training mode, with each test batch's statistics); training "
              "loss: the mean cross-entropy over the last epoch's batches, in training mode "
              "(each batch's own statistics, dropout on), so a run whose moving averages are "
              "wrong can train as well as another and still fail its test.")


def claims_table(per_seed: dict[int, list[Run]]) -> str:
    """Each claim, its gap on the seeds (mean, min to max) and on how many it holds."""
    lines = ["| claim | compared | gap, mean (min to max) | holds on |", "|---|---|---:|---:|"]
    for c in check_claims(per_seed):
        gaps = [g for g in c["gaps"] if g is not None]
        if c["better"] == "ValueError":
            compared, gap = f"`{c['worse']}` raises", "-"
        else:
            at = "" if c["epoch"] is None else f" at epoch {c['epoch']:g}"
            what = "training loss of" if c["metric"] == "training_loss" else "accuracy of"
            compared = f"{what} `{c['better']}` vs `{c['worse']}`{at}"
            scale, unit, digits = ((1, "", 3) if c["metric"] == "training_loss"
                                   else (100, " pt", 1))
            gap = (f"{scale * statistics.fmean(gaps):+.{digits}f}{unit} "
                   f"({scale * min(gaps):+.{digits}f} to {scale * max(gaps):+.{digits}f})"
                   if gaps else "-")
        lines.append(f"| {c['text']} | {compared} | {gap} | {c['holds']}/{c['seeds']} seeds |")
    return "\n".join(lines)


def plot(per_seed: dict[int, list[Run]] | list[Run], path: Path) -> None:
    """Learning curves (test accuracy against epochs), one panel per batch size: the mean
    over the seeds, with their range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(per_seed, list):
        per_seed = {0: per_seed}
    first = next(iter(per_seed.values()))
    panels = list(dict.fromkeys(run.panel for run in first if run.panel))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        for i, run in enumerate(first):
            if run.panel != panel:
                continue
            curves = np.array([[a for _, a in runs[i].curve] for runs in per_seed.values()])
            epochs = [e for e, _ in run.curve]
            line, = axis.plot(epochs, 100 * curves.mean(0), marker="o", markersize=3,
                              label=run.name.strip())
            if len(curves) > 1:
                axis.fill_between(epochs, 100 * curves.min(0), 100 * curves.max(0),
                                  color=line.get_color(), alpha=0.15, linewidth=0)
        seeds = "" if len(per_seed) == 1 else f" (mean and range of {len(per_seed)} seeds)"
        axis.set_title(f"test accuracy, {panel}{seeds}", fontsize=10)
        axis.set_xlabel("epochs trained")
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def results(per_seed: dict[int, list[Run]], budget: Budget) -> dict:
    """What ``results.json`` holds: everything but the timings is the same on every machine."""
    return {"seeds": list(per_seed), "budget": asdict(budget),
            "threads": {"torch": THREADS, "numba": THREADS}, "deterministic_algorithms": True,
            "runs": {str(seed): [asdict(r) for r in runs] for seed, runs in per_seed.items()},
            "claims": check_claims(per_seed)}


def main(quick: bool = False, seed: int = 0, out: str | Path = "demo-output",
         seeds: Sequence[int] | None = None) -> dict[int, list[Run]]:
    """Run the demo for ``seeds`` (default: ``[seed]``), print the table, write
    ``results.json`` and ``curves.png`` to ``out``; return the runs of each seed."""
    seeds = list(seeds) if seeds else [seed]
    budget = QUICK if quick else Budget()
    progress = _progress_bars()
    start = time.perf_counter()
    per_seed: dict[int, list[Run]] = {}
    with reproducible():
        for i, s in enumerate(seeds):
            began = time.perf_counter()
            per_seed[s] = run_all(budget, s, progress)
            if len(seeds) > 1:
                print(f"seed {s} ({i + 1}/{len(seeds)}): {time.perf_counter() - began:.0f} s",
                      file=sys.stderr)
    print(table(per_seed))
    if len(seeds) > 1:
        print()
        print(claims_table(per_seed))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = results(per_seed, budget)
    report["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(report, indent=1))
    try:
        plot(per_seed, out / "curves.png")
        print(f"\nlearning curves: {out / 'curves.png'}")
    except ImportError:
        print("\n(matplotlib is not installed: no chart)")
    threads = f"{THREADS} torch and numba thread{'s' if THREADS > 1 else ''}"
    print(f"results: {out / 'results.json'}; total {time.perf_counter() - start:.0f} s "
          f"({threads}, deterministic algorithms)")
    return per_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (for ``python -m batchnorm.apps.demo`` and the command line)."""
    parser.add_argument("--quick", action="store_true", help="a shorter run (under 10 s a seed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="several seeds: the table gives the mean and range of each figure "
                        "and checks every lesson on each seed (overrides --seed)")
    parser.add_argument("--out", default="demo-output",
                        help="folder for results.json and curves.png (default demo-output)")


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchnorm.apps.demo",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    main(quick=args.quick, seed=args.seed, out=args.out, seeds=args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
