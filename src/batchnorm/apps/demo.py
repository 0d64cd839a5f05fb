"""The training demo: what batch normalization does, and each way it goes wrong.

``python -m batchnorm demo`` trains small convolutional networks (Conv-BN-ReLU-Pool
blocks, Dense-BN-ReLU-Dropout, a classifier: the seed's ``create_cnn_with_batchnorm``
scaled to 8x8 images) on the handwritten digits shipped in ``batchnorm/data``,
with the same seed and budget for every run, and prints one table: test
accuracy, final training loss and time per run, with what each row teaches.

Every run is deterministic for a given ``--seed``.
"""

from __future__ import annotations

import copy
import gzip
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import BatchNorm, deferred_updates

Data = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass
class Budget:
    """How long every run trains: the same for all, so the rows compare."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    small_batch_epochs: int = 3
    finetune_steps: int = 60
    early_steps: int = 30


QUICK = Budget(epochs=3, small_batch_epochs=1, finetune_steps=60, early_steps=30)

# The demo's layers average with momentum 0.9: on a budget of a few hundred steps
# TensorFlow's 0.99 still remembers the first batches (one of the rows shows it).
MOMENTUM = 0.9


@dataclass
class Run:
    name: str
    lesson: str
    accuracy: float | None
    loss: float | None
    seconds: float
    note: str = ""
    curve: list[tuple[float, float]] = field(default_factory=list)
    panel: str = ""  # which chart panel shows its learning curve, if any


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


def make_cnn(batchnorm: bool = True, **bn_options) -> nn.Sequential:
    """Conv-BN-ReLU-Pool twice, Dense-BN-ReLU-Dropout, Dense: the seed's CNN for 8x8 inputs.

    Without BatchNorm the layers before it get a bias; with it they don't (BN's
    beta makes it redundant).
    """

    options = {"momentum": MOMENTUM, **bn_options}

    def norm(features: int) -> list[nn.Module]:
        return [BatchNorm(features, **options)] if batchnorm else []

    bias = not batchnorm
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=bias), *norm(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=bias), *norm(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64, bias=bias), *norm(64), nn.ReLU(), nn.Dropout(0.3),
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
    with torch.no_grad(), deferred_updates() as updates:
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

    The curve holds (epochs trained, test accuracy) four times per epoch.
    """
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=lr, momentum=0.9)
    steps_per_epoch = len(y) // batch_size
    total = steps_per_epoch * epochs if max_steps is None else max_steps
    bar = progress(total=total, desc=label, leave=False) if progress else None
    curve, step, losses = [], 0, []
    for _ in range(epochs):
        model.train()
        losses = []
        for index in _batches(len(y), batch_size, generator):
            with deferred_updates() as updates:
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
    """Train every configuration of the table; return the runs in table order."""
    data = load_digits(seed)
    x_test, y_test = data[2], data[3]
    runs: list[Run] = []

    def trained(name, lesson, model, *, panel="", **options) -> nn.Module:
        start = time.perf_counter()
        options = {"epochs": budget.epochs, "batch_size": budget.batch_size,
                   "lr": budget.lr, **options}
        loss, curve = train(model, data, seed=seed, progress=progress, label=name, **options)
        accuracy, _ = evaluate(model, x_test, y_test)
        runs.append(Run(name, lesson, accuracy, loss, time.perf_counter() - start, curve=curve,
                        panel=panel))
        return model

    def seeded(factory: Callable[[], nn.Module]) -> nn.Module:
        torch.manual_seed(seed)
        return factory()

    budget_panel = f"batches of {budget.batch_size}"
    trained("without BatchNorm", "the baseline: same network, same budget",
            seeded(lambda: make_cnn(batchnorm=False)), panel=budget_panel)
    model = trained("with BatchNorm", "trains faster and further on the same budget",
                    seeded(make_cnn), panel=budget_panel)

    for batch_size in (1, 8):
        name = f"  evaluated with training=True, batches of {batch_size}"
        start = time.perf_counter()
        try:
            accuracy, loss = evaluate(model, x_test, y_test, batch_size=batch_size,
                                      training_mode=True)
            note, lesson = "", "normalized with each test batch's own statistics: worse"
        except ValueError:
            accuracy = loss = None
            note = "ValueError"
            lesson = "one sample has no variance: refused (TensorFlow returns zeros)"
        runs.append(Run(name, lesson, accuracy, loss, time.perf_counter() - start, note))

    trained("  momentum 0.99 (TensorFlow's default) on this short budget",
            "slow averages still remember the first batches",
            seeded(lambda: make_cnn(momentum=0.99)), panel=budget_panel)
    trained("  statistics never updated (updates deferred, never applied)",
            "inference uses the initial 0/1 averages: the model falls apart",
            seeded(make_cnn), apply_updates=False, panel=budget_panel)

    for debias in (False, True):
        trained(f"  evaluated after {budget.early_steps} steps (momentum 0.99), debias={debias}",
                "averages still near their initial 0/1" if not debias else
                "corrected for the initial value: usable early",
                seeded(lambda debias=debias: make_cnn(momentum=0.99, debias=debias)),
                max_steps=budget.early_steps)

    from .. import freeze

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
            freeze(tuned)
        start = time.perf_counter()
        loss, curve = train(tuned, few, epochs=1000, batch_size=2, lr=budget.lr, seed=seed,
                            max_steps=budget.finetune_steps, progress=progress,
                            label="fine-tuning")
        accuracy, _ = evaluate(tuned, x_test, y_test)
        runs.append(Run(
            f"  head fine-tuned on batches of 2, {'with' if frozen else 'without'} bn.freeze",
            "pretrained statistics kept" if frozen else
            "statistics overwritten by 2-sample batches: accuracy drops",
            accuracy, loss, time.perf_counter() - start, curve=curve))

    small = {"epochs": budget.small_batch_epochs, "batch_size": 4, "lr": budget.lr / 4,
             "panel": "batches of 4"}
    trained("  batches of 4, plain BatchNorm", "noisy statistics from 4 samples",
            seeded(make_cnn), **small)
    trained("  batches of 4, renorm", "Batch Renormalization corrects toward the averages",
            seeded(lambda: make_cnn(renorm=True, renorm_momentum=MOMENTUM, renorm_clipping={
                "rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5})), **small)
    trained("  batches of 4, ghost batches of 2", "ghost batches make statistics noisier still",
            seeded(lambda: make_cnn(virtual_batch_size=2)), **small)
    return runs


def table(runs: list[Run]) -> str:
    """The runs as a markdown table."""
    lines = ["| run | test accuracy | final loss | time (s) | what it teaches |",
             "|---|---:|---:|---:|---|"]
    for run in runs:
        accuracy = run.note or f"{100 * run.accuracy:.1f}%"
        loss = "" if run.loss is None else f"{run.loss:.3f}"
        lines.append(f"| {run.name.strip()} | {accuracy} | {loss} | {run.seconds:.1f} | "
                     f"{run.lesson} |")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    """Learning curves (test accuracy against epochs), one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(run.panel for run in runs if run.panel))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        for run in (r for r in runs if r.panel == panel):
            epochs, accuracy = zip(*run.curve, strict=True)
            axis.plot(epochs, [100 * a for a in accuracy], marker="o", markersize=3,
                      label=run.name.strip())
        axis.set_title(f"test accuracy, {panel}")
        axis.set_xlabel("epochs trained")
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(quick: bool = False, seed: int = 0, out: str | Path = "demo-output") -> list[Run]:
    """Run the demo, print the table, write ``results.json`` and ``curves.png`` to ``out``."""
    try:
        from tqdm.auto import tqdm as progress
    except ImportError:  # progress bars are optional
        progress = None
    torch.use_deterministic_algorithms(True)
    budget = QUICK if quick else Budget()
    start = time.perf_counter()
    runs = run_all(budget, seed, progress)
    print(table(runs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"seed": seed, "budget": asdict(budget), "runs": [asdict(r) for r in runs]}, indent=1))
    try:
        plot(runs, out / "curves.png")
        print(f"\nlearning curves: {out / 'curves.png'}")
    except ImportError:
        print("\n(matplotlib is not installed: no chart)")
    print(f"results: {out / 'results.json'}; total {time.perf_counter() - start:.0f} s")
    return runs
