"""bn.diagnose: each planted mistake gives its finding; a healthy model gives none."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import batchnorm as bn

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _trained() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn.BatchNorm(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16, 5, bias=False), bn.BatchNorm(5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(32, 3, 4, 4)).square().mean().backward()
        optimizer.step()
    return model.eval()


def healthy_model() -> nn.Sequential:
    """Conv (no bias) -> BN -> ReLU -> Flatten -> Linear (no bias) -> BN, trained, in eval."""
    return copy.deepcopy(_trained())


def kinds(findings: list[bn.Finding], layer: str | None = None) -> list[str]:
    return [f.kind for f in findings if layer is None or f.layer == layer]


def test_healthy_trained_model_in_eval_has_no_findings() -> None:
    model = healthy_model()
    assert bn.diagnose(model, torch.randn(4, 3, 4, 4), verbose=False) == []


def test_statistics_never_updated_in_eval() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), bn.BatchNorm(4)).eval()
    assert kinds(bn.diagnose(model, verbose=False)) == ["never_updated"]


def test_never_updated_is_not_reported_while_training() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), bn.BatchNorm(4)).train()
    assert "never_updated" not in kinds(bn.diagnose(model, verbose=False))


def test_loaded_statistics_with_zero_num_updates_are_not_never_updated() -> None:
    layer = bn.BatchNorm(4).eval()
    with torch.no_grad():
        layer.moving_mean.fill_(0.3)  # e.g. from a Keras file, which keeps no update count
    assert "never_updated" not in kinds(bn.diagnose(layer, verbose=False))


def test_training_mode_model_evaluated_under_no_grad_with_a_batch() -> None:
    model = healthy_model().train()
    with torch.no_grad():  # the caller evaluates, but the model is still in train()
        findings = bn.diagnose(model, torch.randn(32, 3, 4, 4), verbose=False)
    assert kinds(findings, "1") == ["training_in_eval"]
    assert kinds(findings, "5") == ["training_in_eval"]


def test_training_mode_model_with_a_batch_is_not_blamed_for_diagnose_s_own_no_grad() -> None:
    model = healthy_model().train()
    assert bn.diagnose(model, torch.randn(32, 3, 4, 4), verbose=False) == []


def test_training_true_call_inside_an_eval_model_with_a_batch() -> None:
    class ForcedTraining(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = bn.BatchNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x, training=True)

    model = ForcedTraining()
    model(torch.randn(32, 4))  # trained once: never_updated stays out of the way
    findings = bn.diagnose(model.eval(), torch.randn(32, 4), verbose=False)
    assert kinds(findings) == ["training_in_eval"]
    assert findings[0].layer == "norm" and "eval mode" in findings[0].message


def test_training_mode_layer_inside_an_eval_model() -> None:
    model = healthy_model()
    model[5].train()
    assert kinds(bn.diagnose(model, verbose=False)) == ["training_in_eval"]


def test_diagnosing_with_a_batch_changes_nothing() -> None:
    model = healthy_model().train()
    model.append(nn.BatchNorm1d(5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn.diagnose(model, torch.randn(32, 3, 4, 4), verbose=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_gamma_beta_while_statistics_still_update() -> None:
    model = healthy_model().train()
    model[1].gamma.requires_grad_(False)
    model[1].beta.requires_grad_(False)
    findings = bn.diagnose(model, verbose=False)
    assert kinds(findings) == ["frozen_affine_updating"]
    assert findings[0].layer == "1" and "layer.trainable = False" in findings[0].remedy


def test_trainable_false_is_the_right_way_to_freeze() -> None:
    model = healthy_model().train()
    model[1].trainable = False
    assert bn.diagnose(model, verbose=False) == []


def test_small_batch_in_training() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), bn.BatchNorm(4)).train()
    findings = bn.diagnose(model, torch.randn(4, 3), verbose=False)
    small = [f for f in findings if f.kind == "small_batch"]
    assert len(small) == 1 and "4 value(s) per feature" in small[0].message
    assert "renorm=True" in small[0].remedy


def test_small_ghost_batches_suggest_a_larger_virtual_batch_size() -> None:
    model = nn.Sequential(bn.BatchNorm(4, virtual_batch_size=2)).train()
    findings = bn.diagnose(model, torch.randn(64, 4), verbose=False)
    small = [f for f in findings if f.kind == "small_batch"]
    assert len(small) == 1 and "raise virtual_batch_size" in small[0].remedy


def test_large_enough_batch_is_not_small() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), bn.BatchNorm(4)).train()
    assert "small_batch" not in kinds(bn.diagnose(model, torch.randn(16, 3), verbose=False))


def test_conv_bias_before_batchnorm_in_a_sequential() -> None:
    model = healthy_model()
    model[0] = nn.Conv2d(3, 4, 3, bias=True)
    findings = bn.diagnose(model, verbose=False)
    assert kinds(findings) == ["redundant_bias"]
    assert findings[0].layer == "1" and "'0' (Conv2d)" in findings[0].message


def test_linear_bias_before_batchnorm_found_through_torch_fx() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.norm = bn.BatchNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.norm(self.fc(x)))

    findings = bn.diagnose(Net().train(), verbose=False)
    assert [(f.layer, f.kind) for f in findings] == [("norm", "redundant_bias")]


def test_bias_along_a_reduced_axis_is_not_redundant() -> None:
    # Linear on (N, L, F) adds its bias along F; BatchNorm over axis 1 (L) reduces over F.
    model = nn.Sequential(nn.Linear(3, 4), bn.BatchNorm(5, axis=1)).train()
    findings = bn.diagnose(model, torch.randn(8, 5, 3), verbose=False)
    assert "redundant_bias" not in kinds(findings)


def test_bias_used_elsewhere_too_is_not_redundant() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = bn.BatchNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.norm(h) + h

    assert "redundant_bias" not in kinds(bn.diagnose(Residual().train(), verbose=False))


def test_non_finite_moving_statistics() -> None:
    model = healthy_model()
    with torch.no_grad():
        model[5].moving_variance[2] = float("inf")
    findings = bn.diagnose(model, verbose=False)
    assert [(f.layer, f.kind) for f in findings] == [("5", "non_finite_statistics")]


def test_a_failing_forward_is_reported_not_raised() -> None:
    model = nn.Sequential(bn.BatchNorm(4)).train()
    findings = bn.diagnose(model, torch.randn(1, 4), verbose=False)  # one value per feature
    assert "forward_failed" in kinds(findings)
    assert "small_batch" in kinds(findings)


def test_verbose_prints_a_report(capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), bn.BatchNorm(4)).eval()
    bn.diagnose(model)
    out = capsys.readouterr().out
    assert out.startswith("diagnose: 1 finding(s) in 1 BatchNorm layer(s)")
    assert "[never_updated] '1':" in out and "remedy: " in out


def test_verbose_report_of_a_healthy_model(capsys: pytest.CaptureFixture[str]) -> None:
    bn.diagnose(healthy_model())
    assert capsys.readouterr().out.strip() == "diagnose: no problems found in 2 BatchNorm layer(s)"
