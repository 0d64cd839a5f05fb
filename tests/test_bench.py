"""The benchmark command (``python -m batchnorm bench``): its verdict, its tables, its trust
checks, its end-to-end rows and its report."""

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch

import batchnorm as bn
from batchnorm.apps import bench, bench_modes, measure
from batchnorm.apps import bench_end_to_end as e2e
from batchnorm.apps import bench_norm_cost as norm_cost
from batchnorm.apps import bench_per_call as per_call
from batchnorm.apps.measure import WIDTH, compare


def layer_row(phase="forward", ours=(2.0, 2.1, 1.9), native=(4.0, 4.1, 3.9), limit=1.6,
              label="8x4 nc float32 plain", allocator="reuse", notes=()):
    return {"allocator": allocator, "label": label, "phase": phase, "limit_ms": limit,
            "notes": list(notes), "samples_ms": {"ours": list(ours), "native": list(native)},
            "ratios": {"native": bench._paired_ratios(list(native), list(ours))}}


def test_spread_is_min_median_max():
    assert bench.spread([3.0, 1.0, 2.0, 10.0, 2.5]) == {"min": 1.0, "median": 2.5, "max": 10.0}


def test_steady_rows_are_not_flagged_and_the_summary_says_so():
    rows = bench.flag_rows([layer_row("forward"),
                            layer_row("forward+backward", ours=(5.0, 5.2, 5.1),
                                      native=(9.0, 9.1, 9.2), limit=4.0)])
    assert [r["flags"] for r in rows] == [[], []]
    (line,) = bench.trust_summary(rows)
    assert line.startswith("No row flagged (2 rows)")


def test_a_wide_spread_is_flagged():
    (row,) = bench.flag_rows([layer_row(ours=(2.0, 2.1, 3.2))])  # 3.2 / 2.0 = 1.6 > 1.5
    assert row["flags"] == ["spread over 1.5x: ours (up to 1.6x)"]
    (row,) = bench.flag_rows([layer_row(ours=(2.0, 2.1, 2.9))])  # 1.45: within the limit
    assert row["flags"] == []


def test_forward_backward_faster_than_forward_is_flagged_on_both_rows():
    rows = bench.flag_rows([layer_row("forward", ours=(6.0, 6.1, 6.2)),
                            layer_row("forward+backward", ours=(5.0, 5.1, 5.2), limit=4.0,
                                      native=(9.0, 9.1, 9.2))])
    text = "forward+backward faster than forward: ours (cannot be)"
    assert all(text in r["flags"] for r in rows)
    assert not any("native" in f for r in rows for f in r["flags"])
    summary = bench.trust_summary(rows)
    assert summary[0].startswith("**WARNING: 2 of 2 rows flagged")
    assert "- forward+backward faster than forward: 2 rows" in summary


def test_the_same_ordering_in_another_allocator_or_case_is_not_compared():
    rows = bench.flag_rows([layer_row("forward", ours=(6.0, 6.1, 6.2), allocator="default"),
                            layer_row("forward+backward", ours=(5.0, 5.1, 5.2), limit=4.0,
                                      native=(9.0, 9.1, 9.2))])
    assert [r["flags"] for r in rows] == [[], []]


def test_faster_than_the_bandwidth_limit_by_a_wide_margin_is_flagged():
    (row,) = bench.flag_rows([layer_row(limit=3.5)])  # ours 2.0 ms: 175% of the limit
    assert row["flags"] == ["faster than the bandwidth limit: ours at 175% (cannot be)"]
    (row,) = bench.flag_rows([layer_row(limit=2.8)])  # 140%: within the margin
    assert row["flags"] == []


def test_the_summary_counts_the_other_parts_flagged_rows():
    steady = bench.flag_rows([layer_row()])
    per_call_row = {"flags": ["spread over 1.5x: ours (up to 2.0x)"]}
    summary = bench.trust_summary(steady, [per_call_row, {"flags": []}])
    assert summary[0].startswith("**WARNING: 1 of 3 rows flagged")
    assert "- spread over 1.5x: 1 row" in summary


def test_the_advice_to_rerun_names_threads_1_only_where_it_was_not_set():
    rows = bench.flag_rows([layer_row(ours=(2.0, 2.1, 3.2))])  # a wide spread: flagged
    for threads in (None, 2):
        assert "`--threads 1`" in bench.trust_summary(rows, threads=threads)[0]
    advice = bench.trust_summary(rows, threads=1)[0]
    assert "rerun on a quieter machine" in advice and "--threads" not in advice


def test_thread_contention_flags_every_row_of_that_process():
    check = {"threads": 2, "parallel_ms": 8.0, "serial_ms": 1.0, "slowdown": 8.0}
    rows = bench.flag_rows([layer_row(), layer_row(allocator="default")],
                           contention={"reuse": check})
    assert rows[0]["flags"] == ["thread contention: 2 threads 8.0x slower than 1 on a "
                                "parallel op"]
    assert rows[1]["flags"] == []
    assert bench.contention_flag({**check, "threads": 1}) is None
    summary = bench.trust_summary(rows, load_average=3.5, cores=2)
    assert summary[0].startswith("The machine was busy before the benchmark started: load "
                                 "average 3.5 on 2 cores")


def test_a_rows_own_contention_probe_takes_precedence():
    quiet = {"threads": 2, "parallel_ms": 0.5, "serial_ms": 1.0, "slowdown": 0.5}
    busy = {**quiet, "parallel_ms": 4.0, "slowdown": 4.0}
    rows = [layer_row(), layer_row()]
    rows[0]["contention"] = quiet
    bench.flag_rows(rows, contention={"reuse": busy})
    assert rows[0]["flags"] == [] and rows[1]["flags"][0].startswith("thread contention")


def test_thread_contention_check_measures_both_thread_counts():
    threads = torch.get_num_threads()
    check = bench.thread_contention(repeats=3)
    assert check["threads"] == threads == torch.get_num_threads()
    assert check["parallel_ms"] > 0 and check["serial_ms"] > 0 and check["slowdown"] > 0


def test_bench_table_reports_spreads_ratios_limit_and_flags():
    rows = bench.flag_rows([layer_row(notes=["native*: plain"]),
                            layer_row("inference", ours=(2.0, 2.0, 3.5))])
    lines = bench.table(rows).splitlines()
    assert lines[0].endswith("| native / ours | compiled / ours | flags |")
    assert ("| reuse | 8x4 nc float32 plain | forward | 2.000 (1.900-2.100) | "
            "4.000 (3.900-4.100)* | - | - | 1.600 | 80% | 2.00x (1.95-2.05) | - | ok |") == lines[2]
    assert lines[3].endswith("| spread over 1.5x: ours (up to 1.8x) |")


def test_chart_marks_stand_ins_flags_and_left_out_shapes(tmp_path):
    rows = []
    for shape, mode, notes in (((64, 64, 32, 32), "plain", []),
                               ((64, 64, 32, 32), "masked", ["native*: plain"]),
                               ((32, 64), "plain", [])):
        label = f"{'x'.join(map(str, shape))} nchw float32 {mode}"
        for phase in bench.PHASES:
            row = layer_row(phase, label=label, notes=notes)
            row["case"] = {"shape": list(shape)}
            rows.append(row)
    bench.flag_rows(rows)
    assert bench.chart(rows, tmp_path / "bench.png", repeats=3)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_calls_ours_faster_or_slower_only_when_every_repeat_agrees():
    # The spread (min, median, max) of ours' time over theirs, repeat by repeat.
    assert compare({"min": 0.5, "median": 0.6, "max": 0.99}) == "faster"
    assert compare({"min": 1.01, "median": 1.2, "max": 1.5}) == "slower"
    assert compare({"min": 0.7, "median": 0.8, "max": 1.1}) == "equal"  # one repeat slower
    assert compare({"min": 0.9, "median": 1.1, "max": 1.3}) == "equal"  # one repeat faster


# Samples (ms) of ours and torch.nn whose paired ratios land on each side of 1, or across it.
FASTER = {"ours": (2.0, 2.1, 1.9), "native": (4.0, 4.1, 3.9)}  # torch.nn/ours 1.95-2.05
SLOWER = {"ours": (4.0, 4.1, 3.9), "native": (2.0, 2.1, 1.9)}
EQUAL = {"ours": (2.0, 2.1, 1.9), "native": (1.9, 2.2, 2.0)}  # torch.nn/ours 0.95-1.05


def test_verdict_says_per_phase_where_ours_is_faster_slower_and_equal():
    rows = bench.flag_rows([layer_row("forward", **FASTER),
                            layer_row("forward", label="8x4 nc bfloat16 plain", **FASTER),
                            layer_row("forward+backward", limit=4.0, **EQUAL),
                            layer_row("inference", **SLOWER)])
    assert bench.verdict(rows) == [
        "faster than torch.nn: forward 2/2",
        "slower than torch.nn: inference 1/1",
        "equal within the spread: forward+backward 1/1; noisy: 0 of 4 rows, quiet enough to tell"]


def test_verdict_leaves_out_rows_where_a_stand_in_ran():
    rows = bench.flag_rows([layer_row(**FASTER),
                            layer_row(label="8x4 nc float32 masked", notes=["native*"], **SLOWER)])
    assert bench.verdict(rows)[:2] == ["faster than torch.nn: forward 1/1",
                                       "slower than torch.nn: no row"]


def test_verdict_judges_end_to_end_rows_by_their_whole_step():
    # ours 12.0-12.3 ms against torch.nn 10.0-10.2 in every repeat: slower.
    (line,) = [line for line in bench.verdict([], [e2e_row()]) if line.startswith("slower")]
    assert line == "slower than torch.nn: training step 1/1"
    faster = e2e_row(ours=(9.0, 9.1, 9.0))
    assert bench.verdict([], [faster])[0] == "faster than torch.nn: training step 1/1"


def test_verdict_calls_the_machine_too_noisy_when_over_a_quarter_of_the_rows_spread_wide():
    wide = {"ours": (2.0, 2.1, 3.2), "native": (4.0, 4.1, 6.3)}  # both over 1.5x (max/min)
    steady = [layer_row(**FASTER) for _ in range(3)]
    quiet = bench.verdict(bench.flag_rows([*steady, layer_row(**wide)]))  # 1 of 4: a quarter
    assert quiet[2].endswith("; noisy: 1 of 4 rows, quiet enough to tell")
    noisy = bench.verdict(bench.flag_rows([*steady[:2], layer_row(**wide), layer_row(**wide)]))
    assert noisy[2].endswith("; noisy: 2 of 4 rows, too noisy to tell")
    copy_only = layer_row(**FASTER)
    copy_only["samples_ms"]["copy"] = [1.0, 1.0, 1.6]  # the reference copy's repeats count too
    assert bench.noisy(copy_only) and not bench.noisy(layer_row(**FASTER))


def test_verdict_too_long_for_the_width_gives_the_counts_alone():
    phases = [f"phase {'x' * 12} {i}" for i in range(8)]
    rows = bench.flag_rows([layer_row(phase, **FASTER) for phase in phases])
    assert bench.verdict(rows)[0] == "faster than torch.nn: 8 of 8 rows"


def e2e_row(load="none", torch_nn=(10.0, 10.2, 10.1), ours=(12.0, 12.1, 12.3),
            none=(8.0, 8.1, 8.0), **extra):
    samples = {e2e.TORCH: list(torch_nn), e2e.OURS: list(ours), e2e.NONE: list(none), **extra}
    row = {"model": "mlp", "batch": 32, "phase": "training step", "load": load,
           "samples_ms": samples, **e2e.summarize(samples)}
    row["flags"] = e2e.flags(row, bench.SPREAD_LIMIT)
    return row


def test_end_to_end_costs_are_paired_differences_and_the_ratio_theirs():
    row = e2e_row()
    assert row["cost_ms"][e2e.TORCH] == pytest.approx({"min": 2.0, "median": 2.1, "max": 2.1})
    assert row["cost_ms"][e2e.OURS] == pytest.approx({"min": 4.0, "median": 4.0, "max": 4.3})
    assert row["cost_ratio"][e2e.OURS] == pytest.approx(4.0 / 2.1)
    assert row["step_ratio"][e2e.OURS] == pytest.approx(
        {"min": 12.1 / 10.2, "median": 12.0 / 10.0, "max": 12.3 / 10.1})
    assert row["flags"] == []


def test_end_to_end_table_formatting():
    rows = [e2e_row(), e2e_row("1 process, 2 busy threads", torch_nn=(10.0, 8.0, 16.0))]
    lines = e2e.table(rows).splitlines()
    assert lines[0] == ("| model | batch | phase | load | torch.nn ms | batchnorm ms | "
                        "no norm ms | BN cost torch.nn ms | BN cost ours ms | "
                        "ours/torch.nn cost ratio | ours/torch.nn step | flags |")
    assert len(lines[1].split("|")) == len(lines[0].split("|"))
    assert lines[2] == ("| mlp | 32 | training step | none | 10.10 (10.00-10.20) | "
                        "12.10 (12.00-12.30) | 8.00 (8.00-8.10) | 2.10 (2.00-2.10) | "
                        "4.00 (4.00-4.30) | 1.90x | 1.20x (1.19-1.22) | ok |")
    assert "spread over 1.5x: torch.nn (up to 2.0x); BN cost within the noise: torch.nn" in lines[3]


def test_end_to_end_table_has_a_fused_column_only_when_measured():
    fused = e2e_row(**{e2e.FUSED: [11.0, 11.1, 11.2]})
    head = e2e.table([fused]).splitlines()[0]
    assert "| batchnorm fused activation ms |" in head
    assert "| fused/torch.nn cost ratio |" in head
    assert "fused" not in e2e.table([e2e_row()]).splitlines()[0]


def test_models_and_their_norm_free_copies():
    resnet = e2e.resnet18()
    norms = [m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 20
    assert e2e.input_shape("resnet18", 32) == (32, 3, 32, 32)
    bare = e2e.without_norm(resnet)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bare.modules())
    assert len(norms) == 20  # the original keeps its layers
    models = e2e.contenders("mlp")
    assert set(models) >= {e2e.TORCH, e2e.OURS, e2e.NONE}
    assert (e2e.FUSED in models) == e2e.fused_supported()
    x = torch.randn(8, 256)
    for model in models.values():
        assert model.eval()(x).shape == (8, 10)


def test_end_to_end_measurement_smoke():
    probes = iter([{"slowdown": 1.0}, {"slowdown": 3.0}] + [{"slowdown": 1.0}] * 10)
    rows = e2e.measure([("mlp", 32)], repeats=2, budget=0.001, warmup=1,
                       probe=lambda: next(probes),
                       flag_probe=lambda c: "contended" if c["slowdown"] > 2 else None)
    assert rows[0]["contention"] == {"slowdown": 3.0}  # the worst of its probes
    assert rows[0]["flags"][0] == "contended" and "contended" not in rows[1]["flags"]
    assert [r["phase"] for r in rows] == list(e2e.PHASES)
    for row in rows:
        assert {e2e.TORCH, e2e.OURS, e2e.NONE} <= set(row["samples_ms"])
        assert all(len(v) == 2 and min(v) > 0 for v in row["samples_ms"].values())
        assert math.isfinite(row["step_ratio"][e2e.OURS]["median"])
    assert "| mlp | 32 | evaluation | none |" in e2e.table(rows)


def test_busy_load_is_started_and_killed():
    with e2e.busy(30, threads=1) as load:
        assert load == "1 process, 1 busy threads"


def test_bench_command_writes_json_and_a_table(tmp_path, capsys):
    from batchnorm.__main__ import main

    assert main(["bench", "--shapes", "8,4,6,6", "--modes", "plain", "masked", "--dtypes",
                 "float32", "--layouts", "nchw", "--repeats", "2", "--budget", "0.001",
                 "--compile", "none", "--no-tf", "--no-distributed", "--no-memory",
                 "--no-end-to-end", "--no-keras", "--no-per-call", "--no-norm-cost",
                 "--allocators", "reuse", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {r["phase"] for r in report["results"]} == set(bench.PHASES)
    assert all(math.isfinite(r["ours_ms"]) and r["limit_ms"] > 0 for r in report["results"])
    assert all("flags" in r and len(r["samples_ms"]["ours"]) == 2 for r in report["results"])
    assert report["allocators"]["reuse"]["torch_threads"] == 1
    assert not {"memory", "end_to_end", "per_call", "norm_cost"} & set(report)
    out = capsys.readouterr().out
    assert "### `reuse` allocator, 8x4x6x6 nchw float32" in out
    assert "| masked | forward+backward |" in out
    assert "torch 1 intra-op" in out and "numba 1 threads" in out
    assert "MALLOC_MMAP_THRESHOLD_" in out
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == [
        "faster than torch.nn", "slower than torch.nn", "equal within the spread"]
    assert lines[4] == "# batchnorm benchmark"
    assert lines[6].startswith(("No row flagged", "**WARNING", "The machine was busy"))
    assert max(len(line) for line in lines) <= WIDTH


def environment(threads=2):
    return {"torch": "2.13.0+cpu", "numba": "0.68.1", "python": "3.11.7",
            "cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 2, "torch_threads": threads,
            "torch_interop_threads": 2, "numba_threads": threads, "numba_threading_layer": "omp",
            "allocator_env": {k: str(1 << 40) for k in bench.ALLOCATORS["reuse"]},
            "thread_env": {"OMP_NUM_THREADS": str(threads)}, "load_average": "5.5 4.7 3.0",
            "contention": {"threads": threads, "parallel_ms": 8.0, "serial_ms": 1.0,
                           "slowdown": 8.0}}


def every_section(wide: bool):
    """A report with every section and its longest cells (bench.run's ``report``), rendered."""
    rows = []
    for allocator in ("default", "reuse"):
        for mode in bench.MODES:
            for phase in bench.PHASES:
                row = layer_row(phase, label=f"65536x256 nc bfloat16 {mode}", allocator=allocator,
                                ours=(10.0, 12.0, 19.0), native=(1234.5, 1300.1, 1400.2),
                                notes=["native*: plain"] if mode in ("renorm", "masked") else ())
                row["samples_ms"].update(compiled=[11.0, 12.0, 13.0], tf_keras=[20.0, 21.0, 22.0],
                                         copy=[1.0, 1.2, 1.1])
                row["limit_ms"] = 30.0 if phase == "forward" else 8.0  # flags "cannot be"
                row["limit_spread_ms"] = {"min": 7.0, "median": 8.0, "max": 9.5}
                row["compile_s"] = 21.3
                rows.append(row)
    bench.flag_rows(rows, contention={"reuse": environment()["contention"]})
    fused = {e2e.FUSED: [11.0, 11.1, 11.2]}
    e2e_rows = [e2e_row(load, **fused) for load in ("none", "1 process, 2 busy threads")]
    for row in e2e_rows:
        row.update(model="resnet18", batch=256, phase="training step")
        row["flags"].insert(0, "thread contention: 2 threads 8.0x slower than 1 on a parallel op")
    report = {
        "allocators": {"default": environment(), "reuse": environment()}, "results": rows,
        "load_average": 5.5, "cores": 2, "threads": None,
        "tf_environment": {"tensorflow": "tensorflow 2.16.1, tf_keras 2.16.0"},
        "end_to_end": {"allocator": "reuse", "environment": environment(), "rows": e2e_rows,
                       "fused": True, "settings": {"repeats": 3}},
        "memory": [{"contender": "ours (activation=relu)", "peak_mib": 123.4}],
        "first_call": {"empty numba cache": {"first_step_s": 123.45}},
        "distributed": {"environment": "torch 2.13.0+cpu, Python 3.11.7, " + "x" * 60,
                        "rows": [{"processes": 4, "batch": [32, 64, 16, 16], "local_ms": 1234.5,
                                  "synchronized_ms": 2345.6, "communication_ms": 1111.1,
                                  "communication_share": 0.47}]},
        "keras": {"rows": [{"row": "layer fwd+bwd 64x56x56x64",
                            "batchnorm": {"min": 0.261, "median": 0.404, "max": 0.528},
                            "keras": {"min": 1.021, "median": 1.684, "max": 1.833},
                            "speedup": 4.0}]},
        "per_call": {"allocator": "reuse", "environment": environment(1),
                     "settings": {"repeats": 3}, "rows": [
                         {"shape": [32, 64, 8, 8], "dtype": "bfloat16", "mode": mode,
                          "phase": phase, "flags": ["spread over 1.5x: ours (up to 12.3x)"],
                          "samples_ms": {"ours": [12.3456, 1.2], "torch.nn": [0.0123, 0.1]},
                          **measure.paired([12.3456, 1.2], [0.0123, 0.1],
                                           per_call.TARGETS[phase])}
                         for mode in per_call.MODES for phase in per_call.PHASES]},
        "norm_cost": {"allocator": "reuse", "environment": environment(1),
                      "settings": {"repeats": 3}, "rows": [
                          {"model": "resnet18", "batch": 256, "part": part, "phase": phase,
                           "flags": ["thread contention: 2 threads 8.0x slower than 1"],
                           "samples_ms": {"ours": [1234.5, 12.3], "torch.nn": [1.23, 123.4]},
                           **measure.paired([1234.5, 12.3], [1.23, 123.4], 0.6)}
                          for part in ("norm+ReLU fused", "whole step fused")
                          for phase in (*norm_cost.PARTS, "training step")]},
        "seconds": {"layers, default allocator": 100.0, "layers, reuse allocator": 100.0,
                    "end-to-end, quiet and under load": 300.0, "memory and first call": 30.0,
                    "synchronized statistics": 60.0, "total": 600.0}}
    args = SimpleNamespace(quick=False, repeats=11, wide=wide)
    return bench.render(report, args, "/opt/tf/bin/python", True, bench.Path("bench-results"))


def test_the_output_fits_100_columns():
    text = every_section(wide=False)
    assert WIDTH == 100
    assert max(len(line) for line in text.splitlines()) <= 100
    for section in ("## Layers", "## End to end", "## Per call", "## Normalization's own cost",
                    "## Peak memory", "## Synchronized", "## Keras 3 on the torch backend"):
        assert section in text
    assert "| layer fwd+bwd 64x56x56x64 | 404.00 (261.00-528.00) | 1684.00 (1021.00-1833.00) | " \
           "4.00x |" in text
    # ours 10.0, 12.0, 19.0 ms against native 1234.5, 1300.1, 1400.2: native/ours 123.45,
    # 108.34, 73.69 repeat by repeat; the limit, 8.0 ms, is 67% of ours' median.
    assert "| masked | inference | 12.0 | 108.34x (73.69-123.45)* | - | 67% | [12] |" in text
    assert "- [12] masked inference: thread contention: 2 threads 8.0x slower" in text
    assert "| mode | phase | compiled / ours | tf_keras / ours |" in text


def test_wide_output_has_one_full_table_per_section():
    text = every_section(wide=True)
    assert text.splitlines()[:3] == every_section(wide=False).splitlines()[:3]  # the verdict
    assert "| allocator | case | phase | ours ms | native ms |" in text
    assert "| model | batch | phase | load | torch.nn ms |" in text
    assert max(len(line) for line in text.splitlines()) > 100


def test_end_to_end_narrow_table_gives_the_step_ratio_verdict_and_costs():
    # ours over torch.nn repeat by repeat: 12.0/10.0, 12.1/10.2, 12.3/10.1 (all over 1: slower);
    # 9.0/10.0, 9.1/10.2, 9.0/10.1 (all under 1: faster); 12.0/10.0, 12.1/8.0, 12.3/16.0 (across).
    rows = [e2e_row(), e2e_row(ours=(9.0, 9.1, 9.0)), e2e_row(torch_nn=(10.0, 8.0, 16.0))]
    lines = e2e.narrow_table(rows)
    assert lines[1:6] == [
        "| model | batch | phase | ours / torch.nn | verdict | flags |",
        "|---|---:|---|---:|---|---|",
        "| mlp | 32 | training step | 1.20x (1.19-1.22) | slower | ok |",
        "| mlp | 32 | training step | 0.89x (0.89-0.90) | faster | ok |",
        "| mlp | 32 | training step | 1.20x (0.77-1.51) | equal | [1] |"]
    assert lines[7].startswith("- [1] mlp batch 32 training step: spread over 1.5x: torch.nn")
    assert lines[10] == "| model | batch | phase | torch.nn ms | BN cost torch.nn | BN cost ours |"
    assert max(len(line) for line in lines) <= WIDTH


# ---------------------------------------------------------------- per call, every mode


def test_paired_gives_ratio_and_difference_spreads_and_whether_the_target_is_met():
    # ours 1.2, 1.1, 1.5 against 1.0, 1.0, 1.2: ratios 1.2, 1.1, 1.25; differences 0.2, 0.1, 0.3
    row = measure.paired([1.2, 1.1, 1.5], [1.0, 1.0, 1.2], target=1.2)
    assert row["ratio"] == pytest.approx({"min": 1.1, "median": 1.2, "max": 1.25}, rel=1e-12)
    assert row["difference"] == pytest.approx({"min": 0.1, "median": 0.2, "max": 0.3}, rel=1e-12)
    assert row["met"] is True and row["target"] == 1.2
    assert measure.paired([1.3], [1.0], target=1.2)["met"] is False
    assert "met" not in measure.paired([1.3], [1.0])


def test_bench_options_for_the_per_call_and_norm_cost_parts_parse():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    defaults = parser.parse_args([])
    assert defaults.layers and defaults.per_call and defaults.norm_cost
    assert defaults.per_call_modes == list(per_call.MODES)
    assert defaults.norm_cost_models == ["resnet18", "mlp"]
    args = parser.parse_args(["--no-layers", "--no-per-call", "--norm-cost",
                              "--per-call-modes", "renorm", "axis=-1", "momentum=None",
                              "--norm-cost-models", "mlp"])
    assert (args.layers, args.per_call, args.norm_cost) == (False, False, True)
    assert args.per_call_modes == ["renorm", "axis=-1", "momentum=None"]
    assert args.norm_cost_models == ["mlp"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--per-call-modes", "sometimes"])


def test_per_call_modes_cover_the_modes_asked_for_and_channels_last_only_in_4d():
    assert set(per_call.MODES) == {
        "plain", "renorm", "ghost", "masked", "adjustment", "debias", "momentum=None",
        "unbiased", "relu", "channels-last", "axis=-1"}
    assert "channels-last" not in per_call.modes_for((32, 64))
    assert per_call.modes_for((32, 64, 8, 8)) == list(per_call.MODES)
    assert per_call.TARGETS == {"forward": 1.3, "forward+backward": 1.2, "inference": 1.1}


def test_every_mode_options_build_a_layer_that_runs():
    gen = torch.Generator().manual_seed(0)
    for mode in per_call.MODES:
        options, mask = bench_modes.mode_options(mode, (8, 4, 2, 2), gen)
        x = torch.randn(8, 2, 2, 4) if mode == "axis=-1" else torch.randn(8, 4, 2, 2)
        layer = bn.BatchNorm(4, **{"axis": 1, **options})
        assert layer(x, mask=mask).shape == x.shape
    with pytest.raises(ValueError, match="'sometimes' is not one of"):
        bench_modes.mode_options("sometimes", (8, 4), gen)


def test_per_call_rows_time_ours_against_torch_nn_in_every_mode_and_phase():
    rows = per_call.measure(shapes=[(8, 4, 2, 2)], dtypes=["float32"], repeats=2, budget=1e-4)
    assert [(r["mode"], r["phase"]) for r in rows] == [
        (m, p) for m in per_call.MODES for p in per_call.PHASES]
    for r in rows:
        assert set(r["samples_ms"]) == {"ours", "torch.nn"}
        assert all(len(v) == 2 and min(v) > 0 for v in r["samples_ms"].values())
        assert r["target"] == per_call.TARGETS[r["phase"]]
        assert r["met"] == (r["ratio"]["median"] <= r["target"])
    lines = per_call.narrow_table(rows)
    assert lines[1] == "### 8x4x2x2 float32"
    assert lines[3] == ("| mode | phase | ours us | torch.nn us | ours / torch.nn | extra us | "
                        "target met | flags |")
    assert max(len(line) for line in lines) <= WIDTH
    assert per_call.summary(rows).startswith("Targets met: forward ")


# ---------------------------------------------------------------- normalization's cost in models


def test_norm_cost_units_pair_each_batch_norm_with_the_relu_fusing_replaces():
    models = e2e.contenders("resnet18", width=8)
    units = norm_cost.units(models[e2e.TORCH], models[e2e.FUSED], torch.randn(2, 3, 32, 32))
    assert len(units) == 20  # every BatchNorm2d; the stem's and each block's first are fused
    assert [u for u in units if u[1]] == [("1", "2")] + [
        (f"{block}.bn1", f"{block}.relu1") for block in range(3, 11)]
    mlp = e2e.contenders("mlp")
    assert norm_cost.units(mlp[e2e.TORCH], mlp[e2e.FUSED], torch.randn(4, 256)) == [
        ("1", "2"), ("4", "5"), ("7", "8")]


def test_layer_timers_time_the_norm_and_its_unit_and_come_off_cleanly():
    models = e2e.contenders("mlp")
    x = torch.randn(16, 256)
    units = norm_cost.units(models[e2e.TORCH], models[e2e.FUSED], x)
    timers = {name: norm_cost.LayerTimers(model, units) for name, model in models.items()
              if name != e2e.NONE}
    for name, timer in timers.items():
        models[name](x).sum().backward()
        totals = timer.take()
        assert all(t > 0 for t in totals.values()), (name, totals)
        # The unit's interval holds the norm's, forward and backward.
        assert totals["unit forward"] >= totals["norm forward"]
        assert totals["unit backward"] >= totals["norm backward"]
        assert set(timer.take().values()) == {0.0}  # taken: reset
        timer.remove()
        assert not any(m._forward_hooks or m._forward_pre_hooks
                       for m in models[name].modules())


def test_norm_cost_rows_have_layer_sums_whole_steps_and_targets():
    probes = iter([{"slowdown": 3.0}] + [{"slowdown": 1.0}] * 10)
    rows = norm_cost.measure([("mlp", 32)], repeats=2, budget=1e-3, warmup=1,
                             probe=lambda: next(probes),
                             flag_probe=lambda c: "contended" if c["slowdown"] > 2 else None)
    assert [(r["part"], r["phase"]) for r in rows] == [
        (part, phase) for part in ("norm", "norm+ReLU fused")
        for phase in norm_cost.PARTS] + [("whole step", "training step"),
                                         ("whole step fused", "training step")]
    for r in rows:
        assert r["target"] == 1.0 and r["flags"][0] == "contended"
        assert all(len(v) == 2 and min(v) > 0 for v in r["samples_ms"].values())
    by_phase = {r["phase"]: r for r in rows[:3]}
    # forward+backward is each step's forward plus backward, averaged over the same steps:
    # equal up to float64 rounding of sums of a few numbers.
    for name in ("ours", "torch.nn"):
        both = [f + b for f, b in zip(by_phase["forward"]["samples_ms"][name],
                                      by_phase["backward"]["samples_ms"][name], strict=True)]
        assert by_phase["forward+backward"]["samples_ms"][name] == pytest.approx(both, rel=1e-9)
    lines = norm_cost.narrow_table(rows)
    assert lines[1] == "### mlp, batch 32"
    assert lines[3] == ("| part | phase | torch.nn ms | ours ms | ours / torch.nn | target met | "
                        "flags |")
    assert max(len(line) for line in lines) <= WIDTH


@pytest.mark.slow  # two benchmark processes: ~30 s on the loaded 2-core machine
def test_bench_command_writes_the_per_call_and_norm_cost_rows(tmp_path, capsys):
    from batchnorm.__main__ import main

    assert main(["bench", "--quick", "--no-layers", "--no-end-to-end", "--no-tf", "--no-keras",
                 "--per-call-modes", "plain", "masked", "--norm-cost-models", "mlp",
                 "--repeats", "2", "--budget", "0.0005", "--end-to-end-repeats", "2",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["results"] == [] and "end_to_end" not in report
    rows = report["per_call"]["rows"]
    assert len(rows) == 2 * 2 * 2 * 3  # shapes, dtypes, modes, phases
    assert {r["mode"] for r in rows} == {"plain", "masked"}
    assert report["per_call"]["environment"]["torch_threads"] == 1  # one thread by default
    cost = report["norm_cost"]["rows"]
    assert {(r["model"], r["batch"]) for r in cost} == {("mlp", 32), ("mlp", 256)}
    assert len(cost) == 2 * 8
    out = capsys.readouterr().out
    assert "## Per call: every mode against torch.nn's plain module" in out
    assert "## Normalization's own cost inside a model" in out
    assert "## Layers" not in out
    assert max(len(line) for line in out.splitlines()) <= WIDTH
