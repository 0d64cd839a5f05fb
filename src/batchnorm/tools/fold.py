"""Fold batch normalization into the preceding convolution or linear layer, for inference.

In inference batch normalization is a fixed per-channel affine map,
``y = s * (z - mean) + beta`` with ``s = gamma / sqrt(variance + epsilon)``; when
``z = W x + b`` comes from a convolution or a linear layer whose output goes
nowhere else, ``y = (s W) x + (s (b - mean) + beta)``: one layer instead of two.
A layer with an ``activation`` (``bn.BatchNorm(activation="relu")``) leaves that
activation's module (``nn.ReLU()``, ``nn.SiLU()``) in its place.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, cast

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layer import BatchNorm
from ._model import (
    BatchNormTracer,
    FrozenBatchNorm,
    ModuleUses,
    activation_module,
    batch_norm_layers,
    has_hooks,
    held_statistics,
    is_batch_norm,
    is_frozen_batch_norm,
    node_target,
    norm_act_tail,
    replace_modules,
    run_without_updates,
    timm_class,
)

__all__ = ["FoldResult", "fold"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = (*_CONVS, *_TRANSPOSED, nn.Linear)
_Producer = nn.modules.conv._ConvNd | nn.Linear  # the classes above, for the type checker
_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# The methods a convolution or linear layer computes with: a subclass overriding one of
# them (timm's StdConv2d standardizes its weight, Conv2dSame pads) may not take a fold.
_FORWARDS = ("forward", "_conv_forward")
_NOT_AFTER_PRODUCER = "its input does not come directly from a Conv, ConvTranspose or Linear layer"


class FoldResult(NamedTuple):
    """What :func:`fold` returns."""

    model: nn.Module
    """An inference copy of the model (``eval()``), folded layers replaced by ``nn.Identity``
    (by their activation's module, ``nn.ReLU()``/``nn.SiLU()``, for a layer with one)."""
    folded: list[tuple[str, str]]
    """``(batch-norm name, name of the layer it was folded into)``, in model order."""
    not_folded: list[tuple[str, str]]
    """``(batch-norm name, reason)`` of every batch normalization left in place."""


def _producer_class(module: nn.Module) -> type[nn.Module] | None:
    """The Conv, ConvTranspose or Linear class ``module`` is, or subclasses without
    changing how it computes (torchvision's ``Conv3DSimple``); else None."""
    base = next((cls for cls in type(module).__mro__ if cls in _PRODUCERS), None)
    if base is None or any(getattr(type(module), f, None) is not getattr(base, f, None)
                           for f in _FORWARDS):
        return None
    return base


def _producer_problem(producer: nn.Module, producer_name: str) -> str | None:
    """Why ``producer`` is no layer to fold into (not a Conv, ConvTranspose or Linear, or a
    subclass computing otherwise), or None."""
    if not isinstance(producer, _PRODUCERS):
        return (f"its input comes from {producer_name!r} ({type(producer).__name__}), "
                "not from a Conv, ConvTranspose or Linear layer")
    if _producer_class(producer) is None:
        return (f"its input comes from {producer_name!r} ({type(producer).__name__}), "
                "a subclass of a Conv, ConvTranspose or Linear layer with its own "
                "forward, which may not compute with the weights as given")
    return None


def _replacement(bn: nn.Module) -> nn.Module:
    """What takes a folded layer's place: what it applies after normalizing (a BatchNorm's
    activation module, a timm layer's drop and act), or ``nn.Identity``."""
    if isinstance(bn, BatchNorm):
        activation = bn.config.activation
        tail = [] if activation is None else [activation_module(activation)]
    else:
        tail = norm_act_tail(bn)
    if not tail:
        return nn.Identity()
    return (tail[0] if len(tail) == 1 else nn.Sequential(*tail)).eval()


class _Folder:
    """Finds and folds (producer, batch norm) pairs in one model, recording why others are not."""

    def __init__(self, model: nn.Module, ranks: dict[int, set[int]]) -> None:
        self.model = model
        self.ranks = ranks  # output ranks of each producer, from example_input
        self.folded: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.replaced: dict[int, nn.Module] = {}
        self.registrations: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            self.registrations[id(m)] = self.registrations.get(id(m), 0) + 1

    # -- checks

    def _layer_problem(self, bn: nn.Module) -> str | None:
        if has_hooks(bn):
            return "it has hooks registered on it, which folding would skip"
        if isinstance(bn, BatchNorm):
            if type(bn) is not BatchNorm:
                return f"{type(bn).__qualname__} subclasses BatchNorm and may compute otherwise"
            if bn.num_features is None:
                return "it is a lazy layer that was never called: it has no statistics"
            if len(bn.config.axis) > 1:
                return f"it has several feature axes (axis={bn.config.axis})"
            return None
        if type(bn) not in _TORCH_BN and not is_frozen_batch_norm(bn) and timm_class(bn) is None:
            return f"{type(bn).__qualname__}: not a layer fold knows (or a lazy one never called)"
        if is_frozen_batch_norm(bn):
            return None
        if not bn.track_running_stats or bn.running_mean is None:
            return "track_running_stats=False: it normalizes with batch statistics in eval mode"
        return None

    def _pair_problem(self, producer: nn.Module, producer_name: str, bn: nn.Module) -> str | None:
        problem = _producer_problem(producer, producer_name)
        # (without a problem it is one of _PRODUCERS: the isinstance tells the type checker so)
        if problem is not None or not isinstance(producer, _PRODUCERS):
            return problem
        if has_hooks(producer):
            return f"{producer_name!r} has hooks registered on it, which folding could change"
        linear = isinstance(producer, nn.Linear)
        out = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        # One feature axis (_layer_problem): the moving statistics' length.
        statistics = bn.moving_mean if isinstance(bn, BatchNorm) else bn.get_buffer("running_mean")
        features = len(statistics)
        if features != out:
            return f"it has {features} features but {producer_name!r} gives {out}"
        axis = bn.config.axis[0] if isinstance(bn, BatchNorm) else 1
        spatial = 0 if isinstance(producer, nn.Linear) else len(producer.kernel_size)
        ranks = self.ranks.get(id(producer))
        if ranks:  # the producer's channel axis is -(spatial + 1) for every rank it gave
            if any(axis % rank != rank - spatial - 1 for rank in ranks):
                return (f"its axis {axis} is not the channel axis of {producer_name!r}'s output "
                        f"(ranks seen: {sorted(ranks)})")
        # Without ranks: conv output assumed batched (N, C, ...); axis=1 after a Linear
        # assumed on a 2-D (N, features) output, the only rank where it is the feature axis.
        elif axis not in ((1, -1) if linear else (1, -(spatial + 1))):
            return f"its axis {axis} is not the channel axis of {producer_name!r}'s output"
        return None

    # -- folding

    def fold_pair(self, producer: nn.Module, producer_name: str, bn: nn.Module, bn_name: str
                  ) -> None:
        problem = self._layer_problem(bn) or self._pair_problem(producer, producer_name, bn)
        if not problem and (self.registrations[id(producer)] > 1 or self.registrations[id(bn)] > 1):
            problem = "it or the layer before it is shared (registered under several names)"
        if problem:
            self.reasons[bn_name] = problem
            return
        _fold_into(cast(_Producer, producer), bn)  # _pair_problem: a Conv, ... or Linear
        self.folded[bn_name] = producer_name
        self.replaced[id(bn)] = _replacement(bn)

    def walk(self, module: nn.Module, prefix: str) -> None:
        """Fold in ``module``: along its fx graph, or else pairwise in a Sequential and below."""
        try:
            graph = BatchNormTracer().trace(module)
        except Exception as error:  # any failure to trace: fall back to the module tree
            self._walk_untraceable(module, prefix, error)
        else:
            self._walk_graph(module, graph, prefix)

    def _walk_graph(self, root: nn.Module, graph: torch.fx.Graph, prefix: str) -> None:
        uses = ModuleUses(graph)
        calls, used_directly = uses.calls, uses.read_directly

        for node in graph.nodes:
            if node.op != "call_module" or not is_batch_norm(root.get_submodule(node_target(node))):
                continue
            target = node_target(node)
            name, bn = prefix + target, root.get_submodule(target)
            source = node.args[0] if node.args else None
            if len(node.args) != 1 or node.kwargs:
                self.reasons[name] = "it is called with arguments besides its input"
            elif calls[target] > 1:
                self.reasons[name] = "it is called more than once"
            elif used_directly(target):
                self.reasons[name] = "its parameters or buffers are used outside its call"
            elif not isinstance(source, torch.fx.Node) or source.op != "call_module":
                self.reasons[name] = _NOT_AFTER_PRODUCER
            elif (problem := _producer_problem(root.get_submodule(node_target(source)),
                                               prefix + node_target(source))) is not None:
                self.reasons[name] = problem  # the first reason
            elif len(source.users) > 1:
                self.reasons[name] = (f"the output of {prefix + node_target(source)!r} is also "
                                      "used elsewhere, which needs it unnormalized")
            elif calls[node_target(source)] > 1 or used_directly(node_target(source)):
                self.reasons[name] = (f"{prefix + node_target(source)!r} is called more than "
                                      "once or its weights are used elsewhere")
            else:
                self.fold_pair(root.get_submodule(node_target(source)),
                               prefix + node_target(source), bn, name)

    def _walk_untraceable(self, module: nn.Module, prefix: str, error: Exception) -> None:
        owner = repr(prefix[:-1]) if prefix else "the model"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        why_not = (f"{owner} cannot be traced by torch.fx ({first_line}) and the layer does "
                   "not directly follow a Conv, ConvTranspose or Linear in an nn.Sequential")
        children = list(module.named_children())
        plain_sequential = (isinstance(module, nn.Sequential)
                            and type(module).forward is nn.Sequential.forward)
        for i, (name, child) in enumerate(children):
            if is_batch_norm(child):
                if plain_sequential and i > 0:
                    before_name, before = children[i - 1]
                    self.fold_pair(before, prefix + before_name, child, prefix + name)
                else:
                    self.reasons[prefix + name] = why_not
            elif any(is_batch_norm(m) for m in child.modules()):
                self.walk(child, prefix + name + ".")


def _statistics(bn: nn.Module) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]:
    """The mean, variance, epsilon, gamma, beta the layer normalizes with in inference."""
    mean, variance = held_statistics(bn)  # fold takes layers with statistics only
    if isinstance(bn, BatchNorm):
        return mean, variance, bn.config.epsilon, bn.gamma, bn.beta
    if isinstance(bn, _BatchNorm):  # with running statistics (_layer_problem)
        return mean, variance, bn.eps, bn.weight, bn.bias
    frozen = cast(FrozenBatchNorm, bn)  # the only other kind fold takes (_layer_problem)
    return mean, variance, frozen.eps, frozen.weight, frozen.bias


def _fold_into(producer: _Producer, bn: nn.Module) -> None:
    """Fold ``bn``'s inference affine map into ``producer``'s weight and bias, in place."""
    mean, variance, epsilon, gamma, beta = _statistics(bn)
    weight = producer.weight
    with torch.no_grad():
        # float64 so that the folded weights round once, to the weights' dtype.
        scale = torch.rsqrt(variance.double() + epsilon)
        if gamma is not None:
            scale = scale * gamma.double()
        shift = -mean.double() * scale
        if beta is not None:
            shift = shift + beta.double()
        bias = producer.bias.double() if producer.bias is not None else torch.zeros_like(shift)
        w = weight.double()
        if isinstance(producer, _TRANSPOSED):
            # (in, out / groups, *k): output channel g * out/groups + j is [group g's rows, j].
            groups = producer.groups
            w = torch.unflatten(w, 0, (groups, -1))
            w = w * scale.view(groups, 1, -1, *[1] * (w.ndim - 3))
            w = w.flatten(0, 1)
        else:  # (out, in / groups, *k) or (out, in)
            w = w * scale.view(-1, *[1] * (w.ndim - 1))
        new_bias = bias * scale + shift
    bias_dtype = producer.bias.dtype if producer.bias is not None else weight.dtype
    bias_grad = producer.bias.requires_grad if producer.bias is not None else weight.requires_grad
    # New Parameters (not in-place writes): a weight tied to another layer stays as it was there.
    producer.weight = nn.Parameter(w.to(weight.dtype), requires_grad=weight.requires_grad)
    producer.bias = nn.Parameter(new_bias.to(bias_dtype), requires_grad=bias_grad)


def _output_ranks(model: nn.Module, example_input: Tensor | tuple[Any, ...]
                  ) -> dict[int, set[int]]:
    ranks: dict[int, set[int]] = {}
    handles = [m.register_forward_hook(
        lambda m, args, out: ranks.setdefault(id(m), set()).add(out.ndim))
        for m in model.modules() if isinstance(m, _PRODUCERS)]
    try:
        run_without_updates(model, example_input)  # updates from training=True calls dropped
    finally:
        for handle in handles:
            handle.remove()
    return ranks


def fold(model: nn.Module, example_input: Tensor | tuple[Any, ...] | None = None) -> FoldResult:
    """An inference copy of ``model`` with batch normalization folded into the layers before it.

    Every :class:`~batchnorm.BatchNorm` or ``torch.nn.BatchNorm1d/2d/3d``
    (``SyncBatchNorm``, torchvision's ``FrozenBatchNorm2d`` and timm's
    ``BatchNormAct2d``, ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d`` too,
    whose ``drop`` and ``act`` modules stay in its place) whose input is the
    output of a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` (or a
    subclass that computes as it: no ``forward`` of its own, as torchvision's
    ``Conv3DSimple``) that feeds nothing else, along that
    layer's channel axis (axis 1 for a convolution; the last axis for a Linear:
    ``axis=-1``, or ``axis=1`` on a 2-D input), is folded into that layer's
    weight and bias (a bias is created if absent; groups and ConvTranspose's
    ``(in, out / groups, ...)`` weight layout are handled) and replaced by
    ``nn.Identity``, or by its activation's module for a layer with an ``activation``
    (``nn.ReLU()``, ``nn.SiLU()``: the activation stays, after the folded layer). The
    statistics folded are those inference uses
    (:func:`batchnorm.statistics.inference_statistics`, debias included).

    The pairs are found on the ``torch.fx`` graph of the model (any
    traceable model: residual adds, branches); a module fx cannot trace is
    searched in its children instead, and in an ``nn.Sequential`` each
    layer feeds the next. Nothing is folded where that would change the result:
    a convolution whose output has another consumer, a layer called more
    than once, a batch norm after an activation, hooks, ``track_running_stats
    =False``. Without ``example_input`` a convolution's output is assumed
    batched and an ``axis=1`` batch norm after a Linear assumed 2-D; with it
    (a tensor or a tuple of arguments, run once on the copy with every
    statistics update discarded) the ranks are checked.

    ``model`` is not changed. Returns ``(model, folded, not_folded)``, a
    :class:`FoldResult`. The folded model computes the same outputs as
    ``model`` in eval mode up to rounding: the affine map is applied to the
    weights instead of the outputs, so products and sums are associated
    differently (float32: within ``rtol=1e-4, atol=1e-5`` in the tests). It is for
    inference only: the folded layers are gone, and with them training mode.

    Examples:
        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bn.BatchNorm(8), torch.nn.ReLU())
        >>> folded, pairs, left = bn.fold(model)
        >>> folded[1], pairs, left
        (Identity(), [('1', '0')], [])
    """
    model = copy.deepcopy(model).eval()
    ranks = _output_ranks(model, example_input) if example_input is not None else {}
    folder = _Folder(model, ranks)
    if is_batch_norm(model):
        folder.reasons[""] = "the model is a single batch normalization layer"
    else:
        folder.walk(model, "")
    folded, not_folded = [], []
    for name in batch_norm_layers(model, torch_nn=True):
        if name in folder.folded:
            folded.append((name, folder.folded[name]))
        else:
            not_folded.append((name, folder.reasons.get(
                name, "it is not called as a module in the traced forward")))
    return FoldResult(replace_modules(model, folder.replaced), folded, not_folded)
