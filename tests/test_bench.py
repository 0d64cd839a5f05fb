"""The benchmark command (``python -m batchnorm bench``): its table and its report."""

import json
import math

from batchnorm.apps import bench


def test_bench_table_reports_the_limit_and_ratios():
    row = {"allocator": "reuse", "label": "8x4 nc float32 plain", "phase": "forward",
           "ours_ms": 2.0, "native_ms": 4.0, "compiled_ms": 3.0, "limit_ms": 1.6, "notes": []}
    text = bench.table([row])
    assert "| 80% | 2.00x | 1.50x |" in text


def test_bench_command_writes_json_and_a_table(tmp_path, capsys):
    from batchnorm.__main__ import main

    assert main(["bench", "--shapes", "8,4,6,6", "--modes", "plain", "masked", "--dtypes",
                 "float32", "--layouts", "nchw", "--repeats", "1", "--budget", "0.001",
                 "--compile", "none", "--no-tf", "--no-distributed", "--allocators", "reuse",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {r["phase"] for r in report["results"]} == set(bench.PHASES)
    assert all(math.isfinite(r["ours_ms"]) and r["limit_ms"] > 0 for r in report["results"])
    assert {m["contender"] for m in report["memory"]} >= {"ours", "torch.nn.BatchNorm2d"}
    out = capsys.readouterr().out
    assert "| reuse | 8x4x6x6 nchw float32 masked | forward+backward |" in out
    assert "torch " in out and "numba " in out
