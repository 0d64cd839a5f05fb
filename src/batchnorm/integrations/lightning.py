"""PyTorch Lightning: synchronized statistics for ``Trainer(strategy="ddp", ...)`` and one
moving-average update per optimizer step with ``accumulate_grad_batches=k``.

``Trainer(sync_batchnorm=True)`` alone converts torch.nn batch norms to
``torch.nn.SyncBatchNorm`` and leaves :class:`~batchnorm.BatchNorm` layers unsynchronized;
give the Trainer the :class:`SyncBatchNorm` plugin instead (with ``sync_batchnorm=True`` or
without), and the :class:`AccumulateStatistics` callback, which also refuses a
``sync_batchnorm=True`` that would leave :class:`~batchnorm.BatchNorm` layers unsynchronized::

    trainer = Trainer(strategy="ddp", accumulate_grad_batches=4,
                      plugins=[SyncBatchNorm()], callbacks=[AccumulateStatistics()])

Needs the ``lightning`` extra: ``pip install "batchnorm[lightning]"``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import BatchNorm, convert, convert_sync
from ._steps import OptimizerStep

try:
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
except ImportError:
    try:
        # The same classes under the package's newer name.
        import lightning.pytorch as pl  # type: ignore[no-redef]
        from lightning.pytorch.plugins.layer_sync import (  # type: ignore[no-redef]
            TorchSyncBatchNorm,
        )
    except ImportError as error:
        raise ImportError(
            "batchnorm.integrations.lightning needs PyTorch Lightning, which is not installed: "
            'pip install "batchnorm[lightning]"') from error

__all__ = ["AccumulateStatistics", "SyncBatchNorm"]


class SyncBatchNorm(TorchSyncBatchNorm):
    """A Lightning layer-sync plugin: the Trainer's model gets synchronized statistics
    (:func:`batchnorm.convert_sync`) when it is set up for fitting, and local ones again after.

    Args:
        convert: first turn the model's torch.nn batch norms into
            :class:`~batchnorm.BatchNorm` layers (:func:`batchnorm.convert`); without it a model
            holding torch.nn batch norms is refused with a ``ValueError``.
        process_group: the group synchronized over (None: the default group).

    Lightning takes it with or without ``sync_batchnorm=True``:

    >>> import torch, batchnorm as bn
    >>> from batchnorm.integrations.lightning import SyncBatchNorm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> SyncBatchNorm(convert=True).apply(model)[1].synchronized
    True
    """

    def __init__(self, convert: bool = False, process_group: Any = None) -> None:
        if not isinstance(convert, bool):
            raise TypeError(f"SyncBatchNorm(convert=...) takes a bool, got {convert!r}")
        self.convert = convert
        self.process_group = process_group

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with every :class:`~batchnorm.BatchNorm` layer synchronized."""
        return convert_sync(convert(model) if self.convert else model, self.process_group)

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with local statistics again (the converted layers stay bn.BatchNorm)."""
        return convert_sync(model, enabled=False)


class AccumulateStatistics(pl.Callback):
    """A Lightning callback: with ``Trainer(accumulate_grad_batches=k)``, each
    :class:`~batchnorm.BatchNorm` layer moves its averages once per optimizer step, with the
    pooled statistics of the step's ``k`` micro-batches (:func:`batchnorm.accumulate`), instead
    of once per micro-batch. A step that raises changes no average.

    At setup it refuses (``ValueError``) a ``Trainer(sync_batchnorm=True)`` without the
    :class:`SyncBatchNorm` plugin on a model holding :class:`~batchnorm.BatchNorm` layers:
    Lightning's own plugin would leave them unsynchronized.

    >>> from batchnorm.integrations.lightning import AccumulateStatistics
    >>> callbacks = [AccumulateStatistics()]   # Trainer(..., callbacks=callbacks)
    """

    def __init__(self) -> None:
        self._step = OptimizerStep()
        self._global_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        layer_sync = getattr(trainer.strategy, "_layer_sync", None)
        ours = [name or "(root)" for name, m in pl_module.named_modules()
                if isinstance(m, BatchNorm)]
        if type(layer_sync) is TorchSyncBatchNorm and ours:
            raise ValueError(
                f"Trainer(sync_batchnorm=True) synchronizes torch.nn batch norms only, and would "
                f"leave the bn.BatchNorm layer(s) {', '.join(ours[:3])}"
                f"{', ...' if len(ours) > 3 else ''} unsynchronized; pass the plugin instead: "
                "Trainer(plugins=[batchnorm.integrations.lightning.SyncBatchNorm()])")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if not self._step.open:
            self._global_step = trainer.global_step
        self._step.begin(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._global_step:  # the optimizer stepped
            self._step.end()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._step.end(exception)
