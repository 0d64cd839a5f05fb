"""Precise batch-norm statistics: replace the moving averages by population statistics.

The moving averages a model trains with are an exponential average over weights
that kept changing, dominated by the last few hundred batches; they lag behind
the final weights and carry the noise of single batches. PreciseBN (Wu and
Johnson, *Rethinking "Batch" in BatchNorm*, 2021, arXiv:2105.07576) recomputes
them once training is done: run the final model in training mode over a few
hundred batches and keep the exact mean and variance of every layer's input
over all of them.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import BatchNorm
from ..statistics import merge_moments
from ..updates import deferred_updates
from ._model import (
    batch_norm_layers,
    layer_moments,
    model_input,
    parse_call,
    restore_buffers,
    restore_modes,
    set_statistics,
    snapshot_buffers,
    snapshot_modes,
    stored_statistics,
)

__all__ = ["LayerRecalibration", "RecalibrationReport", "recalibrate"]


# ---------------------------------------------------------------- accumulation


@dataclass
class _Moments:
    """Exact running count/mean/M2 per feature, merged batch by batch (Chan et al.'s update)."""

    sums: tuple[Tensor, Tensor, Tensor] | None = None  # (count, mean, M2); None: no batch yet
    batches: int = 0
    samples: int = 0  # items along the batch axis over the batches added
    skipped: int = 0
    unbiased: bool = False  # the variance the layer's training calls feed, decided for its input

    def add(self, count: Tensor, mean: Tensor, m2: Tensor, samples: int) -> None:
        if not (torch.isfinite(mean).all() and torch.isfinite(m2).all()):
            self.skipped += 1  # as the layer itself does: one bad batch must not poison the rest
            return
        self.batches += 1
        self.samples += samples
        if self.sums is None:
            self.sums = count, mean, m2
            return
        seen, seen_mean, seen_m2 = self.sums
        self.sums = merge_moments(torch.stack([seen, count]), torch.stack([seen_mean, mean]),
                                  torch.stack([seen_m2, m2]))


def _progress(iterable: Iterable[Any], total: int | None, enabled: bool) -> Iterator[Any]:
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # optional dependency: no bar
            pass
        else:
            return iter(tqdm(iterable, total=total, desc="recalibrate", unit="batch"))
    return iter(iterable)


# ---------------------------------------------------------------- report


@dataclass
class LayerRecalibration:
    """One layer's moving statistics before and after :func:`recalibrate` (CPU tensors)."""

    name: str
    old_mean: Tensor
    old_variance: Tensor
    new_mean: Tensor
    new_variance: Tensor
    num_batches: int
    kept: list[tuple[int, ...]] = field(default_factory=list)
    """Features (index tuples) with fewer than two values over every batch, which the masks
    (nearly) never selected: no variance to measure, so their previous statistics are kept."""

    mean_max_abs_diff: float = field(init=False)
    mean_max_rel_diff: float = field(init=False)
    variance_max_abs_diff: float = field(init=False)
    variance_max_rel_diff: float = field(init=False)

    def __post_init__(self) -> None:
        for what in ("mean", "variance"):
            old, new = (getattr(self, f"{when}_{what}").double() for when in ("old", "new"))
            diff = (new - old).abs()
            setattr(self, f"{what}_max_abs_diff", float(diff.max()))
            setattr(self, f"{what}_max_rel_diff", float((diff / new.abs().clamp_min(1e-12)).max()))


@dataclass
class RecalibrationReport(Mapping[str, LayerRecalibration]):
    """What :func:`recalibrate` changed: layer name -> :class:`LayerRecalibration`.

    ``skipped`` names the BatchNorm layers that computed no batch statistics
    (frozen with ``trainable=False``, always called with ``training=False``, or
    never reached) and were left as they were.
    """

    layers: dict[str, LayerRecalibration]
    skipped: list[str] = field(default_factory=list)
    num_batches: int = 0

    def __getitem__(self, name: str) -> LayerRecalibration:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        header = (f"{'layer':<24} {'batches':>7} {'mean: max |diff|':>17} {'rel':>9} "
                  f"{'var: max |diff|':>16} {'rel':>9}")
        lines = [f"recalibrated {len(self.layers)} BatchNorm layer(s) over "
                 f"{self.num_batches} batch(es)", header, "-" * len(header)]
        for name, r in self.layers.items():
            lines.append(
                f"{name or '(model)':<24} {r.num_batches:>7} {r.mean_max_abs_diff:>17.4g} "
                f"{r.mean_max_rel_diff:>9.2%} {r.variance_max_abs_diff:>16.4g} "
                f"{r.variance_max_rel_diff:>9.2%}")
        for name, r in self.layers.items():
            if r.kept:
                shown = ", ".join(str(i[0] if len(i) == 1 else i) for i in r.kept[:10])
                more = f" and {len(r.kept) - 10} more" if len(r.kept) > 10 else ""
                lines.append(f"{name or '(model)'}: feature(s) {shown}{more} had fewer than two "
                             "selected values over all batches; their previous statistics "
                             "were kept")
        if self.skipped:
            lines.append(f"skipped (no batch statistics: frozen or not run in training): "
                         f"{', '.join(self.skipped)}")
        return "\n".join(lines)


# ---------------------------------------------------------------- recalibrate


def _write(layer: BatchNorm, acc: _Moments, sums: tuple[Tensor, Tensor, Tensor],
           prior: float) -> list[tuple[int, ...]]:
    """Set the layer's moving statistics to the population statistics of ``sums`` (count,
    mean and M2 per feature, from ``acc``), blended with the statistics it had with weight
    ``prior`` against ``acc.samples``; return the features that kept their previous
    statistics (fewer than two values: no variance)."""
    count, mean, m2 = sums
    denominator = count - 1 if acc.unbiased else count
    variance = m2 / denominator.clamp_min(1)
    held = stored_statistics(layer)
    if prior and held is not None:
        # Schneider et al. (2020): (N * old + n * new) / (N + n), n in samples.
        n = acc.samples
        mean, variance = ((prior * old.to(new) + n * new) / (prior + n)
                          for new, old in zip((mean, variance), held, strict=True))
    few = (count < 2).to(layer.moving_mean.device)  # as a layer's update: no variance
    kept = [tuple(index) for index in few.nonzero().tolist()]
    set_statistics(layer, mean, variance, acc.batches, few if kept else None)
    return kept


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 200,
    *,
    prior: float | None = None,
    progress: bool = True,
) -> RecalibrationReport:
    """Replace every :class:`~batchnorm.BatchNorm`'s moving statistics by exact population
    statistics over ``batches`` (PreciseBN), or blend them with those (``prior``: adapting a
    model to shifted inputs). Parameters are untouched.

    The model runs in training mode (``model.train()``, under ``torch.no_grad()``)
    over at most ``num_batches`` batches, so that each layer sees the inputs it
    sees in training; the training-mode updates of the moving averages are
    discarded (:func:`batchnorm.deferred_updates`) and each layer's input
    moments are accumulated instead (a forward pre-hook). At the end each layer
    gets the mean and the (biased) variance of every value of its input over all
    batches: per feature, ``variance = mean of the batch variances + variance of
    the batch means`` for equal-size batches (batches of different sizes, and
    masks, are weighted by their number of values, so the result is always the
    statistics of the union of the batches). Ghost batches do not change this:
    population statistics do not depend on how a batch is split.

    Args:
        model: a module containing BatchNorm layers.
        batches: an iterable of model inputs, or of ``(input, target, ...)``
            tuples/lists, whose first element is the input (a DataLoader
            works as it is). Anything else is passed to ``model`` as it is.
            Inputs must already be on the model's device.
        num_batches: the most batches to use (fewer if ``batches`` ends first).
        prior: how much the statistics the layers have now count, in samples: with ``n``
            the number of samples (items along the batch axis) re-estimated over, each
            layer gets ``(prior * old + n * new) / (prior + n)`` of the old and the new
            mean, and the same of the two variances (prior-weighted adaptation, Schneider
            et al., *Improving robustness against common corruptions by covariate shift
            adaptation*, 2020). The old statistics are the ones inference used (``debias``
            applied). None or 0: exact re-estimation, the old statistics play no part.
        progress: show a tqdm progress bar (when tqdm is installed).

    Returns:
        A :class:`RecalibrationReport`: per layer, the old and new statistics and
        their largest absolute/relative differences; ``print`` it for a table.

    After the call:
        - the train/eval mode of every submodule is what it was;
        - ``num_updates`` is the number of batches re-estimated over (a
          ``momentum=None`` layer then continues its cumulative average from there),
          with a ``prior`` too;
        - layers whose training calls feed the Bessel-corrected variance
          (``unbiased_moving_variance=True``, or by default on the inputs where
          tf_keras fuses: see :class:`~batchnorm.BatchNorm`) get the Bessel-corrected
          population variance (``M2 / (n - 1)``);
        - renorm layers also get ``moving_stddev = renorm_stddev = sqrt(variance + epsilon)``
          and ``renorm_mean = mean``;
        - ``debias=True`` layers get initial values equal to the new statistics,
          which makes the debiasing correction the identity;
        - frozen layers (``trainable=False``) compute no batch statistics and
          are left as they are (listed in ``report.skipped``), as is every
          buffer outside the BatchNorm layers (a ``torch.nn.BatchNorm2d``'s running
          statistics included);
        - a batch whose values at a layer are not finite is left out for that
          layer, with a warning (masked-out values do not count: padding may be
          NaN);
        - a feature with fewer than two selected values over all batches (a mask
          that never selects it) keeps its previous statistics, listed in
          ``report[name].kept`` and in the printed report.

    Examples:
        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bn.BatchNorm(8))
        >>> data = [torch.randn(32, 4) for _ in range(10)]
        >>> report = bn.recalibrate(model, data, progress=False)
        >>> int(model[1].num_updates)
        10
        >>> shifted = [x + 1.0 for x in data]            # new inputs: adapt, keep some of the old
        >>> report = bn.recalibrate(model, shifted, prior=320, progress=False)
    """
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    if prior is not None and (not isinstance(prior, numbers.Real) or isinstance(prior, bool)):
        raise TypeError(f"prior must be a number of samples (a float or an int) or None, got "
                        f"{type(prior).__name__} {prior!r}")
    if prior is not None and not 0 <= prior < math.inf:
        raise ValueError(f"prior must be a finite number of samples >= 0 (0 or None: exact "
                         f"re-estimation), got {prior!r}")
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError("the model contains no batchnorm.BatchNorm layer to recalibrate")
    moments = {name: _Moments() for name in layers}

    def hook(name: str) -> Callable[[BatchNorm, tuple[Any, ...], dict[str, Any]], None]:
        def pre_hook(layer: BatchNorm, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x, computes, mask = parse_call(layer, args, kwargs)
            if computes:
                decided = layer.config.for_input(x.ndim, x.dtype).unbiased_moving_variance
                moments[name].unbiased = bool(decided)
                moments[name].add(*layer_moments(layer, x, mask), samples=len(x))
        return pre_hook

    modes = snapshot_modes(model)
    # torch.nn batch norms (and anything else) would update their buffers in training mode.
    other_buffers = snapshot_buffers(model, exclude=BatchNorm)
    handles = [layer.register_forward_pre_hook(hook(name), with_kwargs=True)
               for name, layer in layers.items()]
    try:
        # An Iterable to the type checker; len() where it has one (else the TypeError below).
        total = min(num_batches, len(batches))  # type: ignore[arg-type]
    except TypeError:  # no len(), e.g. a generator or an IterableDataset's loader
        total = num_batches
    seen = 0
    try:
        model.train()
        with torch.no_grad(), deferred_updates() as updates:
            for batch in _progress(islice(batches, num_batches), total, progress):
                model(model_input(batch))
                updates.discard()
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        restore_modes(modes)
        restore_buffers(other_buffers)
    if seen == 0:
        raise ValueError("batches is empty: no statistics to recalibrate with")

    report = RecalibrationReport(layers={}, num_batches=seen)
    for name, layer in layers.items():
        acc = moments[name]
        if acc.skipped:
            warnings.warn(f"recalibrate: {acc.skipped} batch(es) with non-finite values at layer "
                          f"{name!r} were left out", RuntimeWarning, stacklevel=2)
        if acc.sums is None:
            report.skipped.append(name)
            continue
        old_mean = layer.moving_mean.detach().cpu().clone()
        old_variance = layer.moving_variance.detach().cpu().clone()
        kept = _write(layer, acc, acc.sums, prior or 0)
        report.layers[name] = LayerRecalibration(
            name, old_mean, old_variance, layer.moving_mean.detach().cpu().clone(),
            layer.moving_variance.detach().cpu().clone(), acc.batches, kept)
    return report
