"""A printed walkthrough of the behaviours the TensorFlow documents describe, with this library.

Run it with ``python -m batchnorm demo``. Every line shows a value and what it means.
"""

from __future__ import annotations

import warnings

import torch

from .. import BatchNorm, deferred_updates

BATCH = torch.tensor([[-10.0], [0.0], [10.0]])
SINGLE = torch.tensor([[-10.0]])


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.7g}" for v in t.detach().flatten().tolist()) + "]"


def _layer(**kwargs) -> BatchNorm:
    # TensorFlow's defaults: momentum 0.99, epsilon 1e-3, channels-last.
    return BatchNorm(1, axis=-1, **kwargs)


def run(print_fn=print) -> list[tuple[str, str, str]]:
    """Print the walkthrough; return its rows as (step, value, meaning)."""
    rows: list[tuple[str, str, str]] = []

    def show(step: str, value: str, meaning: str) -> None:
        rows.append((step, value, meaning))
        print_fn(f"{step:<44} {value:<30} {meaning}")

    print_fn("Batch normalization, step by step (TensorFlow's defaults: momentum 0.99, "
             "epsilon 1e-3, axis -1)")
    print_fn(f"input batch x = {_fmt(BATCH)}, single sample x1 = {_fmt(SINGLE)}\n")

    layer = _layer()
    show("inference before any training", _fmt(layer(BATCH, training=False)),
         "not normalized: moving averages are still 0 and 1")
    show("training mode", _fmt(layer(BATCH, training=True)),
         "normalized with the batch's own mean and variance")
    show("  moving mean / variance after 1 step",
         f"{layer.moving_mean.item():.7g} / {layer.moving_variance.item():.7g}",
         "moved 1% of the way from 0 / 1 toward 0 / 66.67")
    show("inference on x1 after 1 training step", _fmt(layer(SINGLE, training=False)),
         "'kind of weird': the averages lag far behind the batch")
    for _ in range(999):
        layer(BATCH, training=True)
    show("inference on x1 after 1000 training steps", _fmt(layer(SINGLE, training=False)),
         "the averages have caught up: normalized like the batch")

    debiased = _layer(debias=True)
    debiased(BATCH, training=True)
    show("debias=True, inference after 1 step", _fmt(debiased(SINGLE, training=False)),
         "corrected for the initial 0/1: the batch-normalized value")

    try:
        _layer()(SINGLE, training=True)
        show("training on a single sample", "no error", "UNEXPECTED")
    except ValueError:
        show("training on a single sample", "ValueError",
             "one value has no variance (TensorFlow silently returns 0)")

    frozen = _layer()
    frozen.trainable = False
    out = frozen(BATCH, training=True)
    show("trainable=False, called with training=True", _fmt(out),
         f"inference mode; statistics untouched ({frozen.num_updates.item()} updates)")

    deferred = _layer()
    with deferred_updates() as updates:
        deferred(BATCH, training=True)
        pending = len(updates)
        applied = deferred.num_updates.item()
        show("inside deferred_updates()", f"{pending} pending, {applied} applied",
             "training pass recorded, statistics untouched")
        updates.apply()
    show("after updates.apply()", f"{deferred.num_updates.item()} applied",
         "the recorded update is now in the moving averages")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        guarded = _layer()
        guarded(torch.tensor([[1.0], [float("nan")]]), training=True)
    show("training on a batch containing NaN", f"{guarded.num_updates.item()} updates",
         "non-finite statistics never enter the moving averages (with a warning)")
    return rows
