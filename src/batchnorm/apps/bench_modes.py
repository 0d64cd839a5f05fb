"""The modes the benchmark times (``python -m batchnorm bench``): our layer's options for
each, and the callables of each phase (training forward, forward and backward, inference)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

VIRTUAL_BATCH_SIZE = 8
RENORM_CLIPPING = {"rmin": 1 / 3, "rmax": 3, "dmax": 5}


def mode_options(mode: str, shape: Sequence[int], generator) -> tuple[dict[str, Any], Any]:
    """Our layer's options for a benchmark mode on inputs of ``shape`` (features on axis 1,
    ``N, C, ...``), and the mask to call it with (None: no mask).

    The layer rows' modes (:data:`batchnorm.apps.bench.MODES`) and the per-call rows' modes
    (:data:`batchnorm.apps.bench_per_call.MODES`): ``plain``; ``renorm`` with clipping;
    ``ghost`` batches of :data:`VIRTUAL_BATCH_SIZE`; ``masked`` (7 positions in 10 kept);
    ``adjustment`` (a per-feature scale and shift); ``debias``; ``momentum=None``;
    ``unbiased`` (moving variance); ``relu`` (``activation="relu"``); ``channels-last``
    (plain; the caller lays the input out); ``axis=-1`` (features last).
    """
    import torch

    channels = shape[1]
    if mode == "masked":
        mask_shape = [s for d, s in enumerate(shape) if d != 1]
        return {}, torch.rand(mask_shape, generator=generator) < 0.7
    if mode == "adjustment":
        scale = 1 + 0.1 * torch.rand(channels, generator=generator)
        bias = 0.1 * torch.randn(channels, generator=generator)
        return {"adjustment": lambda _shape: (scale, bias)}, None
    options: dict[str, dict[str, Any]] = {
        "plain": {}, "channels-last": {},
        "renorm": {"renorm": True, "renorm_clipping": RENORM_CLIPPING},
        "ghost": {"virtual_batch_size": VIRTUAL_BATCH_SIZE},
        "debias": {"debias": True}, "momentum=None": {"momentum": None},
        "unbiased": {"unbiased_moving_variance": True}, "relu": {"activation": "relu"},
        "axis=-1": {"axis": -1}}
    if mode not in options:
        raise ValueError(f"benchmark mode {mode!r} is not one of "
                         f"{[*options, 'masked', 'adjustment']}: pick one of those")
    return options[mode], None


def phase_fns(x, dy, train_fns: dict[str, Callable], infer_fns: dict[str, Callable],
              params: Sequence, inputs: dict[str, tuple[Any, Any]] | None = None,
              ) -> dict[str, dict[str, Callable[[], object]]]:
    """Per phase, the callables to time: ``forward`` (``fn(x)`` of each ``train_fns``),
    ``forward+backward`` (``fn(x).backward(dy)``, every gradient of ``x`` and ``params``
    cleared first) and ``inference`` (each ``infer_fns`` under ``torch.no_grad``).
    ``inputs``: a contender's own ``(x, dy)``, in place of ``x`` and ``dy``."""
    import torch

    inputs = inputs or {}

    def forward(name, fn):
        t = inputs.get(name, (x, dy))[0]
        return lambda: fn(t)

    def forward_backward(name, fn):
        t, grad = inputs.get(name, (x, dy))
        tg = t.detach().clone().requires_grad_()

        def run():
            tg.grad = None
            for p in params:
                p.grad = None
            fn(tg).backward(grad)
        return run

    def inference(name, fn):
        t = inputs.get(name, (x, dy))[0]

        def run():
            with torch.no_grad():
                fn(t)
        return run

    return {"forward": {k: forward(k, f) for k, f in train_fns.items()},
            "forward+backward": {k: forward_backward(k, f) for k, f in train_fns.items()},
            "inference": {k: inference(k, f) for k, f in infer_fns.items()}}
