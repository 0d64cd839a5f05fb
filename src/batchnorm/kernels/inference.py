"""Inference: one elementwise pass, ``y = x * inv + shift`` per feature, for every caller.

:func:`normalize` is ``tf.nn.batch_normalization`` (statistics that broadcast
against ``x``); :func:`infer` normalizes with a state's moving averages (the
layer's and :func:`batchnorm.functional.batch_norm`'s inference mode); the
composite training kernel's output pass is :func:`normalize` too. All of them
end in :func:`normalize_features`, which picks the pass:

- ATen's batch-norm inference kernel, when the statistics are per feature along
  one axis, in the input's statistics dtype, and carry no gradient (it computes
  ``alpha = scale / sqrt(variance + eps)``, ``beta = offset - mean * alpha``,
  ``y = x * alpha + beta``: TensorFlow's order);
- else without autograd the device's inference pass, where it has one (the CPU's numba
  loop, found in :data:`batchnorm.kernels.protocol.INFERENCE_PASSES`);
- else ``addcmul``.

With an ``activation`` (the layer's ``activation=``) the device's pass writes
``act(x * inv + shift)`` in the same single pass, whenever it applies (it is tried
first); elsewhere the activation is applied in place to the fresh output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..activations import apply as activate
from ..shapes import broadcast, resolve_axes
from ..state import BatchNormState, statistics_dtype
from ..statistics import affine_terms, inference_statistics, traced
from .native import aten_input, gradient_read_right, misreads_gradients
from .protocol import INFERENCE_PASSES, InferencePass, KernelCall

__all__ = ["infer", "normalize", "normalize_features", "prepare_inference"]


def normalize(
    x: Tensor,
    mean: Tensor,
    variance: Tensor,
    offset: Tensor | None,
    scale: Tensor | None,
    epsilon: float,
    *,
    axis: int | Sequence[int] | None = None,
) -> Tensor:
    """``scale * (x - mean) / sqrt(variance + epsilon) + offset``, as ``tf.nn.batch_normalization``.

    ``mean``, ``variance``, ``offset`` and ``scale`` broadcast against ``x``
    (as TensorFlow's do), or with ``axis`` are feature-shaped: the sizes of ``x``
    along ``axis``, what ``moments(x, axes)`` returns without ``keepdims``;
    ``offset``/``scale`` may be None. Computed as ``x * inv + (offset - mean * inv)``
    with ``inv = scale * rsqrt(variance + epsilon)``, the way TensorFlow does,
    in the statistics' precision; the result has ``x``'s dtype, in one pass
    over ``x`` (see the module's docstring for which).

    Args:
        x: the input.
        mean, variance: statistics that broadcast against ``x`` (e.g. from
            ``moments(x, axes, keepdims=True)``), or feature-shaped with ``axis``.
        offset, scale: ``beta`` and ``gamma``, shaped likewise, or None.
        epsilon: added to the variance.
        axis: None for statistics that broadcast; else the feature axis or axes of
            ``x`` (negative allowed) that feature-shaped statistics run along.

    Returns:
        The normalized tensor, ``x``'s dtype and shape.

    Raises:
        ValueError: statistics that do not broadcast against ``x`` (without ``axis``),
            or are not feature-shaped (with ``axis``); an axis out of range.

    >>> normalize(torch.tensor([-10.0, 0.0, 10.0]), torch.tensor(0.0), torch.tensor(66.6667),
    ...           None, None, 1e-3)
    tensor([-1.2247,  0.0000,  1.2247])
    >>> from batchnorm.functional import moments
    >>> x = torch.tensor([[[-1.0], [5.0]], [[1.0], [7.0]]])      # (N, C, L) = (2, 2, 1)
    >>> mean, variance = moments(x, axes=[0, 2])                 # shape (2,): per channel
    >>> normalize(x, mean, variance, None, None, 1e-3, axis=1).flatten()
    tensor([-0.9995, -0.9995,  0.9995,  0.9995])
    """
    if axis is not None:
        axes = resolve_axes(axis, x.ndim)
        _check_feature_shaped(x, axes, mean=mean, variance=variance, offset=offset, scale=scale)
        return normalize_features(x, axes, mean, variance, offset, scale, epsilon)
    feature = _feature_axis(x, mean, variance, offset, scale)
    if feature is not None:
        offset, scale = (None if t is None else t.reshape(-1) for t in (offset, scale))
        return normalize_features(x, (feature,), mean.reshape(-1), variance.reshape(-1), offset,
                                  scale, epsilon)
    try:
        return _affine(x, mean, variance, offset, scale, epsilon)
    except RuntimeError:
        _check_broadcast(x, mean=mean, variance=variance, offset=offset, scale=scale)
        raise


def infer(x: Tensor, state: BatchNormState, call: KernelCall) -> Tensor:
    """Normalize ``x`` with ``state``'s moving averages (debiased if the configuration says
    so): :func:`prepare_inference`'s call, prepared for this one input."""
    return prepare_inference(x, state, call)(x)


def prepare_inference(x: Tensor, state: BatchNormState,
                      call: KernelCall) -> Callable[[Tensor], Tensor]:
    """The inference call for inputs of ``x``'s signature (shape, strides, dtype, device,
    ``requires_grad``, grad mode) with ``state``'s and ``call``'s tensors, with what does
    not depend on the values decided once: ``run(x) -> y``.

    Where the call ends in ATen's kernel with the state's own statistics (one feature axis,
    moved to dimension 1 by a view where it is elsewhere; the statistics dtype throughout;
    statistics without a gradient; no device pass for the activation), ``run`` calls it
    directly, with ``debias`` after the device's loop for the debiased averages
    (:meth:`~batchnorm.kernels.protocol.InferencePass.debiased`, where it has one); else it
    takes
    :func:`normalize_features`' choice per call. Where autograd records the call (an input,
    gamma or beta that needs a gradient), ``run`` gives ATen's kernel fresh copies of the
    statistics (ATen keeps them for backward: writing the buffers before backward, as DDP's
    ``broadcast_buffers``, an EMA or a training call do, then neither fails nor changes the
    gradient) and the input as its backward reads it right (:func:`aten_input`,
    :func:`gradient_read_right`, decided here from the signature's strides).
    """
    config = call.config
    gamma, beta, epsilon, activation = call.gamma, call.beta, config.epsilon, config.activation
    mean, variance = state.moving_mean, state.moving_variance
    dtype = statistics_dtype(x.dtype)
    recorded = torch.is_grad_enabled()
    differentiable = recorded and _differentiable(x, call)
    debiased = None
    if config.debias and config.momentum is not None:
        # A tracer (torch.compile, torch.func) must see torch operations: the full path.
        device = None if traced(x) else INFERENCE_PASSES.get(x.device.type)
        debiased = None if device is None else device.debiased(state, config.momentum,
                                                                fresh=differentiable)
        if debiased is None:
            return lambda x: _infer(x, state, call)
    if (len(call.axes) != 1 or x.ndim < 2
            or mean.dtype != dtype or variance.dtype != dtype
            or any(t is not None and t.dtype != dtype for t in (gamma, beta))
            or (recorded and (mean.requires_grad or variance.requires_grad))
            or (activation is not None and _activation_pass(x) is not None)):
        return lambda x: _infer(x, state, call)
    cuda = x.device.type == "cuda"  # cuDNN's flag matters to CUDA tensors only
    (axis,) = call.axes
    # Where no gradient flows through it: no copies, no copy for ATen's backward
    # (aten_input), no hook on its gradient (gradient_read_right).
    xm = x if axis == 1 else x.movedim(axis, 1)
    contiguous = differentiable and aten_input(xm, gamma, beta) is not xm
    hook = differentiable and misreads_gradients(xm.contiguous() if contiguous else xm)
    copies = differentiable and debiased is None

    def aten(x: Tensor) -> Tensor:  # _aten's call (conditions checked above), _activated's
        xm = x if axis == 1 else x.movedim(axis, 1)
        if debiased is not None:
            m, v = debiased()
        elif copies:  # kept for backward (one stacked copy costs more: ATen saves views of it)
            m, v = mean.clone(), variance.clone()
        else:
            m, v = mean, variance
        y = torch.batch_norm(xm.contiguous() if contiguous else xm, gamma, beta, m, v, False,
                             0.0, epsilon, cuda and torch.backends.cudnn.enabled)
        if hook:
            y = gradient_read_right(y)
        y = y if axis == 1 else y.movedim(1, axis)
        return y if activation is None else activate(y, activation, inplace=True)
    return aten


def _infer(x: Tensor, state: BatchNormState, call: KernelCall) -> Tensor:
    config = call.config
    mean, variance = inference_statistics(state, momentum=config.momentum,
                                          epsilon=config.epsilon, debias=config.debias)
    if torch.is_grad_enabled() and mean is state.moving_mean and _differentiable(x, call):
        # ATen's kernel keeps the statistics it is given for backward: give it copies, so
        # that writing the buffers before backward (DDP's broadcast_buffers, an EMA, a
        # second training call) cannot fail or change the gradient.
        mean, variance = mean.clone(), variance.clone()
    return normalize_features(x, call.axes, mean, variance, call.beta, call.gamma,
                              config.epsilon, config.activation)


def _differentiable(x: Tensor, call: KernelCall) -> bool:
    return x.requires_grad or any(t is not None and t.requires_grad
                                  for t in (call.gamma, call.beta))


def normalize_features(x: Tensor, axes: tuple[int, ...], mean: Tensor, variance: Tensor,
                       offset: Tensor | None, scale: Tensor | None, epsilon: float,
                       activation: str | None = None) -> Tensor:
    """:func:`normalize` with feature-shaped statistics (the sizes of ``x`` along ``axes``),
    followed by ``activation`` (a name of :data:`batchnorm.activations.ACTIVATIONS`) if any."""
    if activation is not None:
        return _activated(x, axes, mean, variance, offset, scale, epsilon, activation)
    if len(axes) == 1:
        y = _aten(x, axes[0], mean, variance, offset, scale, epsilon)
        if y is not None:
            return y
    return _affine(x, broadcast(mean, x, axes), broadcast(variance, x, axes),
                   broadcast(offset, x, axes), broadcast(scale, x, axes), epsilon)


def _activated(x: Tensor, axes: tuple[int, ...], mean: Tensor, variance: Tensor,
               offset: Tensor | None, scale: Tensor | None, epsilon: float,
               activation: str) -> Tensor:
    """``act(normalize(x))``: the device's single pass where it applies, else the
    normalization's pass and the activation in place on its fresh output."""
    device = _activation_pass(x)
    if (device is not None
            and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, mean, variance, offset, scale)))):
        inv, shift = affine_terms(broadcast(mean, x, axes),
                                  torch.rsqrt(broadcast(variance, x, axes) + epsilon),
                                  broadcast(scale, x, axes), broadcast(offset, x, axes))
        y = device.affine(x, inv, shift, activation)
        if y is not None:
            return y
    return activate(normalize_features(x, axes, mean, variance, offset, scale, epsilon),
                    activation, inplace=True)


def _activation_pass(x: Tensor) -> InferencePass | None:
    """The inference pass of ``x``'s device where it applies an activation faster than the
    normalization and the activation in place (sizes), else None."""
    device = INFERENCE_PASSES.get(x.device.type)
    return device if device is not None and device.fuses_activation(x) else None


def _feature_axis(x: Tensor, mean: Tensor, variance: Tensor, offset: Tensor | None,
                  scale: Tensor | None) -> int | None:
    """The one axis broadcast statistics vary along, when they are per feature of ``x``
    along it (every other size 1), else None."""
    if x.ndim < 2 or mean.ndim != x.ndim or variance.shape != mean.shape:
        return None
    axes = [d for d in range(x.ndim) if mean.shape[d] != 1]
    if len(axes) != 1 or any(t is not None and t.shape != mean.shape for t in (offset, scale)):
        return None
    return axes[0] if mean.shape[axes[0]] == x.shape[axes[0]] else None


def _check_feature_shaped(x: Tensor, axes: tuple[int, ...], **tensors: Tensor | None) -> None:
    features = tuple(x.shape[a] for a in axes)
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != features:
            raise ValueError(
                f"normalize: {name} has shape {tuple(t.shape)}, but with axis={axes} the "
                f"statistics must be feature-shaped, {features} (the sizes of x "
                f"{tuple(x.shape)} along axis); pass statistics from moments(x, axes) over the "
                "other axes, or axis=None with statistics that broadcast against x")


def _check_broadcast(x: Tensor, **tensors: Tensor | None) -> None:
    """Raise a ``ValueError`` saying what to do when the statistics do not broadcast."""
    for name, t in tensors.items():
        if t is None:
            continue
        try:
            torch.broadcast_shapes(tuple(t.shape), tuple(x.shape))
        except RuntimeError:
            axis = "the feature axis"
            if t.ndim == 1 and t.shape[0] in x.shape:
                axis = str(list(x.shape).index(t.shape[0]))
            raise ValueError(
                f"normalize: {name} of shape {tuple(t.shape)} does not broadcast against x of "
                f"shape {tuple(x.shape)}: for per-feature statistics (what moments(x, axes) "
                f"returns without keepdims) pass axis={axis}, or compute them with "
                "moments(x, axes, keepdims=True)") from None


def _affine(x: Tensor, mean: Tensor, variance: Tensor, offset: Tensor | None,
            scale: Tensor | None, epsilon: float) -> Tensor:
    """Broadcast statistics: the device's inference pass, else ``addcmul``."""
    inv, shift = affine_terms(mean, torch.rsqrt(variance + epsilon), scale, offset)
    device = INFERENCE_PASSES.get(x.device.type)
    y = None if device is None else device.affine(x, inv, shift)
    if y is None:
        y = torch.addcmul(shift, x, inv)
    return y.to(x.dtype)


def _aten(x: Tensor, axis: int, mean: Tensor, variance: Tensor, offset: Tensor | None,
          scale: Tensor | None, epsilon: float) -> Tensor | None:
    """1-D per-feature statistics along ``axis`` by ATen's inference kernel, or None where it
    does not apply (statistics that need a gradient, or not in the input's statistics dtype)."""
    dtype = mean.dtype
    if variance.dtype != dtype or dtype != statistics_dtype(x.dtype) or x.ndim < 2:
        return None
    if torch.is_grad_enabled() and (mean.requires_grad or variance.requires_grad):
        return None
    if scale is not None and scale.dtype != dtype:
        scale = scale.to(dtype)
    if offset is not None and offset.dtype != dtype:
        offset = offset.to(dtype)
    xm = aten_input(x if axis == 1 else x.movedim(axis, 1), scale, offset)
    y = torch.batch_norm(xm, scale, offset, mean, variance, False, 0.0, epsilon,
                         torch.backends.cudnn.enabled)
    if y.requires_grad and misreads_gradients(xm):
        y = gradient_read_right(y)
    return y if axis == 1 else y.movedim(1, axis)
