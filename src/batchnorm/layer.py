"""The BatchNorm layer: TensorFlow's batch normalization as a ``torch.nn.Module``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from . import callsite, checkpoint, initializers, options, plan, recompute, shapes, statistics
from . import functional as F
from .config import Adjustment, BatchNormConfig, Constraint, Regularizer
from .health import SkipWatch, warn_skipped
from .initializers import Initializer
from .regularization import apply_constraints, regularization_loss
from .state import BUFFER_NAMES, BatchNormState, BatchStatistics, state_fields, statistics_dtype
from .statistics import PreparedUpdate
from .torch_compat import (
    TorchAlias,
    refuse_scripting,
    reject_positional_options,
    reject_unknown_arguments,
    warn_small_momentum,
)
from .updates import active_recorder

__all__ = ["BatchNorm", "apply_constraints", "regularization_loss"]


class BatchNorm(checkpoint.CheckedStateDict, options.LayerProperties):
    r"""Batch normalization with TensorFlow's semantics, names and defaults.

    .. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    **Training** (``training=True``, or ``None`` after ``model.train()``):
    :math:`\mu, \sigma^2` are the batch's mean and biased variance over every
    axis except the feature ``axis``; the moving averages are updated,
    ``moving = momentum * moving + (1 - momentum) * batch_statistic``
    (recorded instead of applied inside :func:`batchnorm.deferred_updates`; once per
    optimizer step, with the statistics of all its micro-batches, inside
    :func:`batchnorm.accumulate`; not again when activation checkpointing recomputes the
    call during backward).

    **Inference** (``training=False``, or ``None`` after ``model.eval()``):
    :math:`\mu, \sigma^2` are ``moving_mean`` and ``moving_variance``. This is
    what a model is evaluated with: call it with the right mode.

    **Frozen** (``layer.trainable = False``, Keras semantics): the layer always
    runs in inference mode, never updates its moving statistics, and ``gamma``/
    ``beta`` stop requiring grad; setting it back to True restores all three.
    This is what fine-tuning a pretrained model wants.

    Args:
        num_features: size of the feature axis (a tuple for several axes), or
            None to infer it at the first call. The only positional argument: every
            option is keyword-only, with TensorFlow's names.
        axis: feature axis or axes; ``1`` is PyTorch's ``(N, C, ...)``, ``-1``
            TensorFlow's channels-last. Statistics reduce over every other axis.
        momentum: decay of the moving averages, in [0, 1) (PyTorch's
            ``momentum=0.1`` is ``0.9`` here; a value below 0.5 warns), or None for
            the cumulative average of every batch so far (PyTorch's ``momentum=None``).
        epsilon: added to the variance, > 0 (PyTorch's ``eps``).
        center, scale: learn ``beta`` / ``gamma``; when False the parameter is None
            (PyTorch's ``affine=False`` is both False).
        beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer:
            a name (``"zeros"``, ``"ones"``), a number, or a callable ``shape -> tensor``.
        beta_regularizer, gamma_regularizer: callables ``param -> scalar``
            summed by :func:`regularization_loss`.
        beta_constraint, gamma_constraint: callables ``param -> projected param``
            applied by :func:`apply_constraints`.
        debias: at inference, correct the moving averages for their initial
            value (``(m_t - momentum**t * m_0) / (1 - momentum**t)``).
        unbiased_moving_variance: True feeds the Bessel-corrected batch variance into
            ``moving_variance`` (PyTorch and the original paper), False the biased one
            (tf_keras with ``fused=False``, Keras 3). None (the default) does what tf_keras
            does with the same ``fused``: the unbiased one where it fuses (rank 4 with axis
            1 or 3, rank 5 with axis 1 or 4, no renorm, ghost batches, adjustment or
            synchronized statistics, float32 or half input; see
            :meth:`BatchNormConfig.tf_keras_variance`), the biased one elsewhere: decided
            for each training call's input (statistics recorded by ``deferred_updates`` or
            ``accumulate`` keep their call's rule). Normalization always uses the biased
            one.
        renorm: Batch Renormalization (Ioffe 2017) in training: the normalized value is
            corrected by ``r = sigma_batch / sigma_moving`` and
            ``d = (mu_batch - mu_moving) / sigma_moving`` (no gradient through them), so
            training sees what inference will; adds the ``moving_stddev``,
            ``renorm_mean`` and ``renorm_stddev`` buffers.
        renorm_clipping: with ``renorm``, a dict of bounds for the correction, each key
            optional: ``"rmin"`` (default 0) and ``"rmax"`` (default inf) clip ``r`` to
            ``[rmin, rmax]``, ``"dmax"`` (default inf) clips ``d`` to ``[-dmax, dmax]``;
            None clips nothing.
        renorm_momentum: with ``renorm``, the decay of the averages ``r`` and ``d`` are
            computed against (``renorm_mean``, ``renorm_stddev``), in [0, 1).
        virtual_batch_size: ghost batches (Hoffer et al. 2017): in training each group of
            this many samples is normalized with its own statistics, and the moving
            averages take the mean of the group statistics; it must divide the batch.
            None: the whole batch is one group. Not combinable with ``adjustment``.
        ghost_layout: which samples form a ghost batch: ``"strided"`` (tf_keras's
            reshape, sample ``n`` in group ``n mod (N / virtual_batch_size)``) or
            ``"consecutive"`` (samples ``[0, size)``, ``[size, 2 size)``, ...).
        adjustment: in training only, a callable ``input shape -> (scale, bias)``
            (scalars, feature-shaped, or of the input's rank) applied to the normalized
            value before ``gamma``/``beta``: ``y = gamma * (scale * xhat + bias) + beta``.
        fused: None picks the fastest kernel for the configuration; True demands a fused
            kernel (a ``ValueError`` here when the options have none); False forces the
            composite path. Every path gives the same results within float rounding.
        synchronized: in training, take the statistics of the global batch across the
            processes of ``process_group`` (``torch.distributed``, any backend), with
            exact gradients; see :mod:`batchnorm.distributed`. Inference, ghost
            batches (formed and normalized within each process) and an uninitialized
            ``torch.distributed`` (warned once) use local statistics.
        process_group: the group to synchronize over; None is the default group. Not
            part of :meth:`get_config` (a group cannot be serialized).
        activation: ``"relu"`` or ``"silu"`` applies that activation to the output,
            ``y = act(BN(x))`` (statistics and moving averages are those of ``x``, as
            without it), inside the kernels' output pass and backward: normalization
            plus activation cost the memory passes of normalization alone, and the
            pre-activation output is never stored (see :mod:`batchnorm.activations`).
            None (the default) applies nothing.
        trainable: False freezes the layer (see above).
        device: where the parameters and buffers are created (None: torch's default).
        dtype: the parameters' floating-point dtype (None: torch's default); the moving
            statistics are float32, or float64 for float64 parameters.

    ``torch.nn`` habits: ``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked`` and ``eps`` are read-only aliases of ``gamma``, ``beta``,
    ``moving_mean``, ``moving_variance``, ``num_updates`` and ``epsilon`` (the objects
    themselves: ``nn.init.ones_(layer.weight)`` works; they are not extra entries of
    ``named_parameters()`` or ``state_dict()``, whose keys stay TensorFlow's). A
    ``torch.nn`` batch norm's state dict loads into the layer (its keys are mapped to
    ours). ``momentum`` is not an alias: it keeps TensorFlow's meaning. torch's
    constructor arguments (``eps=``, ``affine=``, ``track_running_stats=``) raise a
    ``TypeError`` naming ours.

    Examples:
        >>> import torch, batchnorm as bn
        >>> layer = bn.BatchNorm(1, axis=-1)
        >>> x = torch.tensor([[-10.0], [0.0], [10.0]])
        >>> layer(x, training=False).flatten()   # before training: not normalized
        tensor([-9.9950,  0.0000,  9.9950], grad_fn=<ViewBackward0>)
        >>> layer(x, training=True).flatten()
        tensor([-1.2247,  0.0000,  1.2247], grad_fn=<ViewBackward0>)
        >>> layer.moving_mean, layer.moving_variance
        (tensor([0.]), tensor([1.6567]))
        >>> layer.running_var is layer.moving_variance   # torch.nn's names read ours
        True
        >>> fused = bn.BatchNorm(1, axis=-1, activation="relu")   # BatchNorm + ReLU, one layer
        >>> fused(x, training=True).flatten()
        tensor([0.0000, 0.0000, 1.2247], grad_fn=<ViewBackward0>)
    """

    _version = checkpoint.VERSION  # of the state dict's layout, saved with it
    gamma: nn.Parameter | None
    beta: nn.Parameter | None
    moving_mean: Tensor
    moving_variance: Tensor
    num_updates: Tensor
    num_skipped: Tensor

    def __new__(cls, *args: Any, **kwargs: Any) -> BatchNorm:
        if cls.__init__ is BatchNorm.__init__:
            reject_positional_options(args)
        return super().__new__(cls)

    def __init__(
        self,
        num_features: int | Sequence[int] | None = None,
        *,
        axis: int | Sequence[int] = 1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Initializer = "zeros",
        gamma_initializer: Initializer = "ones",
        moving_mean_initializer: Initializer = "zeros",
        moving_variance_initializer: Initializer = "ones",
        beta_regularizer: Regularizer | None = None,
        gamma_regularizer: Regularizer | None = None,
        beta_constraint: Constraint | None = None,
        gamma_constraint: Constraint | None = None,
        debias: bool = False,
        unbiased_moving_variance: bool | None = None,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        ghost_layout: str = "strided",
        adjustment: Adjustment | None = None,
        fused: bool | None = None,
        synchronized: bool = False,
        process_group: Any = None,
        trainable: bool = True,
        activation: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **torch_style: Any,
    ) -> None:
        if torch_style:
            reject_unknown_arguments(list(torch_style), [
                p for p in inspect.signature(BatchNorm.__init__).parameters
                if p not in ("self", "torch_style")])
        super().__init__()
        given = locals()
        config = BatchNormConfig(**{field.name: given[field.name] for field in options.OPTIONS})
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable must be a bool, got {trainable!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32) or "
                            f"None, got {dtype!r} ({type(dtype).__name__})")
        feature_shape = options.feature_shape(num_features, config.axis)
        warn_small_momentum(config.momentum)
        self._config = config
        self._axis_is_int = isinstance(axis, int)
        self._process_group = process_group
        self._trainable = trainable

        stat_dtype = statistics_dtype(dtype or torch.float32)
        lazy = feature_shape is None
        self._lazy = lazy

        def parameter(enabled: bool) -> nn.Parameter | None:
            if not enabled:
                return None
            if feature_shape is None:  # lazy (torch's stub misses its device, dtype, base)
                return UninitializedParameter(  # type: ignore[call-arg, return-value]
                    requires_grad=trainable, device=device, dtype=dtype)
            return nn.Parameter(torch.empty(feature_shape, device=device, dtype=dtype),
                                requires_grad=trainable)

        self.gamma = parameter(scale)
        self.beta = parameter(center)
        for field in state_fields(debias=debias, renorm=renorm):
            if field == "num_updates":
                value = torch.zeros((), dtype=torch.int64, device=device)
            else:  # a lazy layer's buffers are empty placeholders until _build replaces them
                value = torch.empty((0,) if feature_shape is None else feature_shape,
                                    device=device, dtype=stat_dtype)
            self.register_buffer(BUFFER_NAMES[field], value)
        # How many training batches were left out of the averages (not finite, ...): a
        # health counter, not state, so it is not saved with the state dict.
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)
        self._health = SkipWatch()
        self._plans: dict[plan.Signature, plan.CallPlan] = {}
        if not lazy:
            self.reset_parameters()

    # ------------------------------------------------------------------ torch.nn's habits

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """``nn.Module``'s, but ``layer.weight = nn.Parameter(...)`` raises (an alias's name)."""
        TorchAlias.refuse(type(self), name, param)
        super().register_parameter(name, param)

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_scripting()  # torch.jit.script calls this on every submodule before compiling

    @property
    def config(self) -> BatchNormConfig:
        """The layer's options, validated and frozen (see :meth:`reconfigure`)."""
        return self._config

    @property
    def process_group(self) -> Any:
        """The ``torch.distributed`` group ``synchronized=True`` takes statistics over (None:
        the default group)."""
        return self._process_group

    def reconfigure(self, **changes: Any) -> BatchNorm:
        """Change options after construction, validated together as at construction; return
        the layer.

        Every option but ``axis``, ``center``, ``scale``, ``debias`` and ``renorm`` (which
        decide the parameters and buffers: build a new layer) can change, and
        ``process_group`` too.
        An invalid change raises and leaves the layer as it was.

        >>> import batchnorm as bn
        >>> layer = bn.BatchNorm(4).reconfigure(momentum=0.9)
        >>> layer.momentum
        0.9
        """
        options.check_changes(changes)
        process_group = changes.pop("process_group", self._process_group)
        config = self._config.replace(**changes)
        if "momentum" in changes:
            warn_small_momentum(config.momentum)
        self._config = config
        self._process_group = process_group
        return self

    # ------------------------------------------------------------------ state

    @property
    def num_features(self) -> tuple[int, ...] | None:
        """Sizes of the feature axes, or None before a lazy layer's first call."""
        if self._lazy:
            return None
        return tuple(self.moving_mean.shape)

    def _initial_values(self, shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Every parameter's and buffer's initial value for features of ``shape``, by name."""
        config = self._config
        dtype, device = self.moving_mean.dtype, self.moving_mean.device
        mean = initializers.initial_value(config.moving_mean_initializer, shape, dtype=dtype,
                                          device=device, name="moving_mean_initializer")
        variance = initializers.initial_value(
            config.moving_variance_initializer, shape, dtype=dtype, device=device,
            name="moving_variance_initializer", nonnegative=True)
        state = F.initial_state(shape, moving_mean=mean, moving_variance=variance,
                                debias=config.debias, renorm=config.renorm, dtype=dtype,
                                device=device)
        values = {BUFFER_NAMES[field]: value for field, value in state._asdict().items()
                  if value is not None and field != "num_updates"}
        for name, init in (("gamma", config.gamma_initializer),
                           ("beta", config.beta_initializer)):
            param = getattr(self, name)
            if param is not None:
                values[name] = initializers.initial_value(
                    init, shape, dtype=param.dtype, device=param.device, name=f"{name}_initializer")
        return values

    def reset_moving_statistics(self) -> None:
        """Reset the moving averages to their initializers and the update count to 0."""
        values = self._initial_values(tuple(self.moving_mean.shape))
        with torch.no_grad():
            for name, value in values.items():
                if name not in ("gamma", "beta"):
                    getattr(self, name).copy_(value)
            self.num_updates.zero_()

    def reset_parameters(self) -> None:
        """Re-initialize ``gamma``, ``beta`` and the moving statistics from the initializers."""
        values = self._initial_values(tuple(self.moving_mean.shape))
        with torch.no_grad():
            for name, value in values.items():
                getattr(self, name).copy_(value)
            self.num_updates.zero_()

    def _build(self, feature_shape: tuple[int, ...]) -> None:
        """Materialize a lazy layer's parameters and buffers for ``feature_shape``.

        Every initial value is computed before anything changes, so a failing initializer
        leaves the layer lazy."""
        values = self._initial_values(feature_shape)
        with torch.no_grad():
            for name, value in values.items():
                tensor = getattr(self, name)
                if isinstance(tensor, UninitializedParameter):
                    tensor.materialize(feature_shape)
                    tensor.copy_(value)
                else:
                    setattr(self, name, value.clone())
        self._lazy = False

    def state(self) -> BatchNormState:
        """The layer's moving statistics as a :class:`~batchnorm.functional.BatchNormState`
        (its buffers themselves, not copies)."""
        fields = state_fields(debias=self._config.debias, renorm=self._config.renorm)
        return BatchNormState(**{field: getattr(self, BUFFER_NAMES[field]) for field in fields})

    # ------------------------------------------------------------------ trainable

    @property
    def trainable(self) -> bool:
        """False freezes the layer: inference mode always, no updates, no gamma/beta gradients."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"trainable must be a bool, got {value!r}")
        self._trainable = value
        for param in (self.gamma, self.beta):
            if param is not None:
                param.requires_grad_(value)

    # ------------------------------------------------------------------ forward

    def _resolve_training(self, training: bool | None) -> bool:
        if training is not None and not isinstance(training, bool):
            raise TypeError(f"training must be True, False or None, got {training!r}")
        if not self._trainable:
            return False
        return self.training if training is None else training

    def forward(self, x: Tensor, training: bool | None = None, mask: Tensor | None = None
                ) -> Tensor:
        """Normalize ``x``.

        ``training=None`` follows ``train()``/``eval()``; ``True``/``False`` overrides it
        for this call. A frozen layer (``trainable=False``) always runs in inference mode.
        ``mask``, a boolean tensor broadcastable over the non-feature axes, selects the
        positions the batch statistics come from (in training); every position is normalized.
        """
        training = self._resolve_training(training)
        config = self._config
        key: plan.Signature | None = None
        known: plan.CallPlan | None = None
        if not (training and (config.synchronized or recompute.in_backward()
                              or active_recorder(self) is not None
                              or (config.renorm or mask is not None)
                              and recompute.may_recompute())):
            # The checks and the kernel choice of an earlier call with this signature hold
            # while the layer's tensors and options are those they saw (see batchnorm.plan);
            # a renorm or masked call that checkpointing may redo takes the full path.
            key = plan.signature(x, training, mask)
            known = None if key is None else self._plans.get(key)
            if known is not None and not known.current(config, self._parameters, self._buffers):
                known = None
        if known is None:
            state, config = self._call_state(x, training, mask)
            if key is None:
                return self._full_path(x, state, config, training, mask)
            known = self._plan(key, x, state, config, training, mask)
        # The prepared kernel and update (applied: the kernel's answer, where it updated).
        y, stats, applied = known.run(x) if mask is None else known.run(x, mask)
        if applied is None and stats is not None:  # a skip warns at forward's caller
            self._update(stats, known.state, known.call_config, known.update, traced=False,
                         stacklevel=callsite.FROM_FORWARD + 1, recomputable=False)
        elif applied is False and stats is not None:  # a CPU loop's answer: reported at once
            self._skipped(stats, callsite.FROM_FORWARD + 1)
        return y

    def _call_state(self, x: Tensor, training: bool,
                    mask: Tensor | None) -> tuple[BatchNormState, BatchNormConfig]:
        """The state and the configuration of an unplanned call (building a lazy layer)."""
        config = self._config
        if self._lazy:
            group = plan.synchronization_group(config.synchronized, training, self._process_group)
            self._build(shapes.lazy_feature_shape(
                x, config.axis[0] if self._axis_is_int else config.axis, training=training,
                virtual_batch_size=config.virtual_batch_size, mask=mask,
                synchronized=group is not None))
        if training and isinstance(x, Tensor):  # the variance fed to moving_variance
            config = config.for_input(x.ndim, x.dtype)
        return self.state(), config

    def _full_path(self, x: Tensor, state: BatchNormState, config: BatchNormConfig,
                   training: bool, mask: Tensor | None) -> Tensor:
        """A call no plan may serve (tracing, recording, synchronized, recomputing)."""
        # Activation checkpointing runs a training call again during backward: it must not
        # update twice, and must normalize with the state the original call saw.
        recomputing = training and recompute.in_backward()
        if recomputing and (config.renorm or mask is not None):
            with torch.no_grad():  # its statistics only, keeping no tensor for backward
                _, stats = F.forward(x, state, config, training=True, gamma=self.gamma,
                                     beta=self.beta, mask=mask, process_group=self._process_group)
            assert stats is not None  # a training call's
            state = recompute.original_state(self, stats, state)
        y, stats = F.forward(x, state, config, training=training, gamma=self.gamma,
                             beta=self.beta, mask=mask, process_group=self._process_group)
        if stats is not None and not recomputing:
            recorder = active_recorder(self)
            if recorder is None:
                self._update(stats, state, config, stacklevel=callsite.FROM_FORWARD + 2,
                             recomputable=recompute.may_recompute())
            else:
                recorder.record(self, stats, config.unbiased_moving_variance)
        return y

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> BatchNorm:
        self._plans.clear()  # to(), cuda(), half(), ...: the plans would keep the old tensors
        # torch leaves Module._apply, __getstate__ and __setstate__ unannotated.
        applied: BatchNorm = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return applied

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[no-untyped-call]  # (see _apply)
        return {**state, "_plans": {}}  # plans hold closures: not pickled

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self.__dict__.setdefault("_plans", {})  # a layer pickled before plans existed

    def _plan(self, key: plan.Signature, x: Tensor, state: BatchNormState, config: BatchNormConfig,
              training: bool, mask: Tensor | None) -> plan.CallPlan:
        """Check this call (raising what the full path raises) and keep its plan; ``config`` is
        the layer's, decided for ``x`` (:meth:`BatchNormConfig.for_input`)."""
        prepared = plan.prepare(x, state, config, training=training, gamma=self.gamma,
                                beta=self.beta, mask=mask, process_group=self._process_group)
        held = [(BUFFER_NAMES[f], t) for f, t in zip(state._fields, state, strict=True)
                if t is not None]
        made = plan.CallPlan(self._config, ("gamma", "beta"), tuple(name for name, _ in held),
                             (self.gamma, self.beta, *(t for _, t in held)), x, state, prepared)
        if len(self._plans) >= plan.MAX_PLANS:
            self._plans.clear()  # atomic, unlike evicting one while another thread reads
        self._plans[key] = made
        return made

    def update_statistics(self, stats: BatchStatistics,
                          unbiased_moving_variance: bool | None = None) -> None:
        """Fold one batch's statistics into the moving averages, in place; a batch that cannot
        enter them (not finite, ...) is skipped with a ``RuntimeWarning`` saying why.

        ``unbiased_moving_variance``: which variance enters ``moving_variance``, as decided for
        the training call that computed ``stats`` (see the option of the same name); None
        takes the layer's option, and the biased variance where that is None too.

        The layer calls it after each training call (or :class:`~batchnorm.DeferredUpdates`
        does, for recorded calls; :class:`~batchnorm.Accumulation` once per step, with the
        pooled statistics of the step's micro-batches)."""
        self._update(stats, self.state(), self._config.with_variance(unbiased_moving_variance),
                     stacklevel=3)

    def _update(self, stats: BatchStatistics, state: BatchNormState,
                config: BatchNormConfig, update: PreparedUpdate | None = None,
                traced: bool | None = None, *, stacklevel: int, recomputable: bool = True) -> None:
        """Apply ``stats`` with ``config`` (the layer's, decided for the call's input), through
        ``update`` where a plan prepared it (:func:`batchnorm.statistics.prepare_update`);
        ``traced``: whether a tracer sees the call (None: find out); ``stacklevel``: see
        :func:`batchnorm.callsite.warn`; ``recomputable``: whether checkpointing may redo the
        calls (True for an update applied after their forward, which cannot know)."""
        if (config.renorm or not isinstance(stats.count, int)) and recomputable:
            recompute.remember(self, state, (stats,))  # the state enters the output
        # On CPU whether the batch entered the averages is read at once; traced (or in a
        # torch.func transform) and on an accelerator, the skips counter is written instead.
        if traced is None:
            traced = statistics.traced(stats.mean)
        host = stats.mean.device.type == "cpu" and not traced
        skipped = None if host else self.num_skipped
        applied = (update.apply(stats, skipped) if update is not None
                   else F.apply_update(state, stats, config, skipped=skipped))
        if host:
            if applied is False or (applied is not True and not applied.numpy()):
                self._skipped(stats, stacklevel + 1)  # a NumPy view of CPU memory
            return
        if traced:
            return  # traced: the counter records skips; check_health() reports them
        assert isinstance(applied, Tensor)  # a bool comes only from a loop on host memory
        self._health.watch(applied, stats)
        self._warn_skipped(self._health.skipped(), stacklevel + 1)

    def _skipped(self, stats: BatchStatistics, stacklevel: int) -> None:
        """Count and report a batch the update left out (on CPU, at once)."""
        self.num_skipped.add_(1)
        self._warn_skipped([stats], stacklevel + 1)

    def _warn_skipped(self, skipped: list[BatchStatistics], stacklevel: int) -> None:
        warn_skipped(self._get_name(), skipped,  # type: ignore[no-untyped-call]  # torch's
                     unbiased=bool(self._config.unbiased_moving_variance),
                     dtype=self.moving_mean.dtype, stacklevel=stacklevel + 1)

    def check_health(self) -> int:
        """Warn now about every skipped batch not yet reported (on an accelerator, skips are
        reported one call late, so that a training call never waits for the device), and
        return ``num_skipped``, how many batches were left out of the moving averages so far.
        Reads the device: call it outside the hot loop (:func:`batchnorm.diagnose` does).

        >>> import torch, batchnorm as bn
        >>> layer = bn.BatchNorm(2)
        >>> _ = layer(torch.randn(8, 2), training=True)
        >>> layer.check_health()
        0
        """
        self._warn_skipped(self._health.skipped(wait=True), 3)
        return int(self.num_skipped)

    # ------------------------------------------------------------------ config

    def extra_repr(self) -> str:
        shape = self.num_features
        parts = ["num_features=None" if shape is None
                 else str(shape[0] if len(shape) == 1 else shape), *options.describe(self)]
        return ", ".join(parts if self._trainable else [*parts, "trainable=False"])

    def get_config(self) -> dict[str, Any]:
        """The layer's configuration with Keras's key names (plus ours); see :meth:`from_config`.

        Names and numbers are serialized in Keras's ``{"class_name", "config"}``
        form; callables are kept as they are (such a config is not JSON).
        """
        shape = self.num_features
        return {"trainable": self._trainable, **options.to_config(self),
                "num_features": list(shape) if shape is not None else None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchNorm:
        """Build a layer from :meth:`get_config`'s output or a Keras BatchNormalization config.

        >>> import batchnorm as bn
        >>> layer = bn.BatchNorm(4, momentum=0.9)
        >>> bn.BatchNorm.from_config(layer.get_config())
        BatchNorm(4, axis=1, momentum=0.9, epsilon=0.001)
        """
        num_features, kwargs = options.from_config_arguments(config)
        try:
            return cls(num_features, **kwargs)
        except TypeError as error:
            raise ValueError(f"cannot build a BatchNorm from config {config!r}: {error}") from None


options.install(BatchNorm)  # the options' read-only properties
TorchAlias.install(BatchNorm)  # torch.nn's names: weight, bias, running_mean, ..., eps
# help() and inspect.signature() read a class's __new__ before its __init__: show __init__'s.
BatchNorm.__new__.__signature__ = inspect.signature(BatchNorm.__init__)  # type: ignore[attr-defined]
