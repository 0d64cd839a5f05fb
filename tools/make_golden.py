"""Generate the TensorFlow conformance fixtures in ``tests/fixtures/golden/``.

Run (from the repository root), with the Python of a venv holding tensorflow-cpu==2.21.0
and tf-keras==2.21.0 (TensorFlow is not a dependency of batchnorm; it is needed only
here, to regenerate the fixtures)::

    TF_USE_LEGACY_KERAS=1 /path/to/tf-venv/bin/python tools/make_golden.py [NAME ...]

With names, only those fixtures are written (the others are left as they are).

Each fixture drives one legacy-Keras ``tf_keras.layers.BatchNormalization(
fused=False, ...)`` layer through a sequence of steps; the ``fused_default_*`` ones leave
``fused`` to tf_keras's default (None: its fused kernel where it applies, rank 4 and 5,
which feeds the Bessel-corrected batch variance into ``moving_variance``). For every step it feeds
a float32 input ``x`` and an upstream gradient ``dy``, computes
``y = layer(x, training=flag)`` under ``tf.GradientTape`` with
``loss = reduce_sum(y * dy)`` and records ``y``, ``dx``, ``dgamma``, ``dbeta``
and the layer's moving statistics *after* the step.

npz keys (``i`` is the 0-based step index)::

    config              0-d str: JSON with axis, momentum, epsilon, center,
                        scale, renorm, renorm_clipping, renorm_momentum,
                        virtual_batch_size, adjustment, fused (+ renorm_state,
                        adjustment_shape where relevant)
    gamma0 beta0 moving_mean0 moving_variance0   initial values (feature-shaped)
    num_steps           int
    x_i training_i dy_i y_i dx_i dgamma_i dbeta_i moving_mean_i moving_variance_i
    <renorm var>0, <renorm var>_i     renorm fixtures (names in config["renorm_state"])
    adjust_scale_i adjust_bias_i      adjustment fixtures
    repeat_i                          seed_example only (calls folded into step i)

"Feature-shaped" means the sizes of the feature axes in increasing
(normalized, non-negative) axis order: axis=[1, 3] on a (4, 3, 5, 2) input
gives (3, 2). tf_keras keeps some parameters in a broadcast shape such as
(1, 3, 1, 2), or (1, 1, C) with ``virtual_batch_size``; they are reshaped here.
``gamma*``/``dgamma*`` are omitted when scale=False, ``beta*``/``dbeta*`` when
center=False. The files are deterministic: a fixed numpy seed per fixture.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"

# Training / inference pattern used by most fixtures.
DEFAULT_STEPS = (True, True, True, False, False, True, False)
RENORM_STATE = ("moving_stddev", "renorm_mean", "renorm_stddev")
CLIP = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}


@dataclass
class Spec:
    name: str
    shape: tuple  # input shape of a regular step
    axis: int | list = -1
    seed: int = 0
    momentum: float = 0.99
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True
    renorm: bool = False
    renorm_clipping: dict | None = None
    renorm_momentum: float = 0.99
    virtual_batch_size: int | None = None
    adjustment: bool = False
    steps: tuple = DEFAULT_STEPS
    # Steps (indices) run with batch size 1 instead of shape[0].
    batch1_steps: tuple = ()
    # Per-step (scale, shift) of x; None draws them at random.
    x_affine: tuple | None = None
    # "derived": renorm state as tf_keras initializes it from the initial
    # moving statistics; "independent": every state variable random.
    renorm_init: str = "derived"
    fused: bool | None = False  # None: tf_keras's default
    notes: list = field(default_factory=list)


def norm_axes(axis, rank):
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % rank for a in axes)


def feature_shape(axis, shape):
    return tuple(shape[a] for a in norm_axes(axis, len(shape)))


def config_of(spec: Spec) -> dict:
    cfg = {
        "axis": spec.axis,
        "momentum": spec.momentum,
        "epsilon": spec.epsilon,
        "center": spec.center,
        "scale": spec.scale,
        "renorm": spec.renorm,
        "renorm_clipping": spec.renorm_clipping,
        "renorm_momentum": spec.renorm_momentum,
        "virtual_batch_size": spec.virtual_batch_size,
        "adjustment": spec.adjustment,
        "fused": spec.fused,
    }
    if spec.renorm:
        cfg["renorm_state"] = list(RENORM_STATE)
    if spec.adjustment:
        cfg["adjustment_shape"] = "features"
        cfg["adjustment_applied_in_inference"] = False
    return cfg


class Adjustment:
    """Deterministic adjustment: returns the arrays set for the current step."""

    def __init__(self):
        self.scale = None
        self.bias = None
        self.calls = 0

    def __call__(self, shape):
        del shape  # the arrays are feature-shaped, broadcastable to the input
        self.calls += 1
        return tf.constant(self.scale), tf.constant(self.bias)


def make_layer(spec: Spec, adjustment=None):
    return tf_keras.layers.BatchNormalization(
        axis=spec.axis,
        momentum=spec.momentum,
        epsilon=spec.epsilon,
        center=spec.center,
        scale=spec.scale,
        renorm=spec.renorm,
        renorm_clipping=spec.renorm_clipping,
        renorm_momentum=spec.renorm_momentum,
        virtual_batch_size=spec.virtual_batch_size,
        adjustment=adjustment,
        fused=spec.fused,
    )


def read(var, fshape):
    return np.asarray(var.numpy(), dtype=np.float32).reshape(fshape)


def write(var, value):
    var.assign(np.asarray(value, dtype=np.float32).reshape(var.shape))


def state_names(spec):
    names = ["moving_mean", "moving_variance"]
    if spec.renorm:
        names += list(RENORM_STATE)
    return names


def renorm_r_d(spec, x, state, fshape):
    """Renorm corrections (before clipping) as tf_keras computes them."""
    xs = x.astype(np.float64)
    rank = xs.ndim
    axes = norm_axes(spec.axis, rank)
    if spec.virtual_batch_size is not None:
        g = xs.reshape((spec.virtual_batch_size, -1) + xs.shape[1:])
        red = tuple(a for a in range(rank + 1) if a != 1 and a - 1 not in axes)
        mean = g.mean(axis=red).mean(axis=0)
        var = g.var(axis=red).mean(axis=0)
    else:
        red = tuple(a for a in range(rank) if a not in axes)
        mean, var = xs.mean(axis=red), xs.var(axis=red)
    mean, var = mean.reshape(fshape), var.reshape(fshape)
    stddev = np.sqrt(var + spec.epsilon)
    rs = np.maximum(state["renorm_stddev"], np.sqrt(spec.epsilon))
    return stddev / rs, (mean - state["renorm_mean"]) / rs


def run_fixture(spec: Spec) -> dict:
    rng = np.random.default_rng(spec.seed)
    fshape = feature_shape(spec.axis, spec.shape)
    adj = Adjustment() if spec.adjustment else None
    layer = make_layer(spec, adj)
    layer.build(spec.shape)

    arrays = {"config": np.array(json.dumps(config_of(spec)))}
    init = {}
    if spec.scale:
        init["gamma"] = rng.uniform(0.5, 2.0, fshape) * rng.choice([-1.0, 1.0], fshape)
    if spec.center:
        init["beta"] = rng.normal(0.0, 1.0, fshape)
    init["moving_mean"] = rng.normal(0.0, 2.0, fshape)
    init["moving_variance"] = rng.uniform(0.5, 4.0, fshape)
    if spec.renorm:
        if spec.renorm_init == "derived":  # what tf_keras's initializers give
            init["moving_stddev"] = np.sqrt(init["moving_variance"])
            init["renorm_mean"] = init["moving_mean"].copy()
            init["renorm_stddev"] = np.sqrt(init["moving_variance"])
        else:
            init["moving_stddev"] = rng.uniform(0.7, 2.0, fshape)
            init["renorm_mean"] = rng.normal(0.0, 1.0, fshape)
            init["renorm_stddev"] = rng.uniform(0.7, 2.0, fshape)
    for k, v in init.items():
        write(getattr(layer, k), v)
        arrays[f"{k}0"] = read(getattr(layer, k), fshape)

    clip_hits = {"rmin": 0, "rmax": 0, "dmax": 0, "total": 0}
    step = 0
    for i, training in enumerate(spec.steps):
        shape = tuple(spec.shape)
        if i in spec.batch1_steps:
            shape = (1,) + shape[1:]
        if spec.x_affine is not None:
            s, t = spec.x_affine[i]
        else:
            s, t = rng.uniform(1.0, 4.0), rng.uniform(-3.0, 3.0)
        x = (s * rng.standard_normal(shape) + t).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        if adj is not None:
            adj.scale = rng.uniform(0.8, 1.2, fshape).astype(np.float32)
            adj.bias = rng.uniform(-0.3, 0.3, fshape).astype(np.float32)
        before = {k: read(getattr(layer, k), fshape) for k in state_names(spec)}
        xt = tf.constant(x)
        params = [v for v in (layer.gamma, layer.beta) if v is not None]
        calls_before = adj.calls if adj is not None else 0
        try:
            with tf.GradientTape() as tape:
                tape.watch(xt)
                y = layer(xt, training=training)
                loss = tf.reduce_sum(y * tf.constant(dy))
            grads = tape.gradient(loss, [xt] + params)
        except Exception as e:  # record and skip the step
            spec.notes.append(
                f"step {i} (training={training}, batch={shape[0]}) "
                f"failed in tf_keras, skipped: {type(e).__name__}"
            )
            for k, v in before.items():  # a failed call must not have updated
                assert np.array_equal(v, read(getattr(layer, k), fshape)), k
            continue
        if adj is not None and (adj.calls - calls_before) != int(training):
            spec.notes.append(f"step {i}: adjustment called {adj.calls - calls_before}x")
        if spec.renorm and spec.renorm_clipping and training:
            r, d = renorm_r_d(spec, x, before, fshape)
            c = spec.renorm_clipping
            clip_hits["rmin"] += int(np.sum(r < c.get("rmin", -np.inf)))
            clip_hits["rmax"] += int(np.sum(r > c.get("rmax", np.inf)))
            clip_hits["dmax"] += int(np.sum(np.abs(d) > c.get("dmax", np.inf)))
            clip_hits["total"] += r.size
        arrays[f"x_{step}"] = x
        arrays[f"training_{step}"] = np.array(training)
        arrays[f"dy_{step}"] = dy
        arrays[f"y_{step}"] = y.numpy().astype(np.float32)
        arrays[f"dx_{step}"] = grads[0].numpy().astype(np.float32)
        g = iter(grads[1:])
        if spec.scale:
            arrays[f"dgamma_{step}"] = np.asarray(next(g), np.float32).reshape(fshape)
        if spec.center:
            arrays[f"dbeta_{step}"] = np.asarray(next(g), np.float32).reshape(fshape)
        for k in state_names(spec):
            arrays[f"{k}_{step}"] = read(getattr(layer, k), fshape)
        if adj is not None:
            arrays[f"adjust_scale_{step}"] = adj.scale
            arrays[f"adjust_bias_{step}"] = adj.bias
        step += 1
    arrays["num_steps"] = np.array(step, dtype=np.int64)
    if spec.renorm_clipping:
        spec.notes.append(
            "renorm clip hits over training steps: r<rmin {rmin}, r>rmax {rmax}, "
            "|d|>dmax {dmax} (of {total} features*steps)".format(**clip_hits)
        )
        if not (clip_hits["rmin"] or clip_hits["rmax"] or clip_hits["dmax"]):
            raise RuntimeError(f"{spec.name}: clipping never happened")
    return arrays


def run_seed_example() -> tuple[dict, list]:
    """The seed article's example: defaults, x = [[-10], [0], [10]]."""
    rng = np.random.default_rng(1000)
    spec = Spec("seed_example", (3, 1))
    layer = make_layer(spec)
    layer.build((None, 1))
    fshape = (1,)
    big = np.array([[-10.0], [0.0], [10.0]], np.float32)
    small = np.array([[-10.0]], np.float32)
    plan = [
        (big, False, 1),
        (big, True, 1),
        (small, False, 1),
        (big, True, 1000),
        (small, False, 1),
    ]
    arrays = {"config": np.array(json.dumps(config_of(spec)))}
    for k in ("gamma", "beta", "moving_mean", "moving_variance"):
        arrays[f"{k}0"] = read(getattr(layer, k), fshape)
    for i, (x, training, repeat) in enumerate(plan):
        dy = rng.standard_normal(x.shape).astype(np.float32)
        xt = tf.constant(x)
        for _ in range(repeat - 1):
            layer(xt, training=training)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=training)
            loss = tf.reduce_sum(y * tf.constant(dy))
        dx, dg, db = tape.gradient(loss, [xt, layer.gamma, layer.beta])
        arrays.update(
            {
                f"x_{i}": x,
                f"training_{i}": np.array(training),
                f"dy_{i}": dy,
                f"y_{i}": y.numpy(),
                f"dx_{i}": dx.numpy(),
                f"dgamma_{i}": read(dg, fshape),
                f"dbeta_{i}": read(db, fshape),
                f"moving_mean_{i}": read(layer.moving_mean, fshape),
                f"moving_variance_{i}": read(layer.moving_variance, fshape),
                f"repeat_{i}": np.array(repeat, dtype=np.int64),
            }
        )
    arrays["num_steps"] = np.array(len(plan), dtype=np.int64)
    quoted = {0: -9.995004, 1: -1.2247357, 2: -7.766966, 4: -1.224762}
    notes = []
    for i, q in quoted.items():
        got = float(arrays[f"y_{i}"][0, 0])
        ok = abs(got - q) <= 1e-6 * max(1.0, abs(q)) * 2
        notes.append(f"step {i}: y[0]={got:.7f} article {q} {'AGREES' if ok else 'DIFFERS'}")
    return arrays, notes


def run_seed_axis0_example() -> tuple[dict, list]:
    """Second seed: BatchNormalization(axis=0, scale=False, center=False) on [[3., 4.]]."""
    rng = np.random.default_rng(1001)
    spec = Spec("seed_axis0_example", (1, 2), axis=0, center=False, scale=False)
    layer = make_layer(spec)
    layer.build((1, 2))
    fshape = (1,)
    x = np.array([[3.0, 4.0]], np.float32)
    arrays = {"config": np.array(json.dumps(config_of(spec)))}
    for k in ("moving_mean", "moving_variance"):
        arrays[f"{k}0"] = read(getattr(layer, k), fshape)
    for i, training in enumerate((True, False)):
        dy = rng.standard_normal(x.shape).astype(np.float32)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=training)
            loss = tf.reduce_sum(y * tf.constant(dy))
        dx = tape.gradient(loss, xt)
        arrays.update(
            {
                f"x_{i}": x,
                f"training_{i}": np.array(training),
                f"dy_{i}": dy,
                f"y_{i}": y.numpy(),
                f"dx_{i}": dx.numpy(),
                f"moving_mean_{i}": read(layer.moving_mean, fshape),
                f"moving_variance_{i}": read(layer.moving_variance, fshape),
            }
        )
    arrays["num_steps"] = np.array(2, dtype=np.int64)
    got = arrays["y_0"][0]
    q = np.array([-0.99800634, 0.99800587])
    ok = np.allclose(got, q, rtol=0, atol=2e-7)
    return arrays, [
        f"training y={got.tolist()} article {q.tolist()} {'AGREES' if ok else 'DIFFERS'}"
    ]


def specs() -> list[Spec]:
    s = []
    # Foundation set.
    s += [
        Spec("plain_rank2_axis-1", (6, 4), -1, seed=1),
        Spec("plain_rank2_axis0", (3, 6), 0, seed=2),
        Spec("plain_rank3_axis-1", (4, 3, 5), -1, seed=3),
        Spec("plain_rank3_axis1", (4, 3, 5), 1, seed=4),
        Spec("plain_rank4_axis1", (4, 3, 2, 5), 1, seed=5),
        Spec("plain_rank4_axis-1", (4, 2, 5, 3), -1, seed=6),
        Spec("plain_rank4_axis1and3", (4, 3, 5, 2), [1, 3], seed=7),
        Spec("plain_rank5_axis-1", (2, 3, 2, 2, 4), -1, seed=8),
        Spec("plain_rank2_axis-1_momentum0.9", (6, 4), -1, seed=9, momentum=0.9),
        Spec("plain_rank2_axis-1_momentum0.5", (6, 4), -1, seed=10, momentum=0.5),
        Spec("plain_rank2_axis-1_epsilon1e-5", (6, 4), -1, seed=11, epsilon=1e-5),
        Spec("plain_rank2_axis-1_epsilon0.1", (6, 4), -1, seed=12, epsilon=0.1),
        Spec("plain_rank2_axis-1_nocenter", (6, 4), -1, seed=13, center=False),
        Spec("plain_rank2_axis-1_noscale", (6, 4), -1, seed=14, scale=False),
        Spec("plain_rank2_axis-1_nocenter_noscale", (6, 4), -1, seed=15, center=False, scale=False),
    ]
    # Extended set: renorm.
    s += [
        Spec("renorm_rank2_axis-1", (6, 4), -1, seed=101, renorm=True),
        Spec("renorm_rank4_axis-1", (4, 2, 5, 3), -1, seed=102, renorm=True),
        Spec(
            "renorm_rank2_axis-1_independent_state",
            (6, 4),
            -1,
            seed=103,
            renorm=True,
            momentum=0.9,
            renorm_init="independent",
        ),
        Spec(
            "renorm_rank2_axis-1_clip",
            (8, 5),
            -1,
            seed=104,
            renorm=True,
            renorm_clipping=dict(CLIP),
            renorm_momentum=0.9,
            renorm_init="independent",
            x_affine=(
                (3.0, 0.2),
                (0.4, 0.0),
                (1.0, 1.5),
                (1.0, 0.0),
                (1.0, 0.0),
                (1.1, 0.1),
                (1.0, 0.0),
            ),
        ),
        Spec(
            "renorm_rank2_axis-1_renorm_momentum0.9",
            (6, 4),
            -1,
            seed=105,
            renorm=True,
            renorm_momentum=0.9,
        ),
        Spec(
            "renorm_rank2_axis-1_renorm_momentum0.5",
            (6, 4),
            -1,
            seed=106,
            renorm=True,
            renorm_momentum=0.5,
        ),
    ]
    # Extended set: ghost batches (batch 8), inference also with batch 1.
    ghost_steps = (True, True, True, False, False, True, False)
    for vbs in (2, 4):
        for tag, shape, axis in (
            ("rank2_axis-1", (8, 4), -1),
            ("rank4_axis-1", (8, 2, 2, 3), -1),
            ("rank4_axis1", (8, 3, 2, 2), 1),
        ):
            s.append(
                Spec(
                    f"ghost_vbs{vbs}_{tag}",
                    shape,
                    axis,
                    seed=200 + 10 * vbs + len(s),
                    virtual_batch_size=vbs,
                    steps=ghost_steps,
                    batch1_steps=(4, 6),
                )
            )
    s += [
        Spec(
            "ghost_renorm_vbs2_rank2_axis-1",
            (8, 4),
            -1,
            seed=301,
            renorm=True,
            renorm_momentum=0.9,
            virtual_batch_size=2,
            steps=ghost_steps,
            batch1_steps=(4, 6),
        ),
        Spec(
            "ghost_renorm_clip_vbs4_rank4_axis1",
            (8, 3, 2, 2),
            1,
            seed=302,
            renorm=True,
            renorm_clipping=dict(CLIP),
            renorm_momentum=0.9,
            renorm_init="independent",
            virtual_batch_size=4,
            steps=ghost_steps,
            batch1_steps=(4, 6),
        ),
    ]
    # Extended set: adjustment.
    s += [
        Spec("adjust_rank2_axis-1", (6, 4), -1, seed=401, adjustment=True),
        Spec("adjust_rank4_axis-1", (4, 2, 5, 3), -1, seed=402, adjustment=True),
    ]
    return s


def fused_default_specs() -> list[Spec]:
    """tf_keras's default ``fused=None``: fused (unbiased moving variance) for rank 4 with axis
    1 or 3 and rank 5 with axis 1 or 4; not fused elsewhere (rank 2, several axes)."""
    return [
        Spec("fused_default_rank4_axis-1", (4, 3, 3, 5), -1, seed=501, momentum=0.5,
             fused=None),
        Spec("fused_default_rank4_axis1", (4, 5, 3, 3), 1, seed=502, momentum=0.5, fused=None),
        Spec("fused_default_rank5_axis-1", (2, 3, 2, 2, 4), -1, seed=503, fused=None),
        Spec("fused_default_rank5_axis1", (2, 4, 2, 2, 3), 1, seed=504, fused=None),
        Spec("fused_default_rank4_axis1and3", (4, 3, 5, 2), [1, 3], seed=505, fused=None),
        Spec("fused_default_rank2_axis-1", (6, 4), -1, seed=506, fused=None),
    ]


def save(name, arrays, notes):
    path = OUT_DIR / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    first_x = arrays.get("x_0")
    cfg = json.loads(str(arrays["config"]))
    print(
        f"{name:42s} steps={int(arrays['num_steps'])} "
        f"x0={None if first_x is None else tuple(first_x.shape)} axis={cfg['axis']} "
        f"bytes={path.stat().st_size}" + ("  | " + "; ".join(notes) if notes else "")
    )
    return path.stat().st_size


def main() -> int:
    tf.config.experimental.enable_op_determinism()
    tf.random.set_seed(0)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    print(
        f"tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}, "
        f"numpy {np.__version__} -> {OUT_DIR}"
    )
    total = 0
    only = set(sys.argv[1:])
    for fn in (run_seed_example, run_seed_axis0_example):
        if only and fn.__name__.removeprefix("run_") not in only:
            continue
        arrays, notes = fn()
        total += save(fn.__name__.removeprefix("run_"), arrays, notes)
    for spec in specs() + fused_default_specs():
        if only and spec.name not in only:
            continue
        try:
            arrays = run_fixture(spec)
        except Exception as e:  # e.g. an unsupported configuration
            print(f"{spec.name:42s} SKIPPED: tf_keras failed: {type(e).__name__}: {e}")
            continue
        total += save(spec.name, arrays, spec.notes)
    print(f"total {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
