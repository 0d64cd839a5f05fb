"""The tf_keras contender of ``python -m batchnorm bench``, run by a TensorFlow interpreter.

A standalone script (TensorFlow and NumPy only, no torch, no batchnorm): the
benchmark runs it as ``<tf python> bench_tf.py <the child's arguments>`` and
merges its timings by case label and phase. Each case is a tf_keras
``BatchNormalization`` with the same options (renorm and its clipping,
``virtual_batch_size``), called inside a ``tf.function``: training forward,
forward+backward (a ``GradientTape`` for x, gamma and beta), inference.
tf_keras has no masks, so masked cases are skipped; a case TensorFlow cannot
run on this machine (e.g. a layout its CPU kernels lack) is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VIRTUAL_BATCH_SIZE = 8


def label(shape, layout, dtype, mode):
    return f"{'x'.join(map(str, shape))} {layout} {dtype} {mode}"


def time_calls(fn, repeats: int, budget: float) -> list[float]:
    for _ in range(3):
        start = time.perf_counter()
        while time.perf_counter() - start < budget / 2:
            fn()
    start = time.perf_counter()
    fn()
    calls = max(1, min(200, int(budget / max(time.perf_counter() - start, 1e-7))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return samples


def run_case(tf, keras, shape, layout, dtype, mode, phases, repeats, budget):
    import numpy as np

    rng = np.random.default_rng(0)
    if layout == "nhwc":  # the same logical NCHW tensor, channels-last in memory
        data_shape, axis = (shape[0], *shape[2:], shape[1]), -1
    else:
        data_shape, axis = shape, 1 if len(shape) == 4 else -1
    tf_dtype = tf.bfloat16 if dtype == "bfloat16" else tf.float32
    x = tf.cast(tf.constant(rng.standard_normal(data_shape, dtype=np.float32)), tf_dtype)
    dy = tf.cast(tf.constant(rng.standard_normal(data_shape, dtype=np.float32)), tf_dtype)
    options = {}
    if mode == "renorm":
        options = {"renorm": True, "renorm_clipping": {"rmin": 1 / 3, "rmax": 3, "dmax": 5}}
    elif mode == "ghost":
        options = {"virtual_batch_size": VIRTUAL_BATCH_SIZE}
    policy = "mixed_bfloat16" if dtype == "bfloat16" else "float32"
    layer = keras.layers.BatchNormalization(axis=axis, momentum=0.99, epsilon=1e-3,
                                            dtype=policy, **options)
    layer.build(data_shape)

    @tf.function
    def forward(t):
        return layer(t, training=True)

    @tf.function
    def forward_backward(t, g):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = layer(t, training=True)
        return tape.gradient(y, [t, *layer.trainable_variables], output_gradients=g)

    @tf.function
    def inference(t):
        return layer(t, training=False)

    fns = {"forward": lambda: forward(x), "forward+backward": lambda: forward_backward(x, dy),
           "inference": lambda: inference(x)}
    out = []
    for phase in phases:
        try:
            samples = time_calls(fns[phase], repeats, budget)
        except Exception as error:  # a case this TensorFlow build cannot run
            print(f"  tf_keras {label(shape, layout, dtype, mode)} {phase}: "
                  f"{type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
            continue
        out.append({"label": label(shape, layout, dtype, mode), "phase": phase,
                    "tf_keras_ms": statistics.median(samples) * 1e3,
                    "samples_ms": [s * 1e3 for s in samples]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=[])
    parser.add_argument("--layouts", nargs="+", default=["nchw"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--modes", nargs="+", default=["plain"])
    parser.add_argument("--phases", nargs="+", default=["forward"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--json-out", required=True)
    args, _ = parser.parse_known_args()

    import tensorflow as tf
    import tf_keras as keras

    results = []
    for text in args.shapes:
        shape = tuple(int(s) for s in text.split(",") if s)
        for layout in (args.layouts if len(shape) == 4 else ["nc"]):
            for dtype in args.dtypes:
                for mode in args.modes:
                    if mode == "masked":
                        continue  # tf_keras's BatchNormalization takes no mask
                    results += run_case(tf, keras, shape, layout, dtype, mode, args.phases,
                                        args.repeats, args.budget)
    environment = {"tensorflow": f"tensorflow {tf.__version__}, tf_keras {keras.__version__}",
                   "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}
    with open(args.json_out, "w") as f:
        json.dump({"environment": environment, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
