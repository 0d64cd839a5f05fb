"""Watch batch statistics next to the moving averages during training (a BNMonitor callback)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import BatchNorm
from ._model import batch_norm_layers, layer_moments, parse_call

__all__ = ["Monitor", "Record"]

_SCALARS = ("batch_mean", "batch_variance", "moving_mean", "moving_variance")


@dataclass
class Record:
    """One layer's statistics at one training step.

    The four numbers are averages over the features: the batch's mean and
    (biased) variance of the layer input, next to ``moving_mean`` and
    ``moving_variance`` as they are right after the call (updated, unless the
    update was deferred). ``vectors`` holds the full per-feature tensors (CPU,
    float32) under the same four names when the monitor was made with ``full=True``.
    """

    step: int
    batch_mean: float
    batch_variance: float
    moving_mean: float
    moving_variance: float
    vectors: dict[str, Tensor] | None = None


class Monitor:
    """Record every :class:`~batchnorm.BatchNorm`'s batch statistics next to its moving averages.

    Recording is automatic: a hook on each layer takes a :class:`Record` for
    every call in which the layer computes batch statistics (training mode; a
    frozen layer or an inference call records nothing). ``Record.step`` is the
    index of the model's forward call since the monitor was attached (0, 1, ...),
    so one training step is one step; with ``every=k`` only steps divisible by
    ``k`` are recorded. With ghost batches or a mask, the batch statistics are
    those of all the (selected) values of the batch.

    ``monitor.history`` maps each layer's name (as in ``model.named_modules()``)
    to its list of records, in call order. ``print(monitor)`` shows the latest
    record of every layer (what the Keras ``BNMonitor`` callback printed at the
    end of each epoch).

    Args:
        model: the module to watch (its BatchNorm layers are found now).
        full: also keep the per-feature vectors (``Record.vectors``).
        every: record one step in ``every``.
        log_dir: also write every record to TensorBoard there as it is taken
            (needs the ``tensorboard`` package).

    Use it as a context manager, or call :meth:`close` to remove the hooks.

    Examples:
        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), bn.BatchNorm(8))
        >>> with bn.Monitor(model) as monitor:
        ...     for _ in range(3):
        ...         loss = model(torch.randn(32, 4)).square().mean()
        >>> [r.step for r in monitor.history["1"]]
        [0, 1, 2]
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        full: bool = False,
        every: int = 1,
        log_dir: str | Path | None = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.model = model
        self.full = full
        self.every = every
        self.layers = batch_norm_layers(model)
        if not self.layers:
            raise ValueError("the model contains no batchnorm.BatchNorm layer to monitor")
        self.history: dict[str, list[Record]] = {name: [] for name in self.layers}
        self._step = -1
        self._writer = _summary_writer(log_dir) if log_dir is not None else None
        self._handles = [model.register_forward_pre_hook(self._count_step)]
        self._handles += [layer.register_forward_hook(self._hook(name), with_kwargs=True)
                          for name, layer in self.layers.items()]

    # ------------------------------------------------------------------ recording

    @property
    def steps(self) -> int:
        """How many forward calls of the model the monitor has seen."""
        return self._step + 1

    def _count_step(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._step += 1

    def _hook(self, name: str
              ) -> Callable[[BatchNorm, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(layer: BatchNorm, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
            x, computes, mask = parse_call(layer, args, kwargs)
            step = max(self._step, 0)
            if not computes or step % self.every:
                return
            with torch.no_grad():
                count, mean, m2 = layer_moments(layer, x, mask)
                values = {
                    "batch_mean": mean, "batch_variance": m2 / count.clamp_min(1),
                    "moving_mean": layer.moving_mean, "moving_variance": layer.moving_variance,
                }
                scalars = {key: float(value.mean()) for key, value in values.items()}
                vectors = ({key: value.detach().float().cpu().clone()
                            for key, value in values.items()} if self.full else None)
            record = Record(step, **scalars, vectors=vectors)
            self.history[name].append(record)
            if self._writer is not None:
                _write_record(self._writer, name, record)
        return hook

    # ------------------------------------------------------------------ output

    def to_tensorboard(self, log_dir: str | Path) -> None:
        """Write the whole history as TensorBoard scalars under ``log_dir``.

        Tags are ``batchnorm/<layer>/<batch_mean|batch_variance|moving_mean|
        moving_variance>``, at ``Record.step``. Needs the ``tensorboard`` package.

        >>> monitor.to_tensorboard("runs/bn")            # doctest: +SKIP
        """
        writer = _summary_writer(log_dir)
        try:
            for name, records in self.history.items():
                for record in records:
                    _write_record(writer, name, record)
        finally:
            writer.close()

    def plot(self, path: str | Path) -> Path:
        """Draw the history to a PNG at ``path`` (needs matplotlib); return the path.

        Two panels, mean and variance (each averaged over the features) against
        the step: per layer, the batch statistic (thin) and the moving average (thick).

        >>> monitor.plot("bn_statistics.png")            # doctest: +SKIP
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "Monitor.plot needs matplotlib: pip install matplotlib "
                "(or pip install 'batchnorm[tools]')") from error
        figure = Figure(figsize=(8, 6), layout="constrained")
        FigureCanvasAgg(figure)  # no pyplot: no global state, no display needed
        axes = figure.subplots(2, 1, sharex=True)
        for i, (name, records) in enumerate(self.history.items()):
            color = f"C{i % 10}"
            steps = [r.step for r in records]
            for ax, what in zip(axes, ("mean", "variance"), strict=True):
                ax.plot(steps, [getattr(r, f"batch_{what}") for r in records], color=color,
                        linewidth=0.8, alpha=0.5)
                ax.plot(steps, [getattr(r, f"moving_{what}") for r in records], color=color,
                        linewidth=2, label=name or "(model)")
        for ax, what in zip(axes, ("mean", "variance"), strict=True):
            ax.set_ylabel(f"{what} (average over features)")
            ax.grid(alpha=0.3)
        axes[0].set_title("batch statistics (thin) and moving averages (thick)")
        axes[0].legend(fontsize="small")
        axes[1].set_xlabel("step")
        path = Path(path)
        figure.savefig(path, format="png", dpi=100)
        return path

    def __str__(self) -> str:
        header = (f"{'layer':<24} {'step':>6} {'batch mean':>11} {'moving mean':>12} "
                  f"{'batch var':>10} {'moving var':>11}")
        lines = [header, "-" * len(header)]
        for name, records in self.history.items():
            if not records:
                lines.append(f"{name or '(model)':<24} {'-':>6}  (no training-mode call yet)")
                continue
            r = records[-1]
            lines.append(f"{name or '(model)':<24} {r.step:>6} {r.batch_mean:>11.4f} "
                         f"{r.moving_mean:>12.4f} {r.batch_variance:>10.4f} "
                         f"{r.moving_variance:>11.4f}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Remove the hooks (and close the TensorBoard writer); the history stays. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary_writer(log_dir: str | Path) -> Any:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard's own message is vaguer)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "Monitor's TensorBoard logging needs the tensorboard package: "
            "pip install tensorboard") from error
    return SummaryWriter(log_dir=str(log_dir))


def _write_record(writer: Any, name: str, record: Record) -> None:
    for key in _SCALARS:
        writer.add_scalar(f"batchnorm/{name or 'model'}/{key}", getattr(record, key), record.step)
