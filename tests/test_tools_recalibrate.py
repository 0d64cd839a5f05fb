"""bn.recalibrate (PreciseBN): exact population statistics, nothing else touched."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import torch

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.shapes import broadcast

MU = np.array([-2.0, 0.5, 3.0])
SIGMA = np.array([0.5, 1.0, 2.0])


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_batches(n: int = 50, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """(size, 3, 4, 4) batches, channel c ~ N(MU[c], SIGMA[c]), each batch shifted a little."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((size, 3, 4, 4)) * SIGMA[:, None, None] + MU[:, None, None]
        x += rng.normal(0, 0.3, size=(1, 3, 1, 1))  # between-batch spread
        out.append(torch.tensor(x, dtype=torch.float32))
    return out


def union_statistics(batches: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([b.double().numpy() for b in batches])
    return data.mean(axis=(0, 2, 3)), data.var(axis=(0, 2, 3))


def test_recovers_the_statistics_of_the_union_of_the_batches() -> None:
    batches = gaussian_batches()
    model = torch.nn.Sequential(bn.BatchNorm(3, unbiased_moving_variance=False))
    bn.recalibrate(model, batches, progress=False)
    mean, variance = union_statistics(batches)
    np.testing.assert_allclose(model[0].moving_mean.numpy(), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model[0].moving_variance.numpy(), variance, rtol=1e-6)
    np.testing.assert_allclose(mean, MU, atol=0.2)  # the synthetic data is what it claims
    np.testing.assert_allclose(variance, SIGMA**2 + 0.3**2, rtol=0.15)  # + batch spread


def test_a_default_layer_gets_the_variance_its_training_calls_feed() -> None:
    # By default a rank-4 input with one channel axis feeds the Bessel-corrected variance
    # (tf_keras's fused default), so the population variance is M2 / (n - 1) there.
    batches = gaussian_batches(n=5)
    layer = bn.BatchNorm(3)
    bn.recalibrate(torch.nn.Sequential(layer), batches, progress=False)
    data = np.concatenate([b.double().numpy() for b in batches])
    # float32 inputs, float64 accumulation: a few float32 ulps.
    np.testing.assert_allclose(layer.moving_variance.numpy(), data.var(axis=(0, 2, 3), ddof=1),
                               rtol=1e-6)


def test_variance_includes_the_spread_between_batch_means() -> None:
    batches = [torch.randn(16, 3) + 5.0 * i for i in range(4)]  # batches far apart
    layer = bn.BatchNorm(3)
    bn.recalibrate(torch.nn.Sequential(layer), batches, progress=False)
    means = torch.stack([b.double().mean(0) for b in batches])
    variances = torch.stack([b.double().var(0, unbiased=False) for b in batches])
    expected = variances.mean(0) + means.var(0, unbiased=False)
    torch.testing.assert_close(layer.moving_variance.double(), expected, rtol=1e-6, atol=0)


def test_batches_of_different_sizes_give_the_union_statistics() -> None:
    batches = [torch.randn(n, 3) * (1 + n) + n for n in (2, 30, 7)]
    layer = bn.BatchNorm(3, axis=-1)
    bn.recalibrate(torch.nn.Sequential(layer), batches, progress=False)
    data = torch.cat(batches).double()
    torch.testing.assert_close(layer.moving_mean.double(), data.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.moving_variance.double(), data.var(0, unbiased=False),
                               rtol=1e-6, atol=0)


def test_later_layers_see_earlier_layers_in_training_mode() -> None:
    batches = [torch.randn(16, 3) * 3 + 2 for _ in range(5)]
    first, second = bn.BatchNorm(3, axis=-1), bn.BatchNorm(3, axis=-1)
    model = torch.nn.Sequential(first, torch.nn.Softplus(), second)
    with torch.no_grad():
        first.gamma.fill_(2.0)
    bn.recalibrate(model, batches, progress=False)
    with torch.no_grad():  # layer 2's input: layer 1 normalized with each batch's statistics
        inputs = [torch.nn.functional.softplus(
            F.normalize(b, *F.moments(b, [0]), first.beta, first.gamma, first.epsilon))
            for b in batches]
    data = torch.cat(inputs).double()
    torch.testing.assert_close(second.moving_mean.double(), data.mean(0), rtol=1e-5, atol=1e-6)


def test_parameters_and_other_buffers_are_bit_identical() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn.BatchNorm(4),
                                torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn.recalibrate(model, gaussian_batches(5), progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.moving_mean", "1.moving_variance", "1.num_updates"}


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_train_eval_modes_are_restored(mode: str) -> None:
    model = torch.nn.Sequential(bn.BatchNorm(3), torch.nn.Dropout(), bn.BatchNorm(3))
    model.train(mode == "train")
    if mode == "mixed":
        model[2].train()
    modes = [m.training for m in model.modules()]
    bn.recalibrate(model, gaussian_batches(2), progress=False)
    assert [m.training for m in model.modules()] == modes


def test_input_target_tuples_use_the_first_element() -> None:
    batches = gaussian_batches(5)
    plain, paired = bn.BatchNorm(3), bn.BatchNorm(3)
    bn.recalibrate(plain, batches, progress=False)
    bn.recalibrate(paired, [(x, torch.zeros(len(x))) for x in batches], progress=False)
    assert torch.equal(plain.moving_mean, paired.moving_mean)
    assert torch.equal(plain.moving_variance, paired.moving_variance)


def test_stops_after_num_batches_and_counts_them_in_num_updates() -> None:
    consumed = []

    def stream():
        for i, x in enumerate(gaussian_batches(10)):
            consumed.append(i)
            yield x

    layer = bn.BatchNorm(3)
    report = bn.recalibrate(layer, stream(), num_batches=4, progress=False)
    assert consumed == [0, 1, 2, 3]
    assert int(layer.num_updates) == 4
    assert report.num_batches == 4


def test_renorm_state_is_set_consistently() -> None:
    layer = bn.BatchNorm(3, renorm=True, epsilon=0.01)
    bn.recalibrate(layer, gaussian_batches(5), progress=False)
    stddev = torch.sqrt(layer.moving_variance + 0.01)
    torch.testing.assert_close(layer.moving_stddev, stddev)
    torch.testing.assert_close(layer.renorm_stddev, stddev)
    assert torch.equal(layer.renorm_mean, layer.moving_mean)


def test_debias_correction_becomes_the_identity() -> None:
    layer = bn.BatchNorm(3, debias=True)
    bn.recalibrate(layer, gaussian_batches(5), progress=False)
    x = gaussian_batches(1, seed=1)[0]
    expected = F.normalize(x, broadcast(layer.moving_mean, x, (1,)),
                           broadcast(layer.moving_variance, x, (1,)), None, None, 1e-3)
    torch.testing.assert_close(layer(x, training=False), expected, rtol=1e-5, atol=1e-5)


def test_frozen_layers_are_skipped_and_left_alone() -> None:
    frozen, live = bn.BatchNorm(3, trainable=False), bn.BatchNorm(3)
    report = bn.recalibrate(torch.nn.Sequential(frozen, live), gaussian_batches(3),
                            progress=False)
    assert report.skipped == ["0"]
    assert list(report) == ["1"]
    assert int(frozen.num_updates) == 0 and torch.equal(frozen.moving_mean, torch.zeros(3))


def test_report_holds_old_and_new_statistics_and_prints_a_table() -> None:
    layer = bn.BatchNorm(3)
    model = torch.nn.Sequential(layer)
    report = bn.recalibrate(model, gaussian_batches(5), progress=False)
    entry = report["0"]
    assert torch.equal(entry.old_mean, torch.zeros(3))
    assert torch.equal(entry.new_mean, layer.moving_mean)
    assert entry.mean_max_abs_diff == pytest.approx(float(layer.moving_mean.abs().max()))
    text = str(report)
    assert "recalibrated 1 BatchNorm layer(s) over 5 batch(es)" in text
    assert f"{entry.variance_max_abs_diff:.4g}" in text


def test_non_finite_batches_are_left_out_with_a_warning() -> None:
    batches = gaussian_batches(3)
    bad = batches[1].clone()
    bad[0, 0, 0, 0] = float("nan")
    layer = bn.BatchNorm(3)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        bn.recalibrate(layer, [batches[0], bad, batches[2]], progress=False)
    mean, _ = union_statistics([batches[0], batches[2]])
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6, atol=1e-6)
    assert int(layer.num_updates) == 2


def test_works_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    layer = bn.BatchNorm(3)
    bn.recalibrate(layer, gaussian_batches(2), progress=True)
    assert int(layer.num_updates) == 2


def test_no_batches_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        bn.recalibrate(bn.BatchNorm(3), [], progress=False)


def test_a_model_without_batchnorm_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no batchnorm.BatchNorm"):
        bn.recalibrate(torch.nn.Linear(3, 3), [torch.randn(4, 3)], progress=False)


# ---------------------------------------------------------------- prior


def shifted_batches(sizes: tuple[int, ...], shift: float, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=generator, dtype=torch.float64) * 2 + shift
            for n in sizes]


def test_prior_weighs_the_old_statistics_as_that_many_samples_against_the_new():
    layer = bn.BatchNorm(3, axis=-1, dtype=torch.float64)
    bn.recalibrate(layer, shifted_batches((16, 9), 0.0, seed=0), progress=False)
    old_mean, old_variance = layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()
    new = shifted_batches((7, 20, 5), 3.0, seed=1)
    bn.recalibrate(layer, new, prior=50, progress=False)
    data = torch.cat(new).numpy()
    n = len(data)  # 32 samples re-estimated over
    # Schneider et al.'s prior-weighted statistics, in float64: a few ulps apart.
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               (50 * old_mean + n * data.mean(0)) / (50 + n), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               (50 * old_variance + n * data.var(0)) / (50 + n), rtol=1e-12)
    assert int(layer.num_updates) == 3


def test_prior_counts_samples_along_the_batch_axis_not_values():
    layer = bn.BatchNorm(3, unbiased_moving_variance=False, dtype=torch.float64)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) + 1.0  # 6 samples, 96 values a feature
    bn.recalibrate(layer, [x], prior=6, progress=False)
    # Equal weights: halfway between the initial 0 / 1 and the batch's statistics.
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               x.numpy().mean(axis=(0, 2, 3)) / 2, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               (1 + x.numpy().var(axis=(0, 2, 3))) / 2, rtol=1e-12)


def test_prior_starts_from_the_statistics_inference_used():
    layer = bn.BatchNorm(3, axis=-1, momentum=0.9, debias=True, dtype=torch.float64)
    for x in shifted_batches((8, 8), 5.0, seed=2):
        layer(x, training=True)  # two updates: the debiasing correction is far from 1
    x = torch.randn(4, 3, dtype=torch.float64)
    before = layer(x, training=False)
    bn.recalibrate(layer, shifted_batches((8,), 0.0, seed=3), prior=1e12, progress=False)
    # An overwhelming prior keeps what inference did: 8 samples against 1e12 move it by 1e-11.
    torch.testing.assert_close(layer(x, training=False), before, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prior", [0, 0.0])
def test_prior_zero_is_exact_re_estimation(prior):
    batches = gaussian_batches(4)
    exact, zero = bn.BatchNorm(3, renorm=True), bn.BatchNorm(3, renorm=True)
    with torch.no_grad():
        zero.moving_mean.fill_(float("inf"))  # plays no part, not even as 0 * inf
    bn.recalibrate(exact, batches, progress=False)
    bn.recalibrate(zero, batches, prior=prior, progress=False)
    for (name, a), b in zip(exact.named_buffers(), zero.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_prior_changes_no_parameter_and_no_buffer_outside_the_batch_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn.BatchNorm(4),
                                torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    before = fingerprint(model)
    bn.recalibrate(model, gaussian_batches(3), prior=100, progress=False)
    after = fingerprint(model)
    assert {k for k in before if before[k] != after[k]} == {
        "1.moving_mean", "1.moving_variance", "1.num_updates"}


@pytest.mark.parametrize(("prior", "error", "message"), [
    (-1, ValueError, "prior must be a finite number of samples >= 0"),
    (float("nan"), ValueError, "got nan"),
    (float("inf"), ValueError, "got inf"),
    (True, TypeError, "prior must be a number of samples"),
    ("10", TypeError, "got str '10'"),
    (torch.tensor(10.0), TypeError, "got Tensor"),
])
def test_a_refused_prior_names_it_and_changes_nothing(prior, error, message):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), bn.BatchNorm(3))
    before = fingerprint(model)
    with pytest.raises(error, match=message):
        bn.recalibrate(model, [torch.randn(4, 3)], prior=prior, progress=False)
    assert fingerprint(model) == before


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """A hash of every parameter and buffer, by name."""
    return {name: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
            for name, t in [*model.named_parameters(), *model.named_buffers()]}
