"""Specification of the Lightning integration (``batchnorm.integrations.lightning``): the
``SyncBatchNorm`` layer-sync plugin and the ``AccumulateStatistics`` callback.

The two-process run (``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` on gloo, the
processes started by the test as a launcher would, ``accumulate_grad_batches=4``) must leave
every rank with one update per optimizer step and the moving statistics of one process's run
on the concatenated global batch (``integration_steps``: 1e-12 in float64).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
from torchvision_import import importable_torchvision

import batchnorm as bn

# PyTorch Lightning imports torchvision where it is installed: first through the workaround
# for a CPU torch whose torchvision operators do not load (also in each spawned process,
# which imports this module to find its worker).
importable_torchvision()
pl = pytest.importorskip("pytorch_lightning")

from integration_steps import (  # noqa: E402
    FEATURES,
    LAYER,
    MICRO,
    STEPS,
    WORLD,
    check_against_reference,
    rank_batches,
    reference,
)
from test_distributed import end_worker, free_port, spawn_workers  # noqa: E402

from batchnorm.integrations.lightning import AccumulateStatistics, SyncBatchNorm  # noqa: E402


class Module(pl.LightningModule):
    """A bn.BatchNorm first layer (or torch's, ``torch_layer=True``) and a linear head."""

    def __init__(self, torch_layer: bool = False) -> None:
        super().__init__()
        norm = (torch.nn.BatchNorm1d(FEATURES) if torch_layer
                else bn.BatchNorm(FEATURES, **LAYER))
        self.net = torch.nn.Sequential(norm, torch.nn.Linear(FEATURES, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**options) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=STEPS, accumulate_grad_batches=MICRO,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, **options)


def _fit(module: Module, batches: list[torch.Tensor], **options) -> None:
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    _trainer(**options).fit(module, loader)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    try:
        module = Module()
        _fit(module, rank_batches(rank, torch.float64), strategy="ddp", devices=WORLD,
             precision="64-true", plugins=[SyncBatchNorm()], callbacks=[AccumulateStatistics()])
        result = {"state": module.net[0].state_dict()}
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    end_worker(group_usable=torch.distributed.is_initialized())


@pytest.mark.slow
def test_ddp_trainer_with_plugin_and_callback_updates_once_per_step_with_global_statistics(
        tmp_path):
    results, problem = spawn_workers(_worker, (free_port(), str(tmp_path)), WORLD, tmp_path, 120)
    expected = reference(torch.float64)
    for rank, result in enumerate(results):
        assert result and "error" not in result, result.get("error", problem)
        check_against_reference(result["state"], expected, torch.float64, f"rank {rank}")


@pytest.mark.slow  # a Trainer's fit: ~2 s
# Lightning 2.6's own internals on torch 2.13
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_callback_updates_once_per_optimizer_step_with_the_pooled_micro_batches():
    module = Module()
    _fit(module, rank_batches(0) + rank_batches(1), devices=1,
         callbacks=[AccumulateStatistics()])
    # One process: its micro-batches are rank 0's then rank 1's slices, so its first steps
    # see other batches than the reference's; compare with bn.accumulate on the same ones.
    expected = bn.BatchNorm(FEATURES, **LAYER)
    batches = rank_batches(0) + rank_batches(1)
    for step in range(STEPS):
        with bn.accumulate(expected):
            for x in batches[step * MICRO:(step + 1) * MICRO]:
                expected(x, training=True)
    state = module.net[0].state_dict()
    assert state["num_updates"].item() == STEPS
    for name in ("moving_mean", "moving_variance"):  # the same float32 arithmetic: 1e-6
        torch.testing.assert_close(state[name], expected.state_dict()[name],
                                   rtol=1e-6, atol=1e-6)


def test_plugin_synchronizes_the_layers_and_reverts_them():
    model = torch.nn.Sequential(bn.BatchNorm(FEATURES))
    plugin = SyncBatchNorm()
    assert plugin.apply(model)[0].synchronized
    assert not plugin.revert(model)[0].synchronized


def test_plugin_with_convert_turns_torch_batch_norms_into_synchronized_layers():
    model = SyncBatchNorm(convert=True).apply(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    assert isinstance(model[0], bn.BatchNorm) and model[0].synchronized


def test_plugin_without_convert_refuses_torch_batch_norms():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="torch.nn batch norms"):
        SyncBatchNorm().apply(model)
    assert type(model[0]) is torch.nn.BatchNorm1d


def test_plugin_is_accepted_beside_sync_batchnorm_true():
    trainer = _trainer(devices=1, sync_batchnorm=True, plugins=[SyncBatchNorm()])
    assert isinstance(trainer._accelerator_connector._layer_sync, SyncBatchNorm)


@pytest.fixture
def one_process_group():
    """For a one-process "ddp" Trainer: the process group it starts (and Lightning leaves
    behind when setup raises) is destroyed, and the environment restored, afterwards."""
    environ = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.usefixtures("one_process_group")
def test_sync_batchnorm_true_without_the_plugin_is_refused_naming_it():
    module = Module()
    with pytest.raises(ValueError, match=r"plugins=\[batchnorm.integrations.lightning"):
        _fit(module, rank_batches(0), devices=1, strategy="ddp", sync_batchnorm=True,
             callbacks=[AccumulateStatistics()])
    assert module.net[0].num_updates.item() == 0
