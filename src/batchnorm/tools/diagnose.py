"""Find the usual batch-normalization mistakes in a model, before they cost a training run."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import initializers
from ..layer import BatchNorm
from ..shapes import mask_shape, reduction_axes, resolve_axes
from ..updates import deferred_updates
from ._model import (
    BatchNormTracer,
    batch_norm_layers,
    model_input,
    node_target,
    parse_call,
    restore_buffers,
    snapshot_buffers,
)

__all__ = ["KINDS", "Finding", "diagnose"]

#: Every finding kind :func:`diagnose` reports, in the order it checks them.
KINDS = (
    "non_finite_statistics",
    "never_updated",
    "training_in_eval",
    "frozen_affine_updating",
    "small_batch",
    "redundant_bias",
    "forward_failed",
)


@dataclass(frozen=True)
class Finding:
    """One problem :func:`diagnose` found.

    ``layer`` is the BatchNorm's name in ``model.named_modules()`` (``""`` for
    the model itself), ``kind`` one of :data:`KINDS`, ``message`` what is wrong
    and why it matters, ``remedy`` what to do about it.
    """

    layer: str
    kind: str
    message: str
    remedy: str

    def __str__(self) -> str:
        where = repr(self.layer) if self.layer else "(model)"
        return f"[{self.kind}] {where}: {self.message}\n    remedy: {self.remedy}"


# ---------------------------------------------------------------- static checks


def _statistics(layer: BatchNorm) -> dict[str, Tensor]:
    names = ["moving_mean", "moving_variance"]
    if layer.config.renorm:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return {name: getattr(layer, name) for name in names}


def _non_finite(name: str, layer: BatchNorm) -> list[Finding]:
    bad = [key for key, value in _statistics(layer).items()
           if not bool(torch.isfinite(value).all())]
    if not bad:
        return []
    return [Finding(
        name, "non_finite_statistics",
        f"{', '.join(bad)} hold NaN or Inf: every inference output of this layer is NaN",
        "find the batch or step that diverged (a learning rate too high, an input with NaN, "
        "a half-precision overflow), then reset the statistics with "
        "layer.reset_moving_statistics() and recompute them with bn.recalibrate(model, batches)",
    )]


def _at_initial_values(layer: BatchNorm) -> bool:
    shape = tuple(layer.moving_mean.shape)
    dtype, device = layer.moving_mean.dtype, layer.moving_mean.device
    try:
        mean = initializers.initial_value(layer.config.moving_mean_initializer, shape,
                                          name="moving_mean_initializer", dtype=dtype,
                                          device=device)
        variance = initializers.initial_value(layer.config.moving_variance_initializer, shape,
                                              name="moving_variance_initializer", dtype=dtype,
                                              device=device)
    except Exception:  # a custom initializer that cannot be re-evaluated: trust num_updates
        return True
    return bool(torch.equal(layer.moving_mean, mean)
                and torch.equal(layer.moving_variance, variance))


def _never_updated(name: str, layer: BatchNorm) -> list[Finding]:
    runs_inference = not layer.training or not layer.trainable
    # Statistics loaded from elsewhere (a checkpoint, a Keras file) have num_updates == 0 too,
    # but no longer their initial values.
    if not runs_inference or int(layer.num_updates) != 0 or not _at_initial_values(layer):
        return []
    return [Finding(
        name, "never_updated",
        "the moving statistics were never updated (num_updates == 0, still their initial "
        "values) but the layer runs in inference mode, which normalizes with them: it barely "
        "normalizes at all, and outputs differ from what training saw",
        "train in training mode first (updates inside bn.deferred_updates() are discarded "
        "unless you call updates.apply()), or compute the statistics from data with "
        "bn.recalibrate(model, batches)",
    )]


def _mixed_modes(name: str, layer: BatchNorm, model: nn.Module) -> list[Finding]:
    if model.training or not layer.training or not layer.trainable:
        return []
    return [Finding(
        name, "training_in_eval",
        "the layer is in training mode while the model is in eval mode: it normalizes with "
        "batch statistics during evaluation, and updates its moving averages with evaluation "
        "data",
        "call model.eval() after any submodule.train(), or call the layer with training=False",
    )]


def _frozen_affine(name: str, layer: BatchNorm) -> list[Finding]:
    frozen = [key for key in ("gamma", "beta")
              if getattr(layer, key) is not None and not getattr(layer, key).requires_grad]
    if not frozen or not layer.trainable or not layer.training:
        return []
    return [Finding(
        name, "frozen_affine_updating",
        f"{' and '.join(frozen)} {'is' if len(frozen) == 1 else 'are'} frozen "
        "(requires_grad=False) but the layer is trainable and in training mode: it still "
        "normalizes with batch statistics and overwrites its moving statistics, which is what "
        "fine-tuning a pretrained model must not do",
        "freeze the whole layer with layer.trainable = False (inference mode, no updates, no "
        "gradients: Keras's semantics), or leave gamma/beta trainable if updating is intended",
    )]


# ---------------------------------------------------------------- redundant bias


def _bias_axis(module: nn.Module, rank: int | None) -> tuple[int, int] | None:
    """``(axis, rank)`` of the output axis ``module``'s bias is added along, or None."""
    if getattr(module, "bias", None) is None:
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1, rank or len(module.kernel_size) + 2
    if isinstance(module, nn.Linear):
        rank = rank or 2
        return rank - 1, rank
    return None


def _redundant(previous: nn.Module, layer: BatchNorm, rank: int | None) -> bool:
    """The bias is removed exactly by the mean subtraction iff it lies along a feature axis."""
    found = _bias_axis(previous, rank)
    if found is None:
        return False
    axis, rank = found
    try:
        return axis in resolve_axes(layer.config.axis, rank)
    except ValueError:
        return False


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(feeding module name, BatchNorm name)`` for modules whose only consumer is a BatchNorm."""
    modules = dict(model.named_modules())
    pairs = []
    for seq_name, seq in modules.items():
        if isinstance(seq, nn.Sequential):
            children = list(seq.named_children())
            for (a, _), (b, child) in zip(children[:-1], children[1:], strict=True):
                if isinstance(child, BatchNorm):
                    prefix = f"{seq_name}." if seq_name else ""
                    pairs.append((prefix + a, prefix + b))
    try:
        graph = BatchNormTracer().trace(model)
    except Exception:  # not traceable (data-dependent control flow...): Sequentials only
        return pairs
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node_target(node)), BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and source.op == "call_module" \
                and len(source.users) == 1:
            pair = (node_target(source), node_target(node))
            if pair not in pairs:
                pairs.append(pair)
    return pairs


def _redundant_bias(model: nn.Module, ranks: dict[str, int]) -> list[Finding]:
    modules = dict(model.named_modules())
    findings = []
    for source, name in _pairs(model):
        previous, layer = modules[source], modules[name]
        if _redundant(previous, layer, ranks.get(name)):
            findings.append(Finding(
                name, "redundant_bias",
                f"{source!r} ({type(previous).__name__}) adds a bias right before this layer, "
                "whose mean subtraction removes it exactly: the bias never affects the output "
                "(its gradient is zero) and only costs memory and time",
                f"construct {source!r} with bias=False (the BatchNorm's beta is the offset)",
            ))
    return findings


# ---------------------------------------------------------------- checks with a batch


def _values_per_feature(layer: BatchNorm, x: Tensor, mask: Tensor | None) -> int:
    axes = resolve_axes(layer.config.axis, x.ndim)
    dims = reduction_axes(x.ndim, axes)
    if mask is not None:
        weight = mask.reshape(mask_shape(mask, x, axes)).expand(x.shape)
        count = int(weight.sum(dims).min()) if dims else 1
    else:
        count = math.prod(x.shape[d] for d in dims)
    size = layer.config.virtual_batch_size
    if size is not None and 0 not in axes and x.shape[0]:
        count = count * size // x.shape[0]
    return count


def _run_batch(
    model: nn.Module, batch: Any, min_values: int, evaluating: bool
) -> tuple[list[Finding], dict[str, int]]:
    """Run ``batch`` under no_grad in the model's current mode; nothing in the model changes.

    ``evaluating``: the caller evaluates (the model is in eval mode, or the caller runs
    under ``torch.no_grad()``), so batch statistics computed now are a mistake."""
    layers = batch_norm_layers(model)
    findings: list[Finding] = []
    ranks: dict[str, int] = {}
    seen: set[str] = set()

    def hook(name: str) -> Callable[[BatchNorm, tuple[Any, ...], dict[str, Any]], None]:
        def pre_hook(layer: BatchNorm, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x, computes, mask = parse_call(layer, args, kwargs)
            ranks[name] = x.ndim
            if not computes or name in seen:
                return
            seen.add(name)
            if evaluating:
                findings.append(Finding(
                    name, "training_in_eval",
                    "the layer computed batch statistics in a forward pass that looks like "
                    "evaluation (the model in eval mode, or diagnose called under "
                    "torch.no_grad()): outputs depend on which samples share the batch, and "
                    "evaluation data leaks into the moving averages",
                    "call model.eval() before evaluating (and model.train() again after), or "
                    "pass training=False",
                ))
            count = _values_per_feature(layer, x, mask)
            if count < min_values:
                ghost = layer.config.virtual_batch_size is not None
                findings.append(Finding(
                    name, "small_batch",
                    f"the batch gives {count} value(s) per feature"
                    + (" per ghost batch" if ghost else "")
                    + f" (input shape {tuple(x.shape)}): fewer than {min_values}, too few for "
                    "reliable statistics, so training is noisy and inference differs from it",
                    ("raise virtual_batch_size, " if ghost else "")
                    + "use a larger batch (or statistics across devices), "
                    + ("" if layer.config.renorm else "renorm=True (Batch Renormalization), ")
                    + "or a normalization that needs no batch (torch.nn.GroupNorm)",
                ))
        return pre_hook

    handles = [layer.register_forward_pre_hook(hook(name), with_kwargs=True)
               for name, layer in layers.items()]
    buffers = snapshot_buffers(model)
    try:
        with torch.no_grad(), deferred_updates() as updates:
            model(model_input(batch))
            updates.discard()
    except Exception as error:  # report what was found so far, and the failure
        findings.append(Finding(
            "", "forward_failed",
            f"the model raised {type(error).__name__} on the batch: {error}",
            "fix the error above; the findings before it are still valid",
        ))
    finally:
        for handle in handles:
            handle.remove()
        restore_buffers(buffers)
    return findings, ranks


# ---------------------------------------------------------------- diagnose


def _report(findings: list[Finding], num_layers: int) -> str:
    if not findings:
        return f"diagnose: no problems found in {num_layers} BatchNorm layer(s)"
    lines = [f"diagnose: {len(findings)} finding(s) in {num_layers} BatchNorm layer(s)"]
    lines += [str(f) for f in findings]
    return "\n".join(lines)


def diagnose(
    model: nn.Module,
    batch: Any = None,
    *,
    verbose: bool = True,
    min_values_per_feature: int = 16,
) -> list[Finding]:
    """Check a model's :class:`~batchnorm.BatchNorm` layers for the usual mistakes.

    Without a batch, from the model as it is:

    - ``non_finite_statistics``: NaN/Inf in the moving statistics;
    - ``never_updated``: ``num_updates == 0`` and the statistics still at their
      initial values while the layer runs in inference mode (eval, or frozen);
    - ``training_in_eval``: a layer in training mode inside a model in eval mode;
    - ``frozen_affine_updating``: ``gamma``/``beta`` with ``requires_grad=False``
      on a trainable layer in training mode, whose statistics therefore still update;
    - ``redundant_bias``: a Conv/Linear with a bias feeding a BatchNorm directly
      (consecutive in an ``nn.Sequential``, or its only consumer in the
      ``torch.fx`` graph when the model is traceable) that normalizes along the
      bias's axis, which removes the bias exactly.

    With ``batch`` (an input, or an ``(input, target)`` tuple), the model also runs
    once in its current train/eval mode (under ``torch.no_grad()``, with every buffer
    restored afterwards):

    - ``training_in_eval``: a layer that computed batch statistics although the model
      is in eval mode (a ``training=True`` call inside it), or, for a model in
      training mode, when ``diagnose`` itself is called under ``torch.no_grad()``
      (which is how evaluation code runs);
    - ``small_batch``: such a layer got fewer than ``min_values_per_feature``
      values per feature (per ghost batch);
    - ``forward_failed``: the model raised (reported, not raised).

    Returns the findings (:class:`Finding`: ``layer``, ``kind``, ``message``,
    ``remedy``) and, with ``verbose=True``, prints them as a report.

    Examples:
        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bn.BatchNorm(8)).eval()
        >>> [f.kind for f in bn.diagnose(model, verbose=False)]
        ['never_updated', 'redundant_bias']
    """
    layers = batch_norm_layers(model)
    findings: list[Finding] = []
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        if layer.num_features is None:  # lazy and not built yet: no statistics to check
            continue
        findings += _non_finite(name, layer)
        findings += _never_updated(name, layer)
        findings += _mixed_modes(name, layer, model)
        findings += _frozen_affine(name, layer)
    if batch is not None:
        evaluating = not model.training or not torch.is_grad_enabled()  # the caller's no_grad
        found, ranks = _run_batch(model, batch, min_values_per_feature, evaluating)
        already = {(f.layer, f.kind) for f in findings}
        findings += [f for f in found if (f.layer, f.kind) not in already]
    findings += _redundant_bias(model, ranks)
    order = {kind: i for i, kind in enumerate(KINDS)}
    findings.sort(key=lambda f: order[f.kind])
    if verbose:
        print(_report(findings, len(layers)))
    return findings
