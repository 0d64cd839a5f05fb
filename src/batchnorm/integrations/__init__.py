"""The training engines users already run, taught about :class:`~batchnorm.BatchNorm`.

One module per engine, each an optional extra; importing this package imports none of them,
and a module whose engine is missing raises ``ImportError`` naming the extra to install:

- :mod:`batchnorm.integrations.lightning` (``pip install "batchnorm[lightning]"``): the
  ``SyncBatchNorm`` layer-sync plugin for ``Trainer(strategy="ddp", ...)`` and the
  ``AccumulateStatistics`` callback for ``accumulate_grad_batches=k``;
- :mod:`batchnorm.integrations.accelerate` (``pip install "batchnorm[accelerate]"``):
  ``AccumulateStatistics`` for ``with accelerator.accumulate(model):``.

FSDP2 (``torch.distributed.fsdp.fully_shard``) needs no integration: ``bn.BatchNorm`` layers
train inside its units, with float32 statistics under a bfloat16 ``MixedPrecisionPolicy``.
``docs/scaling-out.md`` shows each engine's lines and what every rank ends with.
"""

__all__: list[str] = []
