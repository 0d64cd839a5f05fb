"""Convert between ``torch.nn`` batch normalization and :class:`batchnorm.BatchNorm`.

:func:`convert` replaces every ``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``
and ``LazyBatchNorm1d/2d/3d`` in a model (and the batch norms of torchvision and
timm) by a :class:`~batchnorm.BatchNorm` that computes the same thing;
:func:`to_torch` goes back wherever ``torch.nn`` can say what the layer does, and
lists the layers it cannot convert.

The dictionary between the two:

================================  =====================================
``torch.nn.BatchNorm*d``          ``batchnorm.BatchNorm``
================================  =====================================
``momentum=m`` (the step)         ``momentum=1 - m`` (the decay)
``momentum=None``                 ``momentum=None`` (cumulative average)
``eps``                           ``epsilon``
``affine=False``                  ``center=False, scale=False``
``affine=True, bias=False``       ``center=False`` (``scale=True``)
unbiased batch variance in        ``unbiased_moving_variance=True``
``running_var``
``weight``, ``bias``              ``gamma``, ``beta`` (the same Parameter objects)
``running_mean``, ``running_var``  ``moving_mean``, ``moving_variance``
``num_batches_tracked``           ``num_updates``
channel axis 1                    ``axis=1``
followed by ``nn.ReLU``/``SiLU``  ``activation="relu"``/``"silu"``
(``fuse_activation=True``)        (the activation module: ``nn.Identity``)
torchvision ``FrozenBatchNorm2d``  ``trainable=False`` (gamma, beta: no grad)
timm ``BatchNormAct2d``,          ``activation="relu"``/``"silu"``; another
``SyncBatchNormAct``              ``act`` or a ``drop``: :class:`BatchNormAct`
timm ``FrozenBatchNormAct2d``     both of the above
================================  =====================================
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple, cast

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ..layer import BatchNorm
from ._model import (
    BatchNormTracer,
    FrozenBatchNorm,
    ModuleUses,
    activation_module,
    activation_name,
    batch_norm_layers,
    has_hooks,
    is_batch_norm,
    is_frozen_batch_norm,
    node_target,
    norm_act_tail,
    replace_modules,
    restore_modes,
    run_without_updates,
    snapshot_modes,
    timm_class,
)

__all__ = ["BatchNormAct", "ConversionResult", "convert", "to_torch"]

_TORCH_CLASSES: dict[str, type[_BatchNorm]] = {
    cls.__name__: cls
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
}
# The torch.nn class a converted layer came from, so that to_torch can give it back.
_CONVERTED_FROM = "_converted_from_torch_class"
# On a layer convert fused an activation module into: (the nn.Identity put in the
# module's place, the module), so that to_torch can put the module back there.
_FUSED_FROM = "_fused_activation_from_torch"
# Input ranks each torch.nn class accepts (SyncBatchNorm: any rank from 2 on).
_RANKS = {"BatchNorm1d": {2, 3}, "BatchNorm2d": {4}, "BatchNorm3d": {5}}
# The batch norms of torchvision and timm convert knows: where to import each from (for
# to_torch), and the torch.nn class that computes the same normalization.
_OTHER_CLASSES = {
    "FrozenBatchNorm2d": ("torchvision.ops.misc", "BatchNorm2d"),
    "BatchNormAct2d": ("timm.layers.norm_act", "BatchNorm2d"),
    "SyncBatchNormAct": ("timm.layers.norm_act", "SyncBatchNorm"),
    "FrozenBatchNormAct2d": ("timm.layers.norm_act", "BatchNorm2d"),
}
# On a layer converted from a timm norm-act layer: its (drop, act) modules, for to_torch.
_NORM_ACT_FROM = "_converted_from_timm_modules"


class BatchNormAct(nn.Sequential):
    """A ``bn.BatchNorm`` followed by the dropout (or drop path) and activation modules of
    the timm ``BatchNormAct2d`` it was converted from, where the activation cannot be fused
    into the layer (made by :func:`convert`; :func:`to_torch` gives the timm layer back).

    Its children are ``bn``, ``drop`` and ``act``, applied in that order. It loads the
    timm layer's state dict too, whose batch-norm keys (``weight``, ``running_mean``, ...)
    are at the layer's own prefix.
    """

    def __init__(self, bn: BatchNorm, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.bn, self.drop, self.act = bn, drop, act

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        for key in list(state_dict):
            name = key.removeprefix(prefix)
            if key.startswith(prefix) and "." not in name and name not in self._modules:
                state_dict[f"{prefix}bn.{name}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _Unconvertible(Exception):
    """Why one layer cannot be converted (the message is the reason)."""


class ConversionResult(NamedTuple):
    """What :func:`to_torch` returns: the model and the layers it left as they were."""

    model: nn.Module
    """The converted model (the same object, unless the model itself was a converted layer)."""
    not_converted: list[tuple[str, str]]
    """``(qualified name, reason)`` of every layer left unconverted; ``""`` names the model."""


def _complement(momentum: float) -> float:
    # 1 - momentum, rounded to 15 significant digits so that 0.1 -> 0.9 -> 0.1 round-trips
    # (1 - 0.9 is 0.09999999999999998); the change is far below float32 resolution.
    return float(f"{1.0 - momentum:.15g}")


def _check_hooks(module: nn.Module) -> None:
    if has_hooks(module):
        raise _Unconvertible("the layer has hooks registered on it, which would be lost")


# ---------------------------------------------------------------------------- torch -> ours


def _from_torch(module: nn.Module) -> nn.Module:
    """The module equivalent to ``module``, a torch.nn batch normalization layer or one of
    torchvision's or timm's (:func:`_convertible`): a ``BatchNorm``, or a
    :class:`BatchNormAct` after a timm layer whose drop and act cannot be fused."""
    _check_hooks(module)
    if isinstance(module, _BatchNorm):
        layer = _bn_from_torch(module)
    else:  # frozen (is_frozen_batch_norm): those classes subclass no torch.nn batch norm
        layer = _frozen_from_torch(cast(FrozenBatchNorm, module))
    setattr(layer, _CONVERTED_FROM, type(module).__name__)
    if timm_class(module) is None:
        return layer
    drop, act = module.get_submodule("drop"), module.get_submodule("act")
    setattr(layer, _NORM_ACT_FROM, (drop, act))
    tail = norm_act_tail(module)
    if not tail:
        return layer
    if tail == [act] and activation_name(act) is not None:
        return layer.reconfigure(activation=activation_name(act))
    return BatchNormAct(layer, drop, act).train(module.training)


def _new_layer(num_features: int | None, **options: Any) -> BatchNorm:
    """``BatchNorm(num_features, axis=1, unbiased_moving_variance=True, **options)``, as
    torch.nn layers compute (``momentum``: the decay, 1 - torch's momentum)."""
    with warnings.catch_warnings():  # 1 - m is meant: not a PyTorch momentum passed by mistake
        warnings.filterwarnings("ignore", message="momentum=", category=UserWarning)
        return BatchNorm(num_features, axis=1, unbiased_moving_variance=True, **options)


def _frozen_from_torch(module: FrozenBatchNorm) -> BatchNorm:
    """A frozen BatchNorm (``trainable=False``) computing what the frozen ``module`` does."""
    if not module.eps > 0:
        raise _Unconvertible(f"eps={module.eps!r}: bn.BatchNorm needs epsilon > 0")
    layer = _new_layer(len(module.running_mean), momentum=_complement(0.1),
                       epsilon=float(module.eps), trainable=False,
                       device=module.running_mean.device, dtype=module.running_mean.dtype)
    with torch.no_grad():
        layer.moving_mean.copy_(module.running_mean)
        layer.moving_variance.copy_(module.running_var)
    layer.gamma = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    layer.beta = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    # Frozen, it never counts; as the frozen layer's, its state dict has no counter: the
    # checkpoints of the frozen layer (no num_batches_tracked) load into it.
    layer.register_buffer("num_updates", layer.num_updates, persistent=False)
    return layer.train(module.training)


def _bn_from_torch(module: _BatchNorm) -> BatchNorm:
    """The BatchNorm equivalent to ``module``, a torch.nn batch normalization layer."""
    if not module.track_running_stats or module.running_mean is None:
        raise _Unconvertible(
            "track_running_stats=False: torch.nn then normalizes with the batch statistics "
            "in eval mode too, which bn.BatchNorm (inference = moving averages) cannot "
            "represent")
    if isinstance(module, nn.SyncBatchNorm) and torch.distributed.is_available() \
            and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size(module.process_group) > 1:
        raise _Unconvertible(
            "SyncBatchNorm in a distributed run: bn.BatchNorm would compute per-process "
            "statistics instead of statistics across processes")
    if module.momentum is None:
        momentum = None
    elif not 0.0 < module.momentum <= 1.0:
        raise _Unconvertible(
            f"momentum={module.momentum!r}: bn.BatchNorm's decay 1 - momentum must be in "
            "[0, 1), i.e. a torch momentum in (0, 1]")
    else:
        momentum = _complement(module.momentum)
    if not module.eps > 0:
        raise _Unconvertible(f"eps={module.eps!r}: bn.BatchNorm needs epsilon > 0")
    lazy = isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()
    weight, bias = module.weight, module.bias
    reference = weight if weight is not None else module.running_mean
    layer = _new_layer(None if lazy else module.num_features, momentum=momentum,
                       epsilon=float(module.eps), center=bias is not None,
                       scale=weight is not None, device=module.running_mean.device,
                       dtype=reference.dtype)
    if not lazy:
        with torch.no_grad():
            layer.moving_mean.copy_(module.running_mean)
            layer.moving_variance.copy_(module.get_buffer("running_var"))
            layer.num_updates.copy_(module.get_buffer("num_batches_tracked"))
        # The same Parameter objects: an optimizer built before the conversion keeps working.
        if weight is not None:
            layer.gamma = weight
        if bias is not None:
            layer.beta = bias
    return layer.train(module.training)


def convert(model: nn.Module, *, strict: bool = True, fuse_activation: bool = False
            ) -> nn.Module:
    """Replace every ``torch.nn`` batch normalization layer in ``model`` by a ``bn.BatchNorm``.

    Converts ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and ``LazyBatchNorm1d/2d/3d``
    (exactly these classes; subclasses may compute something else and are left
    alone), torchvision's ``FrozenBatchNorm2d`` and timm's ``BatchNormAct2d``,
    ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d`` in place, keeping what the
    model computes: the same outputs in training and eval mode and the same
    running-statistics updates (see the
    module docstring for the mapping). ``weight``/``bias`` become ``gamma``/
    ``beta`` as the same Parameter objects; the running statistics and
    ``num_batches_tracked`` are copied; each layer's train/eval mode, device
    and dtype are kept. An uninitialized lazy layer becomes a lazy
    ``BatchNorm``. A frozen layer becomes a frozen ``BatchNorm`` (``trainable=False``:
    its moving statistics in training mode too, ``gamma``/``beta`` new Parameters
    that do not require grad, and, as the frozen layer's, no counter in its state
    dict: ``num_updates`` is not persistent). timm's norm-act layers apply ``drop``, then ``act``,
    after normalizing: a ReLU or SiLU ``act`` (with no ``drop``) becomes the layer's
    ``activation``; any other becomes a :class:`BatchNormAct`, the ``BatchNorm``
    followed by the two modules (an ``nn.Identity`` ``act`` is left out). Returns the
    model (the new layer if ``model`` itself is one).

    What cannot be kept exactly is not converted: ``track_running_stats=False``
    (torch then normalizes with batch statistics in eval mode too), ``eps=0``,
    a momentum outside ``(0, 1]``, a layer with hooks, ``SyncBatchNorm`` in a
    distributed run of more than one process (``bn.BatchNorm``'s statistics are
    per process). With ``strict=True`` any of these raises ``ValueError``
    naming such layers (those with the same reason together) before anything
    changes; with ``strict=False`` they stay ``torch.nn`` layers, with a warning
    naming them.

    Differences left: half-precision layers keep their statistics in float32
    here (torch keeps them in half precision), and a batch with NaN or Inf is
    kept out of the moving averages (and of ``num_updates``) with a warning.

    ``fuse_activation=True`` also fuses each batch norm whose output goes only to a ReLU
    or SiLU (``nn.ReLU``/``nn.SiLU`` modules, ``torch.relu``, ``F.relu``, ``F.silu``,
    ``x.relu()``) into one ``bn.BatchNorm(activation=...)`` (see
    :mod:`batchnorm.activations`: the activation then costs no memory pass of its own).
    The pairs are found on the model's ``torch.fx`` graph (any traceable model: residual
    blocks, branches) or, in a module fx cannot trace, between neighbours of a plain
    ``nn.Sequential`` (searched in its children). An activation module used by that call
    alone becomes ``nn.Identity`` and the model keeps its classes; an activation that is
    a function call, or a module also called elsewhere (ResNet's shared ``self.relu``), is
    removed from the traced graph, so that (sub)model comes back as a
    ``torch.fx.GraphModule`` of its traced forward. Batch norms already ``bn.BatchNorm``
    (without activation) are fused too; nothing is fused where that would change the
    result: another user of the batch norm's output, hooks on either module, a batch
    norm called more than once or registered under several names, a layer left
    unconverted.

    Examples:
        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = bn.convert(model)
        >>> model[1]
        BatchNorm(8, axis=1, momentum=0.9, epsilon=1e-05, unbiased_moving_variance=True)
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                             torch.nn.ReLU())
        >>> model = bn.convert(model, fuse_activation=True)
        >>> model[1].activation, model[2]
        ('relu', Identity())
    """
    replacements: dict[int, nn.Module] = {}
    problems: list[tuple[str, str]] = []
    for name, module in batch_norm_layers(model, ours=False, torch_nn=True).items():
        cls = type(module)
        if _TORCH_CLASSES.get(cls.__name__) is cls or is_frozen_batch_norm(module) \
                or timm_class(module) is not None:
            try:
                replacements[id(module)] = _from_torch(module)
            except _Unconvertible as why:
                problems.append((name, str(why)))
        else:
            problems.append((name, f"{cls.__qualname__} subclasses a torch.nn batch "
                                   "normalization class and may compute something else"))
    if problems:
        listing = _listing(problems)
        if strict:
            raise ValueError(
                f"cannot convert {len(problems)} layer(s) without changing what the model "
                f"computes, nothing was converted: {listing}. Pass strict=False to convert "
                "the others and leave these as they are")
        warnings.warn(f"left {len(problems)} torch.nn layer(s) unconverted: {listing}",
                      UserWarning, stacklevel=2)
    if fuse_activation and id(model) not in replacements:
        model = _ActivationFuser(model, replacements).fuse(model)
    return replace_modules(model, replacements)


def _listing(problems: list[tuple[str, str]], shown: int = 3) -> str:
    """``problems`` (name, reason) for a message: the layers with the same reason (the
    same class, the same option) together, the first ``shown`` names of each named."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in problems:
        by_reason.setdefault(reason, []).append(repr(name or "(the model)"))
    parts = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{', '.join(names[:shown])}{more}: {reason}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- fusing


class _ActivationFuser:
    """Fuses (batch norm, activation) pairs of one model for :func:`convert`.

    ``replacements`` maps converted torch layers to their BatchNorm; fusing sets the
    activation of those layers (or of BatchNorm layers already in the model) and adds the
    activation modules that become ``nn.Identity`` to it.
    """

    def __init__(self, model: nn.Module, replacements: dict[int, nn.Module]) -> None:
        self.replacements = replacements
        self.registrations: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            self.registrations[id(m)] = self.registrations.get(id(m), 0) + 1

    def layer(self, bn: nn.Module) -> BatchNorm | None:
        """The BatchNorm ``bn`` is or becomes, if an activation can be fused into it."""
        layer = self.replacements.get(id(bn), bn)
        if (type(layer) is not BatchNorm or layer.config.activation is not None or has_hooks(bn)
                or self.registrations.get(id(bn), 0) != 1):
            return None
        return layer

    def fuse_module(self, layer: BatchNorm, act: nn.Module, name: str) -> None:
        """Fuse ``act`` into ``layer``; ``act``'s place gets an ``nn.Identity``."""
        identity = nn.Identity()
        layer.reconfigure(activation=name)
        setattr(layer, _FUSED_FROM, (identity, act))  # a tuple: not registered as a child
        self.replacements[id(act)] = identity

    def fuse(self, module: nn.Module) -> nn.Module:
        """Fuse in ``module``; returns it, or the GraphModule replacing it."""
        try:
            graph = BatchNormTracer().trace(module)
        except Exception:  # any failure to trace: the module tree instead
            self._fuse_untraceable(module)
            return module
        return self._fuse_graph(module, graph)

    def _fuse_graph(self, root: nn.Module, graph: torch.fx.Graph) -> nn.Module:
        used_once = ModuleUses(graph).used_once

        # The calls to take out of a forward, by the module whose forward makes them.
        rewrites: dict[str, dict[str, str]] = {}
        for node in graph.nodes:
            pair = self._pair(root, node)
            if pair is None or not used_once(node_target(node)):
                continue
            layer, name, user = pair
            target = node_target(node)
            if user.op == "call_module":
                act = root.get_submodule(node_target(user))
                if has_hooks(act):
                    continue
                if used_once(node_target(user)) and self.registrations.get(id(act), 0) == 1:
                    self.fuse_module(layer, act, name)
                    continue
            stack = list(user.meta.get("nn_module_stack", {}))
            if user.op == "call_module":
                stack = stack[:-1]  # the activation module itself
            owner = stack[-1] if stack else ""
            if owner and not (target.startswith(owner + ".")
                              and self.registrations.get(id(root.get_submodule(owner))) == 1):
                continue
            prefix = owner + "." if owner else ""
            rewrites.setdefault(owner, {})[target.removeprefix(prefix)] = name
        # Deepest first: an owner's GraphModule is traced through by its ancestors'.
        for owner in sorted(rewrites, key=lambda o: o.count(".") + bool(o), reverse=True):
            module = root.get_submodule(owner)
            rewritten = self._rewrite(module, rewrites[owner])
            if rewritten is module:
                continue
            if not owner:
                root = rewritten
            else:
                parent, _, child = owner.rpartition(".")
                setattr(root.get_submodule(parent), child, rewritten)
        return root

    def _pair(self, root: nn.Module, node: torch.fx.Node
              ) -> tuple[BatchNorm, str, torch.fx.Node] | None:
        """``(layer, activation, its node)`` when ``node`` calls a batch norm that can take
        the activation its only user applies to it (``layer``: the BatchNorm the batch norm
        is or becomes), else None."""
        if node.op != "call_module" or len(node.users) != 1:
            return None
        bn = root.get_submodule(node_target(node))
        (user,) = node.users
        layer = self.layer(bn) if is_batch_norm(bn) else None
        if layer is None or not user.args \
                or user.args[0] is not node or any(a is node for a in user.args[1:]):
            return None
        name = activation_name(user, root)
        return (layer, name, user) if name is not None else None

    def _rewrite(self, module: nn.Module, targets: dict[str, str]) -> nn.Module:
        """``module`` as a GraphModule without the activation calls after the batch norms
        ``targets`` names (relative name -> activation), each fused into its layer; ``module``
        itself when it cannot be traced on its own, or has an argument with a default."""
        try:
            graph = BatchNormTracer().trace(module)
        except Exception:  # traceable only as part of its parent: leave these pairs
            return module
        if any(node.op == "placeholder" and node.args for node in graph.nodes):
            # Traced on its own, an argument with a default is a Proxy, never the default:
            # `if shortcut is None` is baked in as False, and a call without it would fail.
            return module
        fused = 0
        for node in list(graph.nodes):
            pair = self._pair(module, node)
            if pair is None or targets.get(node_target(node)) != pair[1]:
                continue
            layer, name, user = pair
            layer.reconfigure(activation=name)
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            fused += 1
        if not fused:
            return module
        graph.lint()
        rewritten = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
        # The GraphModule shares the module's leaves; the containers it builds on the way to
        # them are new: each keeps the train/eval flag of the one it stands for.
        for name, m in rewritten.named_modules():
            m.training = module.get_submodule(name).training
        return rewritten

    def _fuse_untraceable(self, module: nn.Module) -> None:
        children = list(module.named_children())
        plain_sequential = (isinstance(module, nn.Sequential)
                            and type(module).forward is nn.Sequential.forward)
        for i, (name, child) in enumerate(children):
            if is_batch_norm(child):
                if not plain_sequential or i + 1 == len(children):
                    continue
                act = children[i + 1][1]
                layer, activation = self.layer(child), activation_name(act)
                if (layer is not None and activation is not None and not has_hooks(act)
                        and self.registrations.get(id(act), 0) == 1):
                    self.fuse_module(layer, act, activation)
            elif any(is_batch_norm(m) for m in child.modules()):
                fused = self.fuse(child)
                if fused is not child:
                    setattr(module, name, fused)


# ---------------------------------------------------------------------------- ours -> torch


def _other_class(layer: BatchNorm) -> type[nn.Module] | None:
    """The torchvision or timm class ``layer`` was converted from, to go back to: when that
    package is installed and, for a frozen class, the layer is still frozen."""
    recorded: str | None = getattr(layer, _CONVERTED_FROM, None)
    if recorded is None or recorded not in _OTHER_CLASSES \
            or layer.trainable != ("Frozen" not in recorded):
        return None
    try:
        module = importlib.import_module(_OTHER_CLASSES[recorded][0])
    except Exception:  # not installed, or does not import here
        return None
    return getattr(module, recorded, None)


def _torch_class(layer: BatchNorm, ranks: set[int]) -> type[nn.Module]:
    recorded: str | None = getattr(layer, _CONVERTED_FROM, None)
    if recorded in _OTHER_CLASSES:  # torchvision's or timm's: the torch.nn class it computes as
        recorded = _OTHER_CLASSES[recorded][1]
    if recorded is not None:
        base = recorded.removeprefix("Lazy")
        if base == "SyncBatchNorm" or not ranks or ranks <= _RANKS[base]:
            return _TORCH_CLASSES[base]
    if not ranks:
        raise _Unconvertible(
            "the input rank is unknown, so the torch.nn class (BatchNorm1d/2d/3d) cannot be "
            "chosen: pass example_input")
    for name, accepted in _RANKS.items():
        if ranks <= accepted:
            return _TORCH_CLASSES[name]
    raise _Unconvertible(
        f"called with inputs of rank {sorted(ranks)}: no single torch.nn class takes them "
        "(BatchNorm1d: 2 or 3, BatchNorm2d: 4, BatchNorm3d: 5)")


def _to_torch_layer(layer: BatchNorm, ranks: set[int]) -> nn.Module:
    """The torch.nn layer equivalent to ``layer``, called with inputs of the given ranks
    (the torchvision or timm class it was converted from, where :func:`_other_class`)."""
    if type(layer) is not BatchNorm:
        raise _Unconvertible(f"{type(layer).__qualname__} subclasses BatchNorm and may "
                             "compute something else")
    _check_hooks(layer)
    config = layer.config
    if len(config.axis) > 1:
        raise _Unconvertible(f"axis={config.axis}: torch.nn has one feature axis")
    axis = config.axis[0]
    if axis != 1 and not (ranks and all(axis % rank == 1 for rank in ranks)):
        raise _Unconvertible(f"axis={axis}: torch.nn normalizes axis 1 (channels first)")
    for option, present in (("renorm=True", config.renorm),
                            ("virtual_batch_size", config.virtual_batch_size is not None),
                            ("adjustment", config.adjustment is not None),
                            ("gamma_regularizer", config.gamma_regularizer is not None),
                            ("beta_regularizer", config.beta_regularizer is not None),
                            ("gamma_constraint", config.gamma_constraint is not None),
                            ("beta_constraint", config.beta_constraint is not None)):
        if present:
            raise _Unconvertible(f"{option}: torch.nn has no equivalent")
    if config.debias and config.momentum is not None:  # a cumulative average is not debiased
        raise _Unconvertible("debias=True: torch.nn has no debiased moving averages")
    if not config.unbiased_moving_variance:
        raise _Unconvertible(
            f"unbiased_moving_variance={config.unbiased_moving_variance}: torch.nn feeds the "
            "unbiased batch variance into running_var, so the moving variance would change; "
            "use unbiased_moving_variance=True")
    other = _other_class(layer)
    if not layer.trainable and other is None:
        raise _Unconvertible("trainable=False: torch.nn has no frozen batch normalization "
                             "(unfreeze first, then freeze with eval() and requires_grad_)")
    if config.center and not config.scale:
        raise _Unconvertible("center=True with scale=False: torch.nn has no bias without weight")
    params = [p for p in (layer.gamma, layer.beta) if p is not None]
    if any(p.dtype != layer.moving_mean.dtype for p in params):
        raise _Unconvertible(
            f"parameters in {params[0].dtype} with statistics in {layer.moving_mean.dtype}: "
            "torch.nn keeps the running statistics in the parameters' dtype (convert a "
            "float32 model, then cast it)")
    if not layer.trainable and other is not None:  # (frozen without one: refused above)
        return _to_frozen(layer, other)
    cls = other or _torch_class(layer, ranks)
    shape = layer.num_features
    if shape is None:  # lazy
        if cls is nn.SyncBatchNorm:
            raise _Unconvertible("not yet built, and torch.nn has no lazy SyncBatchNorm")
        cls = _TORCH_CLASSES["Lazy" + cls.__name__]
    kwargs = {
        "eps": config.epsilon, "affine": config.scale, "track_running_stats": True,
        "momentum": None if config.momentum is None else _complement(config.momentum),
        "device": layer.moving_mean.device, "dtype": layer.moving_mean.dtype,
    }
    if config.scale and not config.center:
        kwargs["bias"] = False
    try:
        module = cls(**kwargs) if shape is None else cls(shape[0], **kwargs)
    except TypeError as error:  # a torch without BatchNorm(bias=False)
        raise _Unconvertible(f"this torch cannot build the layer: {error}") from None
    if shape is not None:
        with torch.no_grad():
            module.get_buffer("running_mean").copy_(layer.moving_mean)
            module.get_buffer("running_var").copy_(layer.moving_variance)
            module.get_buffer("num_batches_tracked").copy_(layer.num_updates)
        if layer.gamma is not None:
            module.weight = layer.gamma
        if layer.beta is not None:
            module.bias = layer.beta
    module.train(layer.training)
    return module


def _to_frozen(layer: BatchNorm, cls: type[nn.Module]) -> nn.Module:
    """The frozen torchvision or timm layer ``cls`` computing what the frozen ``layer`` does."""
    if layer.num_features is None:
        raise _Unconvertible("a lazy layer never called: it has no statistics to freeze")
    module = cls(layer.num_features[0], eps=layer.epsilon)
    ones = torch.ones_like(layer.moving_mean)
    with torch.no_grad():
        for buffer, value in ((module.weight, ones if layer.gamma is None else layer.gamma),
                              (module.bias, 0 * ones if layer.beta is None else layer.beta),
                              (module.running_mean, layer.moving_mean),
                              (module.running_var, layer.moving_variance)):
            buffer.data = value.detach().clone()
    return module.train(layer.training)


def _input_ranks(model: nn.Module, example_input: Tensor | tuple[Any, ...],
                 layers: Iterable[BatchNorm]) -> dict[int, set[int]]:
    """The input ranks each layer sees when ``model`` runs on ``example_input`` in eval mode."""
    ranks: dict[int, set[int]] = {}
    modes = snapshot_modes(model)
    handles = [layer.register_forward_pre_hook(
        lambda layer, args: ranks.setdefault(id(layer), set()).add(args[0].ndim))
        for layer in layers]
    try:
        model.eval()
        # A layer called with training=True records an update that is dropped.
        run_without_updates(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        restore_modes(modes)
    return ranks


def to_torch(model: nn.Module, example_input: Tensor | tuple[Any, ...] | None = None
             ) -> ConversionResult:
    """Replace every ``bn.BatchNorm`` that ``torch.nn`` can represent by its torch.nn equivalent.

    The inverse of :func:`convert`, in place, keeping outputs and statistics
    updates. A layer is converted when it has one feature axis, axis 1 (or an
    axis that is 1 for every input it sees), ``unbiased_moving_variance=True``
    (torch feeds the unbiased variance into ``running_var``), ``scale`` if
    ``center``, no renorm, ghost batches, adjustment, debias, regularizers or
    constraints, ``trainable=True``, and parameters in their statistics' dtype.
    Every other layer is left as it is and listed with the reason. ``fused``
    and the initializers are not carried over: they do not change what the
    layer computes (torch's ``reset_parameters`` uses ones and zeros).

    A layer with an ``activation`` becomes the torch layer and the activation's module
    (``nn.ReLU()``/``nn.SiLU()``): where :func:`convert` fused that module and left an
    ``nn.Identity`` in its place, the module goes back there (the original structure and
    state-dict keys); otherwise the layer becomes ``nn.Sequential(torch layer, module)``.

    The torch class (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) is the one the
    layer was converted from by :func:`convert` (torchvision's or timm's, with
    the ``drop`` and ``act`` modules convert found, where that package imports;
    a frozen class only for a layer still frozen, else the ``torch.nn`` class it
    computes as); otherwise it comes from the
    input ranks seen when ``model(example_input)`` (a tensor or a tuple of
    arguments) runs once in eval mode with every moving-statistics update
    discarded (a lazy layer is built by that call); without either the layer
    is listed as not converted. An unbuilt lazy layer becomes a torch lazy one.

    Returns ``(model, not_converted)``, a :class:`ConversionResult`.

    Examples:
        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(bn.BatchNorm(8, unbiased_moving_variance=True),
        ...                             bn.BatchNorm(8, axis=-1))
        >>> model, not_converted = bn.to_torch(model, torch.randn(2, 8, 4, 8))
        >>> type(model[0]).__name__, model[0].momentum, model[0].eps
        ('BatchNorm2d', 0.01, 0.001)
        >>> not_converted
        [('1', 'axis=-1: torch.nn normalizes axis 1 (channels first)')]
    """
    layers = {id(m): (name, m) for name, m in batch_norm_layers(model).items()}
    containers = {id(m.bn): m for m in model.modules() if isinstance(m, BatchNormAct)}
    ranks: dict[int, set[int]] = {}
    if example_input is not None and layers:
        ranks = _input_ranks(model, example_input, [m for _, m in layers.values()])
    replacements: dict[int, nn.Module] = {}
    not_converted: list[tuple[str, str]] = []
    present = {id(m) for m in model.modules()}
    for key, (name, layer) in layers.items():
        try:
            module = _to_torch_layer(layer, ranks.get(key, set()))
        except _Unconvertible as why:
            not_converted.append((name, str(why)))
            continue
        activation = layer.config.activation
        fused: tuple[nn.Module, nn.Module] | None = getattr(layer, _FUSED_FROM, None)
        if activation is not None and fused is not None and id(fused[0]) in present \
                and activation_name(fused[1]) == activation:
            replacements[id(fused[0])] = fused[1]  # back where convert found it
            activation = None
        if timm_class(module) is not None:  # the timm layer convert found, drop and act too
            container = containers.get(key)
            norm_act: tuple[nn.Module, nn.Module] = getattr(
                layer, _NORM_ACT_FROM, (nn.Identity(), nn.Identity()))
            drop, act = norm_act
            if container is not None and activation is None:
                key, drop, act = id(container), container.drop, container.act
            elif activation_name(act) != activation:  # changed since convert: a Sequential
                act = nn.Identity()
            else:
                activation = None
            module.drop, module.act = drop, act
        if activation is not None:
            module = nn.Sequential(module, activation_module(activation)).train(layer.training)
        replacements[key] = module
    return ConversionResult(replace_modules(model, replacements), not_converted)

