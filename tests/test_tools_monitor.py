"""bn.Monitor: batch statistics next to moving averages, per layer and step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import batchnorm as bn

pytestmark = pytest.mark.usefixtures("one_thread")


def model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4, bias=False), bn.BatchNorm(4), nn.ReLU(),
                         bn.BatchNorm(4, axis=-1))


def batches(n: int) -> list[torch.Tensor]:
    return [torch.randn(16, 3) * 2 + 1 for _ in range(n)]


def test_records_one_entry_per_layer_and_training_step() -> None:
    net = model().train()
    with bn.Monitor(net) as monitor:
        for x in batches(3):
            net(x)
    assert list(monitor.history) == ["1", "3"]
    assert [r.step for r in monitor.history["1"]] == [0, 1, 2]
    assert [r.step for r in monitor.history["3"]] == [0, 1, 2]


def test_batch_statistics_are_those_of_the_layer_input() -> None:
    net = model().train()
    x = batches(1)[0]
    with bn.Monitor(net) as monitor:
        net(x)
    h = net[0](x).detach().double()
    record = monitor.history["1"][0]
    assert record.batch_mean == pytest.approx(float(h.mean(0).mean()), rel=1e-6)
    assert record.batch_variance == pytest.approx(float(h.var(0, unbiased=False).mean()), rel=1e-6)


def test_moving_averages_are_recorded_after_the_update() -> None:
    net = model().train()
    with bn.Monitor(net) as monitor:
        for x in batches(2):
            net(x)
    last = monitor.history["1"][-1]
    assert last.moving_mean == pytest.approx(float(net[1].moving_mean.mean()))
    assert last.moving_variance == pytest.approx(float(net[1].moving_variance.mean()))
    assert monitor.history["1"][0].moving_variance != last.moving_variance


def test_inference_calls_record_nothing_but_count_as_steps() -> None:
    net = model()
    with bn.Monitor(net) as monitor:
        net.eval()
        net(batches(1)[0])
        net.train()
        net(batches(1)[0])
    assert [r.step for r in monitor.history["1"]] == [1]
    assert monitor.steps == 2


def test_full_keeps_the_per_feature_vectors() -> None:
    net = model().train()
    with bn.Monitor(net, full=True) as monitor:
        net(batches(1)[0])
    vectors = monitor.history["3"][0].vectors
    assert set(vectors) == {"batch_mean", "batch_variance", "moving_mean", "moving_variance"}
    assert torch.equal(vectors["moving_mean"], net[3].moving_mean)


def test_every_k_records_one_step_in_k() -> None:
    net = model().train()
    with bn.Monitor(net, every=2) as monitor:
        for x in batches(5):
            net(x)
    assert [r.step for r in monitor.history["1"]] == [0, 2, 4]


def test_close_removes_every_hook() -> None:
    net = model().train()
    monitor = bn.Monitor(net)
    monitor.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    net(batches(1)[0])
    assert monitor.history["1"] == []


def test_context_manager_closes_on_exit() -> None:
    net = model().train()
    with bn.Monitor(net):
        pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_str_shows_the_latest_record_per_layer() -> None:
    net = model().train()
    with bn.Monitor(net) as monitor:
        for x in batches(2):
            net(x)
    lines = str(monitor).splitlines()
    assert lines[0].split() == ["layer", "step", "batch", "mean", "moving", "mean", "batch",
                                "var", "moving", "var"]
    assert lines[2].split()[:2] == ["1", "1"]
    assert float(lines[2].split()[3]) == pytest.approx(monitor.history["1"][-1].moving_mean,
                                                       abs=1e-4)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    net = model().train()
    with bn.Monitor(net) as monitor:
        for x in batches(3):
            net(x)
    path = monitor.plot(tmp_path / "stats.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_without_the_package_is_a_clear_import_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monitor = bn.Monitor(model())
    with pytest.raises(ImportError, match="pip install tensorboard"):
        monitor.to_tensorboard(tmp_path)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        bn.Monitor(model(), log_dir=tmp_path)


def test_to_tensorboard_writes_an_event_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    net = model().train()
    with bn.Monitor(net) as monitor:
        net(batches(1)[0])
    monitor.to_tensorboard(tmp_path)
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_a_model_without_batchnorm_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no batchnorm.BatchNorm"):
        bn.Monitor(nn.Linear(3, 3))
