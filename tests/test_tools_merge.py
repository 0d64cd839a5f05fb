"""bn.merge_statistics: several models' batch-norm statistics pooled as those of the union of
their data; nothing else touched, and nothing at all when it refuses."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import batchnorm as bn
from batchnorm.statistics import inference_statistics

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def fingerprint(*models: nn.Module) -> list[dict[str, str]]:
    """A hash of every parameter and buffer of each model, by name (a lazy module's
    uninitialized ones: "lazy")."""
    def digest(t: torch.Tensor) -> str:
        if is_lazy(t):
            return "lazy"
        return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    return [{name: digest(t) for name, t in [*m.named_parameters(), *m.named_buffers()]}
            for m in models]


def pooled(means, variances, weights) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the variance of a mixture (the law of total variance), written out:
    ``sum(w m) / sum(w)`` and ``sum(w (v + (m - mean)**2)) / sum(w)``."""
    m, v = np.stack(means), np.stack(variances)
    w = np.asarray(weights, dtype=np.float64).reshape(-1, *[1] * (m.ndim - 1))
    mean = (w * m).sum(0) / w.sum()
    return mean, (w * (v + (m - mean) ** 2)).sum(0) / w.sum()


class TwoLayers(nn.Module):
    """BatchNorm, tanh, BatchNorm over (N, L, 3) inputs with a mask over (N, L): called with a
    ``{"x": ..., "mask": ...}`` batch (``recalibrate`` passes a dict as it is)."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.first = bn.BatchNorm(3, axis=-1, dtype=F64, **options)
        self.second = bn.BatchNorm(3, axis=-1, dtype=F64, **options)

    def forward(self, batch: dict) -> torch.Tensor:
        mask = batch.get("mask")
        return self.second(torch.tanh(self.first(batch["x"], mask=mask)), mask=mask)


def shards(sizes: list[list[int]], masked: bool, seed: int = 0) -> list[list[dict]]:
    """Per shard, batches of the given sizes, each shard from a distribution of its own."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for k, batch_sizes in enumerate(sizes):
        batches = []
        for n in batch_sizes:
            x = (torch.randn(n, 5, 3, generator=generator, dtype=F64) * (1 + k)
                 + torch.tensor([2.0 * k, -k, 0.5], dtype=F64))
            batch = {"x": x}
            if masked:
                batch["mask"] = torch.rand(n, 5, generator=generator) > 0.4
            batches.append(batch)
        out.append(batches)
    return out


def values_seen(batches: list[dict]) -> int:
    """How many values per feature a layer's statistics come from: the selected positions."""
    return sum(int(b["mask"].sum()) if "mask" in b else b["x"].shape[0] * b["x"].shape[1]
               for b in batches)


@pytest.mark.parametrize(("options", "masked"), [
    ({}, False),
    ({}, True),
    ({"virtual_batch_size": 2}, False),
], ids=["unequal_shards", "masks", "ghost_batches"])
def test_merging_exactly_recalibrated_shards_equals_recalibrating_on_their_union(options,
                                                                                  masked):
    torch.manual_seed(0)
    model = TwoLayers(**options)
    data = shards([[4, 10], [6], [2, 8, 12]], masked)  # unequal shards and batch sizes
    clients = [copy.deepcopy(model) for _ in data]
    for client, batches in zip(clients, data, strict=True):
        bn.recalibrate(client, batches, progress=False)
    union = copy.deepcopy(model)
    bn.recalibrate(union, [b for batches in data for b in batches], progress=False)

    merged = bn.merge_statistics(copy.deepcopy(model), clients,
                                 weights=[values_seen(batches) for batches in data])
    target = copy.deepcopy(model)
    assert bn.merge_statistics(target, clients,
                               weights=[values_seen(batches) for batches in data]) == merged
    assert merged == ["first", "second"]
    for name in merged:
        got, expected = getattr(target, name), getattr(union, name)
        # float64 throughout, the same sums in another order: a few ulps.
        torch.testing.assert_close(got.moving_mean, expected.moving_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.moving_variance, expected.moving_variance,
                                   rtol=1e-12, atol=1e-12)
        assert int(got.num_updates) == int(expected.num_updates) == 6


def test_means_are_weighted_and_variances_include_the_spread_between_the_models():
    sources = [bn.BatchNorm(4, dtype=F64) for _ in range(3)]
    for k, layer in enumerate(sources):
        with torch.no_grad():
            layer.moving_mean.copy_(torch.randn(4, dtype=F64) * 3 + k)
            layer.moving_variance.copy_(torch.rand(4, dtype=F64) + 0.1)
    weights = [10, 30, 5]
    target = bn.BatchNorm(4, dtype=F64)
    bn.merge_statistics(target, sources, weights=weights)
    mean, variance = pooled([s.moving_mean.numpy() for s in sources],
                            [s.moving_variance.numpy() for s in sources], weights)
    # float64: the same formula, summed in another order.
    np.testing.assert_allclose(target.moving_mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(target.moving_variance.numpy(), variance, rtol=1e-12)
    # Above the weighted average of the variances alone: the spread of the means is in.
    averaged = np.average([s.moving_variance.numpy() for s in sources], axis=0, weights=weights)
    assert (target.moving_variance.numpy() > averaged).all()


def test_without_weights_every_source_counts_the_same():
    sources = [bn.BatchNorm(2, dtype=F64) for _ in range(2)]
    with torch.no_grad():
        sources[0].moving_mean.copy_(torch.tensor([-1.0, 0.0], dtype=F64))
        sources[1].moving_mean.copy_(torch.tensor([1.0, 4.0], dtype=F64))
    target = bn.BatchNorm(2, dtype=F64)
    bn.merge_statistics(target, sources)
    mean, variance = pooled([s.moving_mean.numpy() for s in sources],
                            [s.moving_variance.numpy() for s in sources], [1, 1])
    np.testing.assert_allclose(target.moving_mean.numpy(), mean, rtol=0, atol=1e-15)
    np.testing.assert_allclose(target.moving_variance.numpy(), variance, rtol=1e-15)


def test_sources_may_be_a_module_list():
    sources = nn.ModuleList([bn.BatchNorm(2, dtype=F64) for _ in range(2)])
    with torch.no_grad():
        sources[1].moving_mean.fill_(1.0)
    target = bn.BatchNorm(2, dtype=F64)
    bn.merge_statistics(target, sources)
    assert torch.equal(target.moving_mean, torch.full((2,), 0.5, dtype=F64))  # exact in binary


def test_a_source_with_weight_zero_contributes_nothing():
    sources = [bn.BatchNorm(2, dtype=F64) for _ in range(2)]
    with torch.no_grad():
        sources[1].moving_mean.fill_(100.0)
        sources[1].moving_variance.fill_(50.0)
    target = bn.BatchNorm(2, dtype=F64)
    bn.merge_statistics(target, sources, weights=[3, 0])
    assert torch.equal(target.moving_mean, sources[0].moving_mean)
    assert torch.equal(target.moving_variance, sources[0].moving_variance)


def test_torch_nn_batch_norms_get_the_pooled_running_statistics():
    sources = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    for k, model in enumerate(sources):
        model.train()
        for _ in range(k + 1):
            model(torch.randn(16, 3) * (k + 1) + k)
    target = copy.deepcopy(sources[0])
    weights = [1, 2, 5]
    bn.merge_statistics(target, sources, weights=weights)
    mean, variance = pooled([s[1].running_mean.double().numpy() for s in sources],
                            [s[1].running_var.double().numpy() for s in sources], weights)
    # float32 buffers, pooled in float64 and rounded once to float32.
    np.testing.assert_allclose(target[1].running_mean.numpy(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(target[1].running_var.numpy(), variance, rtol=1e-6)
    assert int(target[1].num_batches_tracked) == 1 + 2 + 3


def test_num_updates_is_the_sum_of_the_sources():
    sources = [bn.BatchNorm(2) for _ in range(3)]
    for k, layer in enumerate(sources):
        layer.num_updates.fill_(10 * k + 1)
    target = bn.BatchNorm(2)
    bn.merge_statistics(target, sources)
    assert int(target.num_updates) == 1 + 11 + 21


@pytest.mark.parametrize("options", [{"debias": True}, {"renorm": True},
                                     {"renorm": True, "debias": True}],
                         ids=["debias", "renorm", "renorm_debias"])
def test_the_target_normalizes_with_the_pooled_statistics_its_sources_normalized_with(options):
    sources = [bn.BatchNorm(3, axis=-1, momentum=0.9, dtype=F64, **options) for _ in range(2)]
    for k, layer in enumerate(sources):
        for _ in range(3 + k):  # a few updates: the debiasing correction is far from 1
            layer(torch.randn(8, 3, dtype=F64) * (1 + k) + 3 * k, training=True)
    used = [inference_statistics(s.state(), momentum=s.momentum, epsilon=s.epsilon,
                                 debias=s.debias) for s in sources]
    mean, variance = pooled([u[0].numpy() for u in used], [u[1].numpy() for u in used], [1, 3])
    target = bn.BatchNorm(3, axis=-1, momentum=0.9, dtype=F64, **options)
    bn.merge_statistics(target, sources, weights=[1, 3])
    x = torch.randn(5, 3, dtype=F64)
    expected = (x.numpy() - mean) / np.sqrt(variance + target.epsilon)  # gamma 1, beta 0
    # float64; renorm stores sqrt(variance + epsilon) and squares it back, debias divides
    # by 1 - 0.9**t: a few hundred ulps at most.
    np.testing.assert_allclose(target(x, training=False).detach().numpy(), expected,
                               rtol=1e-10, atol=1e-12)


def test_the_target_may_be_one_of_the_sources():
    sources = [bn.BatchNorm(2, dtype=F64) for _ in range(2)]
    with torch.no_grad():
        sources[1].moving_mean.fill_(2.0)
    mean, variance = pooled([s.moving_mean.numpy() for s in sources],
                            [s.moving_variance.numpy() for s in sources], [1, 1])
    bn.merge_statistics(sources[0], sources)
    np.testing.assert_allclose(sources[0].moving_mean.numpy(), mean, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sources[0].moving_variance.numpy(), variance, rtol=1e-15)


def test_sources_of_another_dtype_are_pooled_into_the_target_s():
    sources = [bn.BatchNorm(2) for _ in range(2)]  # float32 statistics
    with torch.no_grad():
        sources[1].moving_mean.fill_(1.0)
    target = bn.BatchNorm(2, dtype=F64)
    bn.merge_statistics(target, sources)
    assert target.moving_mean.dtype == F64
    torch.testing.assert_close(target.moving_mean, torch.full((2,), 0.5, dtype=F64),
                               rtol=0, atol=0)  # 0 and 1 averaged: exact in binary


def test_only_batch_norm_statistics_change():
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 1), bn.BatchNorm(4), nn.BatchNorm2d(4),
                             nn.BatchNorm2d(4, track_running_stats=False), nn.Dropout())

    sources = [build() for _ in range(2)]
    for model in sources:
        model.train()(torch.randn(8, 3, 4, 4))
    target = build()
    before, *sources_before = fingerprint(target, *sources)
    assert bn.merge_statistics(target, sources) == ["1", "2"]
    after, *sources_after = fingerprint(target, *sources)
    assert sources_after == sources_before
    assert {k for k in before if before[k] != after[k]} == {
        "1.moving_mean", "1.moving_variance", "1.num_updates",
        "2.running_mean", "2.running_var", "2.num_batches_tracked"}


def test_unbiased_layers_pool_their_stored_variances_close_to_the_union_s():
    # torch.nn stores the Bessel-corrected variance: the pool of the stored values differs
    # from the corrected variance of the union by less than 1 / n (n: the smallest shard).
    data = [torch.randn(n, 3, dtype=F64) + k for k, n in enumerate((20, 50, 30))]
    sources = []
    for x in data:
        layer = nn.BatchNorm1d(3, momentum=None, dtype=F64)
        layer.train()(x)  # one batch, cumulative average: exactly its statistics
        sources.append(layer)
    target = nn.BatchNorm1d(3, dtype=F64)
    bn.merge_statistics(target, sources, weights=[len(x) for x in data])
    union = torch.cat(data)
    torch.testing.assert_close(target.running_mean, union.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target.running_var, union.var(0), rtol=1 / 20, atol=0)


# ---------------------------------------------------------------- refusals change nothing


def _layer_models(*feature_sizes: int) -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(2, f), bn.BatchNorm(f)) for f in feature_sizes]


REFUSALS = {
    "no_sources": (lambda: (_layer_models(3)[0], []), {}, ValueError, "sources is empty"),
    "sources_not_a_list": (lambda: (_layer_models(3)[0], _layer_models(3)[0]), {},
                           TypeError, "sources must be a sequence"),
    "a_source_not_a_module": (lambda: (_layer_models(3)[0], [_layer_models(3)[0], "model"]),
                              {}, TypeError, r"sources\[1\] must be a torch.nn.Module"),
    "no_batch_norm": (lambda: (nn.Linear(2, 2), [nn.Linear(2, 2)]), {}, ValueError,
                      "no batch normalization layer"),
    "feature_sizes_differ": (lambda: (_layer_models(3)[0], _layer_models(3, 4)), {},
                             ValueError, r"layer '1' has \(3,\) features in the target but "
                             r"\(4,\) in sources\[1\]"),
    "layers_differ": (lambda: (_layer_models(3)[0],
                               [_layer_models(3)[0], nn.Sequential(bn.BatchNorm(3))]),
                      {}, ValueError, r"sources\[1\] does not have the target's batch-norm "
                      r"layers: missing \['1'\], not in the target \['0'\]"),
    "weights_length": (lambda: (_layer_models(3)[0], _layer_models(3, 3)), {"weights": [1]},
                       ValueError, "weights has 1 entries for 2 source"),
    "weights_negative": (lambda: (_layer_models(3)[0], _layer_models(3, 3)),
                         {"weights": [1, -1]}, ValueError, r"finite and >= 0, got \[1, -1\]"),
    "weights_nan": (lambda: (_layer_models(3)[0], _layer_models(3, 3)),
                    {"weights": [1, float("nan")]}, ValueError, "finite and >= 0"),
    "weights_all_zero": (lambda: (_layer_models(3)[0], _layer_models(3, 3)),
                         {"weights": [0, 0]}, ValueError, "weights are all 0"),
    "weights_not_numbers": (lambda: (_layer_models(3)[0], _layer_models(3, 3)),
                            {"weights": [1, "2"]}, TypeError, "weights must be numbers"),
    "weights_a_tensor": (lambda: (_layer_models(3)[0], _layer_models(3, 3)),
                         {"weights": torch.ones(2)}, TypeError, "weights must be a list"),
    "lazy_layer": (lambda: (_layer_models(3)[0],
                            [nn.Sequential(nn.Linear(2, 3), bn.BatchNorm())]), {}, ValueError,
                   "lazy and not built yet"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_merge_names_the_problem_and_changes_nothing(case):
    make, kwargs, error, message = REFUSALS[case]
    target, sources = make()
    models = [target, *(s for s in (sources if isinstance(sources, list) else [sources])
                        if isinstance(s, nn.Module))]
    for model in models:
        for buffer in model.buffers():
            if not is_lazy(buffer) and buffer.is_floating_point() and buffer.numel():
                buffer.uniform_(0.5, 2.0)  # statistics a write would change
    before = fingerprint(*models)
    with pytest.raises(error, match=message):
        bn.merge_statistics(target, sources, **kwargs)
    assert fingerprint(*models) == before
