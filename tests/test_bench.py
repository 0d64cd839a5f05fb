"""The benchmark command (``python -m batchnorm bench``): its table, its trust checks, its
end-to-end rows and its report."""

import json
import math

import pytest
import torch

from batchnorm.apps import bench
from batchnorm.apps import bench_end_to_end as e2e


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
                 "--no-end-to-end", "--allocators", "reuse", "--threads", "1",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {r["phase"] for r in report["results"]} == set(bench.PHASES)
    assert all(math.isfinite(r["ours_ms"]) and r["limit_ms"] > 0 for r in report["results"])
    assert all("flags" in r and len(r["samples_ms"]["ours"]) == 2 for r in report["results"])
    assert report["allocators"]["reuse"]["torch_threads"] == 1
    assert "memory" not in report and "end_to_end" not in report
    out = capsys.readouterr().out
    assert "| reuse | 8x4x6x6 nchw float32 masked | forward+backward |" in out
    assert "torch 1 intra-op" in out and "numba 1 threads" in out
    assert "MALLOC_MMAP_THRESHOLD_" in out
    assert out.splitlines()[2].startswith(("No row flagged", "**WARNING", "The machine was busy"))
