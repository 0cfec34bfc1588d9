"""The harness (bench_utils.py) and the report (report.py) on hand-built inputs: every expected
number is written in the test, worked out by hand from the inputs."""

import dataclasses
import io
import json
import math
import os
import socket
import subprocess
import sys
import types
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import bench_utils as bu
import packing
import report as rp
from bench_helpers import FakeClock, fake_run, pairs_report, rerank_report, table_rows

RESULTS = Path(__file__).resolve().parent.parent / "results" / "cpu-epyc-2core"

# ---------------------------------------------------------------- statistics

TIMES = [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("last, mean, std, median, lo, hi", [
    (1, 5.0, 0.0, 5.0, 5.0, 5.0),
    (3, 4.0, math.sqrt(2 / 3), 4.0, 3.0, 5.0),  # deviations -1, 0, 1: population variance 2/3
    (5, 3.0, math.sqrt(2.0), 3.0, 1.0, 5.0),  # sqrt(10 / 5), not the sample std sqrt(10 / 4)
    # fewer times than `last`: all 7; variance = mean of squares 217 / 7 - (33 / 7)^2 = 430 / 49
    (10, 33 / 7, math.sqrt(430) / 7, 4.0, 1.0, 9.0),
])
def test_summarize_known_values(last, mean, std, median, lo, hi):
    s = bu.summarize(TIMES, last=last)
    assert s.mean == pytest.approx(mean) and s.std == pytest.approx(std)
    assert (s.median, s.min, s.max) == (median, lo, hi)
    assert s.n == min(last, 7) and s.n_total == 7 and s.all_times == TIMES
    assert bu.summarize(TIMES) == bu.summarize(TIMES, last=5)  # the original's last 5 by default


@pytest.mark.parametrize("times, last, message", [([], 5, "at least one"), ([1.0], 0, "last must be >= 1")])
def test_summarize_rejects(times, last, message):
    with pytest.raises(ValueError, match=message):
        bu.summarize(times, last=last)


def test_percentiles_queries_per_s_throughput_padding():
    p = bu.percentiles([float(i) for i in range(1, 101)])  # numpy's linear interpolation
    assert p == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert bu.percentiles([0.2]) == {"p50": 0.2, "p90": 0.2, "p99": 0.2}
    assert bu.queries_per_s([0.1, 0.3]) == pytest.approx(5.0)
    assert bu.throughput(1024, 195_000, 0.5) == (2048.0, 390_000.0)
    assert bu.padding_efficiency(750, 1000) == 0.75


# ---------------------------------------------------------------- timing


@pytest.fixture
def sync_log(monkeypatch):
    log = []
    monkeypatch.setattr(bu.torch.cuda, "synchronize", lambda device=None: log.append(("sync", str(device))))
    return log


@pytest.mark.parametrize("device, synced", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_sync_waits_for_the_gpu_only_on_cuda(device, synced, sync_log):
    bu.sync(device)
    assert sync_log == ([("sync", device)] if synced else [])


def test_time_call_reads_the_clock_after_the_gpu_finished(monkeypatch, sync_log):
    clock = FakeClock(sync_log).install(monkeypatch)

    def fn():
        sync_log.append("fn")
        clock.advance(0.25)

    assert bu.time_call(fn, "cuda") == 0.25
    # synchronize, start the clock, call, synchronize again, stop the clock
    assert sync_log == [("sync", "cuda"), "clock", "fn", ("sync", "cuda"), "clock"]


@pytest.mark.parametrize("warmup_calls", [0, 1, 3, 6])
def test_run_timed_counts_warmups_and_runs_in_order(warmup_calls, monkeypatch):
    clock = FakeClock().install(monkeypatch)
    calls = []

    def fn(w):
        calls.append(w)
        clock.advance(1.0)

    workloads = ["w0", "w1", "w2", "w3"]
    r = bu.run_timed("setup", fn, workloads, device="cpu", warmup_calls=warmup_calls, progress=False)
    assert calls == [workloads[i % 4] for i in range(warmup_calls)] + workloads  # each timed one once, in order
    assert (r.warmup_calls, r.runs_planned, r.warmup_s) == (warmup_calls, 4, float(warmup_calls))
    assert r.times == [1.0] * 4 and r.complete is True and r.summary.n == 4


def test_run_timed_keeps_warmup_time_and_inputs_apart(monkeypatch):
    clock = FakeClock().install(monkeypatch)
    calls = []

    def fn(w):
        calls.append(w)
        clock.advance(w)
        return 2 * w

    r = bu.run_timed("s", fn, [1.0, 2.0, 3.0], device="cpu", warmup_calls=2, progress=False, warmup_workloads=[5.0],
                     keep_outputs=True)
    assert calls == [5.0, 5.0, 1.0, 2.0, 3.0] and r.outputs == [2.0, 4.0, 6.0]
    assert r.warmup_s == 10.0 and r.times == [1.0, 2.0, 3.0] and r.summary.mean == 2.0
    assert "outputs" not in rp.to_json(r)  # scores are compared in the run, not saved


@pytest.mark.parametrize("interrupt_at", [0, 2, 4])
def test_run_timed_keyboard_interrupt_keeps_finished_runs(interrupt_at):
    calls = []

    def fn(w):
        if w == interrupt_at:
            raise KeyboardInterrupt
        calls.append(w)

    r = bu.run_timed("s", fn, list(range(6)), device="cpu", warmup_calls=2, progress=False, warmup_workloads=["warm"])
    assert r.complete is False
    assert len(r.times) == interrupt_at and calls == ["warm", "warm"] + list(range(interrupt_at))
    assert (r.summary is None) if interrupt_at == 0 else (r.summary.n == min(interrupt_at, 5))


def test_run_timed_interrupt_during_warmup():
    def fn(w):
        raise KeyboardInterrupt

    r = bu.run_timed("s", fn, [1, 2], device="cpu", warmup_calls=3, progress=False)
    assert r.complete is False and r.times == [] and r.summary is None and r.warmup_calls == 0


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty, progress, shown", [(True, True, True), (True, False, False), (False, True, False)])
def test_run_timed_progress_bar_only_on_a_terminal_unless_quiet(tty, progress, shown, monkeypatch):
    err = _FakeTTY() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bu.run_timed("setup-x", lambda w: w, [1, 2, 3], device="cpu", warmup_calls=2, progress=progress)
    text = err.getvalue()
    assert ("setup-x:" in text and "/3 [" in text) is shown
    assert ("warm-up" in text) is shown


# ---------------------------------------------------------------- FLOPs and the compute floor


@pytest.mark.parametrize("length, dims, expected", [
    # 12 * (2*128*(4*768^2 + 2*768*3072) + 4*128^2*768) = 12 * (1_811_939_328 + 50_331_648)
    (128, {}, 22_347_251_712.0),
    # One token of XLM-R base: its encoder holds 12 * (4*768^2 + 2*768*3072) = 84,934,656 matmul
    # weights, 2 FLOPs each, plus attention 12 * 4 * 768 = 36,864.
    (1, {}, 169_906_176.0),
    # 2 layers of (2*3*(4*16 + 2*4*8) + 4*9*4) = 2 * (768 + 144)
    (3, {"hidden": 4, "intermediate": 8, "layers": 2}, 1824.0),
    (2, {"hidden": 2, "intermediate": 4, "layers": 1}, 160.0),  # 2*2*(16 + 16) + 4*4*2
    (0, {}, 0.0),
])
def test_flops_per_sequence_by_hand(length, dims, expected):
    assert bu.flops_per_sequence(length, **dims) == expected


def test_workload_flops_and_summary_by_hand():
    # DESIGN.md: the seed workload (1024 pairs, mean 191 tokens) is ~34.7 TFLOP per run
    assert bu.workload_flops([191] * 1024) == pytest.approx(34.7e12, rel=0.01)
    dims = {"hidden": 2, "intermediate": 4, "layers": 1}  # flops(L) = 64 L + 8 L^2: 160 at L=2, 384 at L=4
    w = bu.workload_summary("pairs", [[2, 4], [2, 2, 2, 2]], **dims)
    assert w == bu.Workload(kind="pairs", calls=2, pairs=3.0, real_tokens=7.0, mean_tokens_per_pair=14 / 6,
                            max_tokens_per_pair=4, flops=(544.0 + 640.0) / 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        bu.workload_summary("nope", [[1]])
    with pytest.raises(ValueError, match="non-empty"):
        bu.workload_summary("pairs", [[]])


def test_gemm_rate_and_compute_floor(monkeypatch):
    timed = []

    def one_ms_per_matmul(a, b, iters):
        timed.append((tuple(a.shape), b.shape[1], a.dtype, iters))
        return 1e-3

    monkeypatch.setattr(bu, "_time_matmul", one_ms_per_matmul)
    monkeypatch.setattr(bu.torch, "randn", lambda *shape, **kw: torch.empty(*shape, dtype=kw["dtype"], device="meta"))
    monkeypatch.setattr(bu, "native_cpu_dtype", lambda: torch.float32)
    g = bu.measure_gemm_tflops("cpu", torch.bfloat16)
    # CPU without native bf16: fp32 (bf16 is emulated there), T=1024, 3 iterations; qkv, out, MLP up, MLP down
    assert timed == [((1024, 768), 2304, torch.float32, 3), ((1024, 768), 768, torch.float32, 3),
                     ((1024, 768), 3072, torch.float32, 3), ((1024, 3072), 768, torch.float32, 3)]
    # 2 * 1024 * 768 * (2304 + 768 + 3072 + 3072) FLOPs in 4 ms
    assert g.tflops == pytest.approx(14_495_514_624 / 4e-3 / 1e12)
    assert g.shapes[0] == bu.GemmShape(1024, 768, 2304, 3_623_878_656.0, 1e-3, pytest.approx(3.623878656))
    assert (g.device, g.dtype, g.iters) == ("cpu", "float32", 3)
    assert g.label == "CPU float32 GEMM at T=1024 (indicative only, not a GPU floor)"
    monkeypatch.setattr(bu, "native_cpu_dtype", lambda: torch.bfloat16)  # AVX-512 BF16 or AMX: measured in bf16
    timed.clear()
    assert bu.measure_gemm_tflops("cpu", torch.bfloat16).dtype == "bfloat16"
    assert {dtype for *_, dtype, _ in timed} == {torch.bfloat16}
    assert bu.measure_gemm_tflops("cpu", torch.float16).dtype == "float32"
    gemm = bu.GemmMeasurement("cpu", "float32", 3, [], 2.0, "x")  # the floor: 1 TFLOP at 2 TFLOP/s
    assert bu.compute_floor(1e12, gemm) == bu.Compute(gemm=gemm, tflops=2.0, flops=1e12, floor_s=0.5, label="x")
    assert bu.floor_seconds(34.7e12, 590.0) == pytest.approx(0.0588, rel=1e-3)  # DESIGN.md's H200 floor


def test_time_matmul_cpu_is_seconds_per_call(monkeypatch):
    readings = iter([0.0, 0.6])  # before the timed loop, after it
    monkeypatch.setattr(bu, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    a, b = torch.ones(2, 3), torch.ones(3, 4)
    assert bu._time_matmul(a, b, iters=3) == pytest.approx(0.2)


class _OnDevice:
    """A stand-in tensor that claims a device and counts its matmuls: the real tensors stay on the CPU."""

    def __init__(self, device, log):
        self.device, self.log = torch.device(device), log

    def __matmul__(self, other):
        self.log.append("matmul")


def test_gemm_rate_on_cuda_1_times_cuda_1s_stream(monkeypatch):
    """Event.record() without a stream records on the current device's stream (torch/cuda/streams.py):
    with the matmuls on cuda:1 and the current device cuda:0, the events would time an idle stream
    and put the floor near zero. Every event, synchronize and tensor names cuda:1."""
    log, created = [], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.stream = None
            created.append(self)

        def record(self, stream=None):
            self.stream = stream
            log.append(("record", stream))

        def elapsed_time(self, end):
            assert (self.stream, end.stream) == (("stream of", torch.device("cuda:1")),) * 2
            return 6.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", torch.device(device)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync", torch.device(device))))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU of {torch.device(device)}")
    made = []

    def randn(*shape, device=None, dtype=None):
        made.append(torch.device(device))
        return _OnDevice(device, log)

    monkeypatch.setattr(bu.torch, "randn", randn)
    g = bu.measure_gemm_tflops("cuda:1", torch.bfloat16, shapes=[(4, 8, 16)], iters=3)
    cuda1 = torch.device("cuda:1")
    assert made == [cuda1, cuda1]
    stream = ("record", ("stream of", cuda1))
    # 3 untimed matmuls, then synchronize, start, 3 timed matmuls, end, synchronize: all on cuda:1
    assert log == ["matmul"] * 3 + [("sync", cuda1), stream] + ["matmul"] * 3 + [stream, ("sync", cuda1)]
    assert len(created) == 2 and g.shapes[0].seconds == pytest.approx(6e-3 / 3)  # ms -> s, per matmul
    assert g.label == "measured bfloat16 GEMM at model shapes on GPU of cuda:1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_gemm_tflops_cuda():
    g = bu.measure_gemm_tflops("cuda", torch.bfloat16, iters=5)
    assert g.dtype == "bfloat16" and g.tflops > 1.0


# ---------------------------------------------------------------- agreement


def test_kendall_tau_known_permutations():
    a = [0.1, 0.5, 0.3, 0.9, 0.7]
    assert bu.kendall_tau(a, a) == pytest.approx(1.0)
    assert bu.kendall_tau(a, [-x for x in a]) == pytest.approx(-1.0)
    # one swapped adjacent pair out of 10: (9 - 1) / 10
    assert bu.kendall_tau([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.8)
    assert bu.kendall_tau(torch.tensor(a), np.array(a)) == pytest.approx(1.0)
    for constant_or_short in (([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [3.0, 3.0]), ([1.0], [1.0])):
        assert math.isnan(bu.kendall_tau(*constant_or_short))  # no ranking to compare


@pytest.mark.parametrize("b,k,expected", [
    (list(range(20)), 10, 1.0),          # identical
    (list(range(19, -1, -1)), 10, 0.0),  # reversed: top 10 and bottom 10 are disjoint
    (list(range(19, -1, -1)), 20, 1.0),  # k = n: everything is shared
    ([19, 18, 17, 16, 15] + list(range(15)), 10, 0.5),
    (list(range(20)), 50, 1.0),          # k larger than n is clamped
])
def test_top_k_overlap(b, k, expected):
    assert bu.top_k_overlap(list(range(20)), b, k) == expected


def test_ranking_agreement_means_over_queries():
    q = [[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]]
    r = bu.ranking_agreement(q, [[1.0, 2.0, 3.0], [-3.0, -1.0, -2.0]], k=1)
    assert r == bu.RankingAgreement(kendall_tau=pytest.approx(0.0), top_k_overlap=0.5, k=1)


def test_score_diff():
    assert bu.score_diff([0.5, 0.25, 1.0], np.array([0.5, 0.5, 0.0])) == bu.ScoreDiff(1.0, pytest.approx(1.25 / 3))
    with pytest.raises(ValueError, match="length"):
        bu.score_diff([1.0], [1.0, 2.0])


# ---------------------------------------------------------------- environment


def test_environment_has_versions_and_no_hostname():
    env = bu.environment("cpu", torch.float32)
    assert env.torch == torch.__version__ and env.numpy == np.__version__
    assert env.python == ".".join(map(str, sys.version_info[:3]))
    for version in (env.transformers, env.sentence_transformers, env.tokenizers):
        assert version and version[0].isdigit()
    assert env.dtype == "float32" and env.gpu is None and env.cpu and env.device == "cpu"
    assert env.flash_attn_installed is packing.flash_attn_available()
    assert datetime.fromisoformat(env.timestamp_utc).utcoffset().total_seconds() == 0
    host = socket.gethostname()
    if len(host) > 3:
        assert host not in json.dumps(rp.to_json(env))
    bu.reset_peak_memory("cpu")
    assert bu.peak_memory("cpu") is None


# ---------------------------------------------------------------- report records


def test_add_setup_derives_the_numbers_of_the_primary_run():
    base, fast = pairs_report().setups
    assert (base.primary, base.time_s, base.baseline, fast.baseline) == ("unsorted", 0.2961, True, False)
    assert fast.pairs_per_s == pytest.approx(1024 / 0.2595)
    assert fast.tokens_per_s == pytest.approx(191 * 1024 / 0.2595)
    assert fast.x_floor == pytest.approx(0.2595 / 0.059) and fast.mfu == pytest.approx(0.059 / 0.2595)
    assert fast.warmup_s == 3.0 and fast.complete is True
    base, fast = rerank_report().setups  # rerank: the mean and percentiles over every query
    assert base.time_s == pytest.approx(0.0105) and fast.time_s == pytest.approx(0.002625)
    assert base.p50_s == pytest.approx(0.0105) and base.p99_s == pytest.approx(0.01981)
    assert base.queries_per_s == pytest.approx(20 / 0.210)


def test_add_setup_needs_a_run_and_known_fields():
    report = pairs_report()
    with pytest.raises(ValueError, match="needs a sorted, unsorted or latency run"):
        rp.add_setup(report, "empty")
    with pytest.raises(TypeError, match="host_seconds"):
        rp.add_setup(report, "typo", sorted=fake_run(0.1, 0.01), host_seconds=1.0)


def test_setup_without_floor_has_no_x_floor():
    report = pairs_report(floor_s=None)
    assert all(s.x_floor is None and s.mfu is None for s in report.setups)
    header = table_rows(rp.format_markdown(report))[0]
    assert "x floor" not in header and "MFU" not in header and "pairs/s" in header


# ---------------------------------------------------------------- tables


def test_markdown_rows_pairs_by_hand():
    # 1024 pairs, 195,584 tokens: baseline 0.2961 s -> 3,458 pairs/s, 660,534 tokens/s, 5.02x a
    # 0.059 s floor (20% MFU); compiled 0.2595 s -> 1.14x, 3,946, 753,696, 4.40x (23%); 3 GiB.
    # kendall_tau is NaN everywhere: no column.
    assert table_rows(rp.format_markdown(pairs_report())) == [
        "| Setup | Sorted Inputs (s) | Unsorted Inputs (s) | Speedup | max \\|score diff\\| | pairs/s | tokens/s "
        "| x floor | MFU | peak mem (GiB) | compile (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| baseline | 0.2658 ± 0.0119 | 0.2961 ± 0.0089 | 1.00x | 0.0e+00 | 3,458 | 660,534 | 5.02x | 20% "
        "| 3.00 | 40.2 |",
        "| compiled | 0.2089 ± 0.0196 | 0.2595 ± 0.0077 | 1.14x | 3.1e-03 | 3,946 | 753,696 | 4.40x | 23% "
        "| 3.00 | 40.2 |",
    ]


def test_markdown_rows_rerank_by_hand():
    # baseline: queries take 1..20 ms: p50 10.5, p90 18 + 0.1 = 18.1, p99 19 + 0.81 = 19.81 ms,
    # 20 queries / 0.210 s; 50 pairs (10,000 tokens) in 10.5 ms. Fast: a quarter of each.
    assert table_rows(rp.format_markdown(rerank_report()))[2:] == [
        "| CrossEncoder | 10.5 | 18.1 | 19.8 | 95.2 | 1.00x | - | - | 4,762 | 952,381 |",
        "| DynamicCrossEncoder | 2.6 | 4.5 | 5.0 | 381.0 | 4.00x | 0.9800 | 0.90 | 19,048 | 3,809,524 |",
    ]


def test_preamble_and_footer_by_hand():
    lines = rp.format_table(pairs_report()).splitlines()
    assert lines[:5] == [
        "Cross-encoder benchmark: pairs workload, 1024 pairs per run, batch 64, max_length 512, bfloat16",
        "NVIDIA H100 80GB HBM3, torch 2.11.0, transformers 5.17.0, sentence-transformers 6.0.1",
        "Model: random-weight synthetic twin (full)",
        "Work per timed call: 195,584 real tokens, 34.60 TFLOP",
        "Compute floor: 0.059 s per call at 600 TFLOP/s (test)",
    ]
    assert lines[-2:] == [
        "Times: mean ± std (population) over the last 5 of 5 runs. Speedup vs baseline, pairs/s and x floor "
        "use unsorted inputs.",
        "INCOMPLETE: the run stopped before every setup finished.",  # complete was never set
    ]


def test_footer_names_forward_time_truthfully():
    report = pairs_report()
    report.setups[1].host_s, report.setups[1].forward_s = 0.05, 0.1
    text = rp.format_table(report)
    assert "GPU kernel time" not in text and "idle gaps" in text and "CUDA events" in text
    row = next(line for line in text.splitlines() if line.startswith("compiled"))
    assert row.split()[-4:-2] == ["0.0500", "0.1000"]  # host (s), forward (s), then peak mem, compile


def test_text_table_marks_interrupted_runs_and_missing_cells():
    report = pairs_report()
    rp.add_setup(report, "partial", sorted=fake_run(0.3, 0.01, complete=False, n=2))
    text = rp.format_table(report)
    row = next(line for line in text.splitlines() if line.startswith("partial"))
    assert row.split()[1:6] == ["0.3000", "±", "0.0100*", "-", "0.99x"]  # sorted*, no unsorted, 0.2961 / 0.3
    assert "* interrupted: fewer runs than planned." in text


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize("make", [pairs_report, rerank_report])
def test_json_round_trip_gives_the_same_report(make, tmp_path):
    report = make()
    loaded = rp.load_json(rp.write_json(report, tmp_path / "r.json"))
    assert rp.format_markdown(loaded) == rp.format_markdown(report)
    assert rp.to_json(loaded) == rp.to_json(report)
    assert isinstance(loaded.setups[0].primary, str) and isinstance(loaded.environment, bu.Environment)
    if make is rerank_report:  # NaN (pairs_report's tau) is not equal to itself
        assert loaded == report


def test_json_leaves_out_numbers_a_setup_does_not_have(tmp_path):
    report = pairs_report()
    report.setups[0].load_s = float("nan")
    saved = json.loads(Path(rp.write_json(report, tmp_path / "r.json")).read_text())
    base = saved["setups"][0]
    assert "kendall_tau" not in base  # NaN: no ranking to compare, like no number at all
    assert base["peak_mem_bytes"] == 3 * 2**30 and base["attention"] is None  # always written
    assert base["load_s"] is None  # NaN is written as null: strict JSON
    assert "host_s" not in base and "latency" not in base and "p50_s" not in base
    assert saved["config"]["batch_size"] == 64 and saved["complete"] is False
    assert base["unsorted"]["summary"]["all_times"] == [0.2961 - 0.0089, 0.2961 + 0.0089] * 2 + [0.2961]


@pytest.mark.parametrize("name", ["combined-default", "combined-tiny-pairs", "combined-tiny-rerank"])
def test_committed_results_read_back_one_to_one(name):
    path = RESULTS / f"{name}.json"
    report = rp.load_json(path)
    assert rp.to_json(report) == json.loads(path.read_text())  # every key maps to a field, both ways
    # The table rows are the ones the run printed when it wrote the file.
    printed = (RESULTS / f"{name}.txt").read_text().splitlines()
    rows = table_rows(rp.format_markdown(report))
    assert len(rows) == 2 + len(report.setups) and all(row in printed for row in rows)


def test_write_json_is_atomic_and_keeps_complete_flag(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.json"
    report = pairs_report()
    rp.write_json(report, path)
    assert json.loads(path.read_text())["complete"] is False
    report.complete = True
    old = os.umask(0o022)
    try:
        rp.write_json(report, path)  # callable again after each setup
    finally:
        os.umask(old)
    assert json.loads(path.read_text())["complete"] is True
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's owner-only: a report is for everyone
    assert os.listdir(path.parent) == ["r.json"]  # no temp file left behind

    def broken_dump(obj, f, **kw):
        f.write('{"half": ')
        raise RuntimeError("disk full")

    monkeypatch.setattr(rp.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        rp.write_json(report, path)
    assert json.loads(path.read_text())["complete"] is True  # the old file is intact
    assert os.listdir(path.parent) == ["r.json"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "no 'setups' key"),
    ('{"setups": [], "config": {}}', "environment"),  # a required field missing
    ('{"setups": [{"baseline": true}], "config": {}, "environment": {}, "model_source": "m", '
     '"workload": {"kind": "pairs"}}', "calls"),
])
def test_load_json_rejects_other_files(content, message, tmp_path):
    p = tmp_path / "x.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=f"not a benchmark report.*{message}"):
        rp.load_json(p)


def test_a_new_setup_field_is_saved_and_shown(monkeypatch):
    """Adding a per-setup number: a SetupResult field and a Column are all it takes."""
    Extended = dataclasses.make_dataclass("Extended", [("host_pairs_per_s", float | None, dataclasses.field(
        default=None, metadata=rp.OMIT_NONE))], bases=(rp.SetupResult,))
    monkeypatch.setattr(rp, "SetupResult", Extended)
    monkeypatch.setattr(rp, "COLUMNS", rp.COLUMNS + [rp.Column("host pairs/s", "host_pairs_per_s", ",.0f", "h")])
    report = rerank_report()
    rp.add_setup(report, "new", latency=report.setups[0].latency, host_pairs_per_s=12345.6)
    assert table_rows(rp.format_markdown(report))[-1].endswith("| 12,346 |")
    assert rp.to_json(report)["setups"][-1]["host_pairs_per_s"] == 12345.6


# ---------------------------------------------------------------- plot and CLI


@pytest.mark.parametrize("make", [pairs_report, rerank_report])
def test_plot_writes_png(make, tmp_path):
    pytest.importorskip("matplotlib")
    out = rp.plot(make(), tmp_path / "plots" / "bench.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_prints_markdown_and_table(tmp_path, capsys):
    path = rp.write_json(pairs_report(), tmp_path / "r.json")
    script = os.path.join(os.path.dirname(rp.__file__), "report.py")
    out = subprocess.run([sys.executable, script, "--markdown", path], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == rp.format_markdown(pairs_report()) + "\n"
    path = rp.write_json(rerank_report(), tmp_path / "r.json")
    assert rp.main(["--table", path]) == 0
    assert capsys.readouterr().out == rp.format_table(rerank_report()) + "\n"


@pytest.mark.parametrize("argv", [["--markdown", "nope.json"], ["--table", "nope.json"], []])
def test_cli_errors_exit_2_without_traceback(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        rp.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and ("nope.json" in err or "at least one" in err)


def test_cli_help_explains_every_column(capsys):
    with pytest.raises(SystemExit):
        rp.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for column in rp.LATENCY_COLUMNS + rp.COLUMNS:
        assert f"{column.header}: {column.help}" in out
    assert "idle gaps between the events included" in out
