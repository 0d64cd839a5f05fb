"""What the tools share about models: their batch-norm layers, how a layer is called, tracing.

Private to :mod:`batchnorm.tools` (the module name has the underscore, the
functions do not, so that every tool can import them). One version of each:

- :func:`is_batch_norm`, :func:`is_torch_batch_norm`, :func:`batch_norm_layers`:
  the batch normalization layers of a model; :func:`is_frozen_batch_norm`
  (:class:`FrozenBatchNorm`: what such a layer has), :func:`timm_class` and
  :func:`norm_act_tail` for the ones of torchvision and timm;
- :func:`parse_call`, :func:`model_input`, :func:`example_args`: how a layer
  and a model are called;
- :func:`layer_moments`: a layer input's per-feature count, mean and sum of
  squared deviations; :func:`stored_statistics` / :func:`set_statistics`: the statistics
  a layer normalizes with in inference, read and written;
- :class:`BatchNormTracer`: the ``torch.fx`` tracer that keeps batch norms as calls;
  :func:`node_target`: the name a node calls or reads;
- :func:`activation_name`, :func:`activation_module`: the activations a
  :class:`~batchnorm.BatchNorm` can fuse, as torch modules and calls;
- :func:`has_hooks`: whether a user registered hooks on a module;
- :func:`replace_modules`: put new modules in place of old ones everywhere in a tree;
- :func:`snapshot_buffers` / :func:`restore_buffers` and :func:`snapshot_modes` /
  :func:`restore_modes`: undo what running a model changed;
- :func:`run_without_updates`: run a model once, leaving its statistics as they are.

Only the core's public surface is used: :class:`~batchnorm.BatchNorm` and its
public attributes, :mod:`batchnorm.functional`, :func:`batchnorm.deferred_updates`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, Protocol, cast, overload

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from .. import activations
from ..layer import BatchNorm
from ..shapes import mask_shape, reduction_axes, resolve_axes
from ..statistics import inference_statistics, masked_moments
from ..updates import deferred_updates

__all__ = [
    "BatchNormTracer",
    "FrozenBatchNorm",
    "ModuleUses",
    "accumulation_dtype",
    "activation_module",
    "activation_name",
    "batch_norm_layers",
    "example_args",
    "has_hooks",
    "is_batch_norm",
    "is_frozen_batch_norm",
    "is_torch_batch_norm",
    "layer_moments",
    "model_input",
    "node_target",
    "norm_act_tail",
    "parse_call",
    "replace_modules",
    "restore_buffers",
    "restore_modes",
    "run_without_updates",
    "set_statistics",
    "snapshot_buffers",
    "snapshot_modes",
    "held_statistics",
    "stored_statistics",
    "timm_class",
]


# ---------------------------------------------------------------- finding the layers


# Batch normalization layers of torchvision and timm, by (module, class name), so that they
# are recognized without importing those packages. The frozen ones (inference only: buffers
# weight, bias, running_mean, running_var, and eps) subclass no torch.nn batch norm; timm's
# norm-act layers apply their ``drop``, then their ``act`` module after normalizing.
_FROZEN = {("torchvision.ops.misc", "FrozenBatchNorm2d"),
           ("timm.layers.norm_act", "FrozenBatchNormAct2d")}
_TIMM_NORM_ACT = {"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}


def _class_key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__qualname__


class FrozenBatchNorm(Protocol):
    """What the tools read of the frozen layers (:func:`is_frozen_batch_norm`), whose classes
    are not imported here: ``eps``, and the parameters and statistics, all buffers."""

    eps: float
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    training: bool


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is torchvision's ``FrozenBatchNorm2d`` or timm's
    ``FrozenBatchNormAct2d`` (exactly: a subclass may compute something else)."""
    return _class_key(module) in _FROZEN


def timm_class(module: nn.Module) -> str | None:
    """The class name when ``module`` is exactly timm's ``BatchNormAct2d``,
    ``SyncBatchNormAct`` or ``FrozenBatchNormAct2d``, else None."""
    where, name = _class_key(module)
    return name if where == "timm.layers.norm_act" and name in _TIMM_NORM_ACT else None


def norm_act_tail(module: nn.Module) -> list[nn.Module]:
    """The modules a timm norm-act layer (:func:`timm_class`) applies to its normalized
    output, in order (``drop``, ``act``), leaving out ``nn.Identity``; ``[]`` for any
    other layer."""
    if timm_class(module) is None:
        return []
    tail = (getattr(module, "drop", None), getattr(module, "act", None))
    return [m for m in tail if m is not None and type(m) is not nn.Identity]


def is_torch_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.nn`` batch normalization layer, or one of
    torchvision's or timm's.

    ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``LazyBatchNorm1d/2d/3d`` and their
    subclasses (timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` among them; not
    ``InstanceNorm``, which normalizes each sample on its own), and the frozen layers
    of torchvision and timm (:func:`is_frozen_batch_norm`).
    """
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or is_frozen_batch_norm(module)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch normalization layer: a :class:`~batchnorm.BatchNorm`
    or a ``torch.nn`` one (:func:`is_torch_batch_norm`), subclasses included."""
    return isinstance(module, BatchNorm) or is_torch_batch_norm(module)


@overload
def batch_norm_layers(
    model: nn.Module, *, ours: Literal[True] = True, torch_nn: Literal[False] = False
) -> dict[str, BatchNorm]: ...
@overload
def batch_norm_layers(
    model: nn.Module, *, ours: bool = True, torch_nn: bool = False
) -> dict[str, nn.Module]: ...
def batch_norm_layers(
    model: nn.Module, *, ours: bool = True, torch_nn: bool = False
) -> dict[str, BatchNorm] | dict[str, nn.Module]:
    """The batch normalization layers of ``model`` by qualified name, in ``named_modules()`` order.

    ``ours`` selects the :class:`~batchnorm.BatchNorm` layers, ``torch_nn`` the
    ``torch.nn`` ones (:func:`is_torch_batch_norm`); subclasses are included.
    ``""`` names ``model`` itself. A layer registered under several names is
    listed once, under the first (as ``named_modules()`` does).
    """
    return {name: module for name, module in model.named_modules()
            if (ours and isinstance(module, BatchNorm))
            or (torch_nn and is_torch_batch_norm(module))}


# ---------------------------------------------------------------- calls


def parse_call(
    layer: BatchNorm, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, bool, Tensor | None]:
    """``(x, computes_batch_statistics, mask)`` for a call ``layer(*args, **kwargs)``.

    For a forward pre-hook (or hook) registered with ``with_kwargs=True``.
    Mirrors ``BatchNorm.forward``'s signature ``(x, training=None, mask=None)``
    and its mode resolution: a frozen layer (``trainable=False``) never computes
    batch statistics, ``training=None`` follows ``layer.training``.
    """
    x = args[0] if args else kwargs["x"]
    training = args[1] if len(args) > 1 else kwargs.get("training")
    mask = args[2] if len(args) > 2 else kwargs.get("mask")
    computes = layer.trainable and (layer.training if training is None else bool(training))
    return x, computes, mask


def model_input(batch: Any) -> Any:
    """The model input in a batch from a data loader: the first element of an
    ``(input, target, ...)`` tuple or list, anything else as it is."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def example_args(example_input: Tensor | tuple[Any, ...]) -> tuple[Any, ...]:
    """The positional arguments of ``model(...)`` for an ``example_input``: a tuple is the
    arguments, anything else (a tensor) the one argument."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


def run_without_updates(model: nn.Module, example_input: Tensor | tuple[Any, ...]) -> Any:
    """``model(*example_args(example_input))`` under ``torch.no_grad()``, in the model's
    current train/eval mode, with every BatchNorm moving-statistics update discarded
    (:func:`batchnorm.deferred_updates`; a lazy BatchNorm is built by the call).
    Returns the output."""
    with torch.no_grad(), deferred_updates() as updates:
        output = model(*example_args(example_input))
        updates.discard()
    return output


# ---------------------------------------------------------------- statistics


def accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def layer_moments(
    layer: BatchNorm, x: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per feature of ``layer``: the number of values, their mean and their sum of squared
    deviations (``M2``) in ``x`` (restricted to ``mask``), in float64 (float32 on MPS).

    The whole batch counts as one sample of values: ghost-batch groups are not
    separated (population statistics do not depend on how a batch is split).
    ``x`` is detached; the biased variance is ``M2 / count``. Masked-out values (NaN,
    Inf or huge padding included) do not enter them; a feature the mask leaves empty has
    count 0, mean 0 and M2 0.
    """
    axes = resolve_axes(layer.config.axis, x.ndim)
    dims = reduction_axes(x.ndim, axes)
    xd = x.detach().to(accumulation_dtype(x.device))
    if mask is None:
        variance, mean = torch.var_mean(xd, dim=dims, correction=0)
        count = torch.full_like(mean, float(math.prod(x.shape[d] for d in dims)))
        return count, mean, variance * count
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(  # as the layer's own check, which runs after the hooks calling this
            f"mask must be a boolean tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    selected = mask.reshape(mask_shape(mask, x, axes)).expand(xd.shape)
    count, mean, variance = (t.squeeze(tuple(dims)) for t in masked_moments(xd, selected, dims))
    return count, mean, variance * count


def stored_statistics(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The mean and variance a batch-norm layer (:func:`is_batch_norm`) normalizes with in
    inference: a :class:`~batchnorm.BatchNorm`'s moving statistics with its ``debias``
    correction applied, a ``torch.nn`` layer's running statistics (None when it keeps none:
    ``track_running_stats=False``)."""
    if isinstance(layer, BatchNorm):
        config = layer.config
        return inference_statistics(layer.state(), momentum=config.momentum,
                                    epsilon=config.epsilon, debias=config.debias)
    mean, variance = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    if not (isinstance(mean, Tensor) and isinstance(variance, Tensor)):
        return None
    return mean, variance


def held_statistics(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """:func:`stored_statistics` of a layer known to keep statistics (the caller left out
    ``track_running_stats=False`` layers); a ``ValueError`` naming the layer otherwise."""
    held = stored_statistics(layer)
    if held is None:
        raise ValueError(f"{type(layer).__name__} keeps no running statistics "
                         "(track_running_stats=False)")
    return held


def set_statistics(layer: nn.Module, mean: Tensor, variance: Tensor,
                   num_updates: int | Tensor, keep: Tensor | None = None) -> None:
    """Make ``mean`` and ``variance`` the statistics ``layer`` normalizes with in inference
    (:func:`stored_statistics` then returns them), in place, and ``num_updates`` its count of
    updates; the features where the boolean ``keep`` is True keep every statistic they had.

    A :class:`~batchnorm.BatchNorm` gets ``moving_mean`` and ``moving_variance``, with renorm
    also ``moving_stddev = renorm_stddev = sqrt(variance + epsilon)`` and ``renorm_mean =
    mean``, with ``debias`` initial values equal to the new statistics (which makes the
    debiasing correction the identity); a ``torch.nn`` layer its ``running_mean`` and
    ``running_var`` (and ``num_batches_tracked`` where it has one). ``mean`` and
    ``variance`` are cast to the buffers' dtype and device.
    """
    counter: Tensor | None
    if isinstance(layer, BatchNorm):
        config = layer.config
        values = {"moving_mean": mean, "moving_variance": variance}
        if config.renorm:
            stddev = torch.sqrt(variance + config.epsilon)
            values.update(moving_stddev=stddev, renorm_mean=mean, renorm_stddev=stddev)
        if config.debias:
            # The correction (m - momentum**t m0) / (1 - momentum**t) is the identity when
            # m0 == m: inference uses exactly the values written.
            values.update(initial_moving_mean=mean, initial_moving_variance=(
                variance + config.epsilon if config.renorm else variance))
        counter = layer.get_buffer("num_updates")
    else:
        values = {"running_mean": mean, "running_var": variance}
        tracked = getattr(layer, "num_batches_tracked", None)
        counter = tracked if isinstance(tracked, Tensor) else None
    with torch.no_grad():
        for name, value in values.items():
            buffer = getattr(layer, name)
            value = value.to(device=buffer.device, dtype=buffer.dtype)
            buffer.copy_(value if keep is None else torch.where(keep.to(buffer.device), buffer,
                                                                value))
        if counter is not None:
            counter.copy_(torch.as_tensor(num_updates))


# ---------------------------------------------------------------- tracing


def node_target(node: torch.fx.Node) -> str:
    """The target of a ``call_module``, ``call_method`` or ``get_attr`` node: a qualified
    name (fx types every node's target as a name or a function; these nodes hold a name)."""
    return cast(str, node.target)


class BatchNormTracer(torch.fx.Tracer):
    """A ``torch.fx`` tracer that keeps every batch normalization layer, convolution and
    linear layer (subclasses included) as one ``call_module``.

    fx traces into modules defined outside ``torch.nn``: without this, a
    :class:`~batchnorm.BatchNorm` (or a user's subclass of a ``torch.nn`` batch
    norm) would become the operations of its forward, and the layer could not be
    found in the graph, or would make the whole trace fail on its control flow.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Subclasses of torch.nn's convolutions and Linear too (torchvision's Conv3DSimple):
        # traced into, they would be a bare function call, and fold could not see them.
        return (is_batch_norm(m) or isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                or super().is_leaf_module(m, module_qualified_name))


# ---------------------------------------------------------------- activations

# The torch forms of each fusable activation (batchnorm.activations.ACTIVATIONS), by the
# exact class, function or method name: a subclass may compute something else.
_ACTIVATION_MODULES: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.SiLU: "silu"}
_ACTIVATION_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu", torch.relu_: "relu", nn.functional.relu: "relu",
    nn.functional.relu_: "relu", nn.functional.silu: "silu"}
_ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}


def activation_name(module_or_node: nn.Module | torch.fx.Node,
                    root: nn.Module | None = None) -> str | None:
    """The fusable activation (``"relu"``, ``"silu"``) a module computes, or an ``fx`` node
    applies to its first argument (``root``: the traced module, for ``call_module`` nodes);
    None for anything else.

    Modules: exactly ``nn.ReLU`` and ``nn.SiLU`` (``inplace`` either way). Nodes: those
    modules, ``torch.relu(_)``, ``F.relu(_)``, ``F.silu`` and ``x.relu(_)()``, with no
    argument besides the input and ``inplace``.
    """
    if isinstance(module_or_node, nn.Module):
        return _ACTIVATION_MODULES.get(type(module_or_node))
    node = module_or_node
    if not node.args or any(k != "inplace" for k in node.kwargs):
        return None
    if node.op == "call_module" and root is not None and len(node.args) == 1:
        return _ACTIVATION_MODULES.get(type(root.get_submodule(node_target(node))))
    if node.op == "call_function" and len(node.args) <= 2:
        if len(node.args) == 2 and not isinstance(node.args[1], bool):  # F.relu(x, inplace)
            return None
        try:
            return _ACTIVATION_FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method" and len(node.args) == 1:
        return _ACTIVATION_METHODS.get(node_target(node))
    return None


def activation_module(activation: str) -> nn.Module:
    """A new ``torch.nn`` module computing ``activation`` (``nn.ReLU()``, ``nn.SiLU()``)."""
    return activations.module(activation)


# ---------------------------------------------------------------- module surgery


def has_hooks(module: nn.Module) -> bool:
    """Whether a user registered hooks on ``module`` itself: forward pre-hooks, forward
    hooks, backward hooks or backward pre-hooks.

    A tool that replaces the module, or changes what it computes, would lose them or
    change what they see. The hook an uninitialized ``torch.nn`` lazy module registers
    on itself (to infer its shapes on the first call) does not count.
    """
    pre_hooks = dict(module._forward_pre_hooks)
    own = getattr(module, "_initialize_hook", None) if isinstance(module, LazyModuleMixin) else None
    if own is not None:
        pre_hooks.pop(own.id, None)
    return bool(pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put ``replacements[id(m)]`` in place of every occurrence of module ``m`` in the tree.

    A module registered under several names is replaced under each of them by the
    same new module. Returns the model, or its replacement if the model itself is one.
    """
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
    return model


# ---------------------------------------------------------------- snapshot and restore


def snapshot_buffers(
    model: nn.Module, *, exclude: type | tuple[type, ...] = ()
) -> list[tuple[Tensor, Tensor]]:
    """``(buffer, copy)`` for every buffer of ``model`` (each once), for :func:`restore_buffers`.

    The buffers of modules that are instances of ``exclude`` are left out (e.g.
    ``exclude=BatchNorm``: a tool that writes those itself).
    """
    saved: list[tuple[Tensor, Tensor]] = []
    seen: set[int] = set()
    for module in model.modules():
        if exclude and isinstance(module, exclude):
            continue
        for buffer in module.buffers(recurse=False):
            if id(buffer) not in seen:
                seen.add(id(buffer))
                saved.append((buffer, buffer.detach().clone()))
    return saved


def restore_buffers(saved: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Copy the values :func:`snapshot_buffers` took back into their buffers, in place."""
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


def snapshot_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """``(module, training)`` for every module of ``model``, for :func:`restore_modes`."""
    return [(module, module.training) for module in model.modules()]


def restore_modes(saved: Iterable[tuple[nn.Module, bool]]) -> None:
    """Set every module's train/eval flag back to what :func:`snapshot_modes` saw
    (the flag only: no ``train()`` overrides run)."""
    for module, training in saved:
        module.training = training


class ModuleUses:
    """How a traced forward uses its submodules: how often each is called, and whether it is
    reached as an attribute too (``get_attr``: its parameters or buffers read directly)."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.calls: dict[str, int] = {}
        self._attributes: list[str] = []
        for node in graph.nodes:
            if node.op == "call_module":
                target = node_target(node)
                self.calls[target] = self.calls.get(target, 0) + 1
            elif node.op == "get_attr":
                self._attributes.append(node_target(node))

    def read_directly(self, target: str) -> bool:
        """Whether the forward reads ``target`` (or something inside it) as an attribute."""
        return any(a == target or a.startswith(target + ".") for a in self._attributes)

    def used_once(self, target: str) -> bool:
        """Called exactly once and never read as an attribute."""
        return self.calls[target] == 1 and not self.read_directly(target)
