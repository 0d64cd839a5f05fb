"""The Keras 3 layer against Keras's own, on the torch backend, in one run.

    python -m batchnorm.apps.bench_keras [--repeats 7] [--batch 64] [--size 56]

Two rows, each timed in rotating rounds (:func:`batchnorm.apps.measure.rounds`: sample ``r``
of both contenders comes from the same round), with the median and the spread (min-max) of
the rounds and the median of the per-round ratios (Keras's time / ours):

- ``layer``: a training forward and backward (the gradients of x, gamma and beta) of one
  layer on a channels-last (Keras's layout) ``batch x size x size x 64`` float32 input
  (64 x 56 x 56 x 64 by default): :class:`batchnorm.keras.BatchNormalization` against
  ``keras.layers.BatchNormalization``;
- ``fit step``: one training step of a small CNN (Conv2D(32) -> BN -> ReLU -> Conv2D(32) ->
  BN -> ReLU -> GlobalAveragePooling2D -> Dense(10), batch 64 of 32 x 32 x 3, SGD), the
  step ``model.fit`` runs (``model.train_on_batch``), with each layer in both places.

Keras's device: the GPU where torch has one, else the CPU (torch's threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .measure import rounds, spread

__all__ = ["main", "measure", "table"]


def _layer_step(layer, x: torch.Tensor) -> Callable[[], object]:
    """One training forward and backward of ``layer`` on ``x`` (built before timing)."""
    layer(x, training=True)
    params = [v.value for v in layer.trainable_weights]
    dy = torch.randn_like(x)

    def step() -> object:
        y = layer(x, training=True)
        return torch.autograd.grad(y, [x, *params], dy)
    return step


def _fit_step(batch_norm: type, x: np.ndarray, labels: np.ndarray) -> Callable[[], object]:
    """One ``train_on_batch`` of the small CNN with ``batch_norm`` layers (compiled, warm)."""
    import keras
    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(x.shape[1:]), layers.Conv2D(32, 3, padding="same"), batch_norm(),
        layers.ReLU(), layers.Conv2D(32, 3, padding="same"), batch_norm(), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, labels)
    return lambda: model.train_on_batch(x, labels)


def _row(name: str, samples: dict[str, list[float]]) -> dict:
    ours, theirs = samples["batchnorm"], samples["keras"]
    return {"row": name, "batchnorm": spread(ours), "keras": spread(theirs),
            "speedup": statistics.median(k / o for k, o in zip(theirs, ours, strict=True))}


def measure(*, repeats: int = 7, batch: int = 64, size: int = 56, features: int = 64
            ) -> list[dict]:
    """Both rows: per contender the spread of seconds per call (:func:`spread`), and the
    median per-round ratio keras / batchnorm (``speedup``, > 1: ours is faster)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    from ..keras import BatchNormalization
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).normal(
        1.0, 2.0, (batch, size, size, features)).astype(np.float32)).requires_grad_()
    layer = rounds({"batchnorm": _layer_step(BatchNormalization(), x),
                    "keras": _layer_step(keras.layers.BatchNormalization(), x)},
                   {"batchnorm": 2, "keras": 2}, repeats)
    rng = np.random.default_rng(1)
    images = rng.normal(0.0, 1.0, (64, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    fit = rounds({"batchnorm": _fit_step(BatchNormalization, images, labels),
                  "keras": _fit_step(keras.layers.BatchNormalization, images, labels)},
                 {"batchnorm": 3, "keras": 3}, repeats)
    shape = f"{batch}x{size}x{size}x{features}"
    return [_row(f"layer fwd+bwd {shape}", layer), _row("small CNN fit step, batch 64", fit)]


def table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table: median and min-max in milliseconds, and the speedup.

    >>> print(table([{"row": "r", "batchnorm": {"min": 0.001, "median": 0.002, "max": 0.003},
    ...               "keras": {"min": 0.004, "median": 0.005, "max": 0.006},
    ...               "speedup": 2.5}]))
    | row | batchnorm.keras ms (min-max) | keras.layers ms (min-max) | speedup |
    |---|---|---|---|
    | r | 2.00 (1.00-3.00) | 5.00 (4.00-6.00) | 2.50x |
    """
    def cell(s: dict) -> str:
        return f"{s['median'] * 1e3:.2f} ({s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f})"
    lines = ["| row | batchnorm.keras ms (min-max) | keras.layers ms (min-max) | speedup |",
             "|---|---|---|---|"]
    lines += [f"| {r['row']} | {cell(r['batchnorm'])} | {cell(r['keras'])} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchnorm.apps.bench_keras",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--batch", type=int, default=64, help="the layer row's batch")
    parser.add_argument("--size", type=int, default=56, help="the layer row's height, width")
    args = parser.parse_args(argv)
    rows = measure(repeats=args.repeats, batch=args.batch, size=args.size)
    device = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(f"Keras {__import__('keras').__version__}, torch {torch.__version__}, {device}; "
          f"medians of {args.repeats} rounds")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
