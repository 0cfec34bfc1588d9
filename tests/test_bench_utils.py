import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from datetime import datetime

import numpy as np
import pytest
import torch

import bench_utils as bu

# The seed's H100 numbers, as a report would hold them.
SEED_TIMES = {
    "baseline": {"sorted": (0.2658, 0.0119), "unsorted": (0.2961, 0.0089)},
    "compiled": {"sorted": (0.2089, 0.0196), "unsorted": (0.2595, 0.0077)},
}


def fake_run(mean, std, complete=True, n=5):
    times = [mean - std, mean + std] * (n // 2) + [mean] * (n % 2)
    summary = {"mean": mean, "std": std, "median": mean, "min": mean - std, "max": mean + std,
               "n": n, "n_total": n, "all_times": times}
    return {"name": "x", "times": times, "summary": summary, "warmup_s": 1.5, "warmup_calls": 10,
            "runs_planned": n, "complete": complete}


def pairs_report(**compute):
    cfg = bu.BenchConfig(device="cpu", dtype="bfloat16")
    env = {"gpu": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "torch": "2.11.0", "transformers": "5.17.0",
           "sentence_transformers": "6.0.1"}
    workload = bu.workload_summary("pairs", [[190] * 1024, [192] * 1024])
    report = bu.new_report(cfg, environment=env, model_source="random-weight synthetic twin (full)",
                           workload=workload, compute=compute or {"floor_s": 0.059, "tflops": 600.0, "label": "test"})
    for name, orders in SEED_TIMES.items():
        runs = {o: fake_run(*ms) for o, ms in orders.items()}
        extras = {"max_abs_diff": 0.0 if name == "baseline" else 3.1e-3, "kendall_tau": float("nan"),
                  "peak_mem_bytes": np.int64(3 * 2**30), "compile_s": np.float64(40.2)}
        bu.add_setup(report, name, **runs, **extras)
    return report


def rerank_report():
    cfg = bu.BenchConfig(workload="rerank", num_queries=20, docs_per_query=50)
    workload = bu.workload_summary("rerank", [[200] * 50] * 20)
    report = bu.new_report(cfg, environment={"cpu": "test cpu", "dtype": "float32"},
                           model_source="local: /models/x", workload=workload)
    for name, scale in (("CrossEncoder", 1.0), ("DynamicCrossEncoder", 0.5)):
        times = [scale * 0.010 * (1 + i / 20) for i in range(20)]
        run = {"name": name, "times": times, "summary": bu.summarize(times), "warmup_s": 0.3,
               "warmup_calls": 2, "runs_planned": 20, "complete": True}
        bu.add_setup(report, name, latency=run, kendall_tau=0.98, top10_overlap=0.9)
    report["complete"] = True
    return report


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("last", [1, 3, 5, 10])
def test_summarize_uses_last_n_like_numpy(last):
    times = [0.9, 0.5, 0.31, 0.27, 0.26, 0.25, 0.28, 0.24, 0.27, 0.29]
    s = bu.summarize(times, last=last)
    window = np.array(times[-last:])
    assert s["mean"] == float(np.mean(window))
    assert s["std"] == float(np.std(window))  # population std, as the original's np.std
    assert (s["median"], s["min"], s["max"]) == (float(np.median(window)), window.min(), window.max())
    assert s["n"] == last and s["n_total"] == 10 and s["all_times"] == times


def test_summarize_default_is_last_five_with_known_numbers():
    s = bu.summarize([100.0, 100.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["mean"] == 3.0
    assert s["std"] == pytest.approx(math.sqrt(2.0))  # population: sqrt(10 / 5), not sqrt(10 / 4)
    assert s["n"] == 5


def test_summarize_fewer_than_last_uses_all():
    s = bu.summarize([1.0, 3.0])
    assert s["n"] == 2 and s["mean"] == 2.0 and s["std"] == 1.0


def test_summarize_empty_raises():
    with pytest.raises(ValueError, match="at least one"):
        bu.summarize([])


def test_percentiles_linear_interpolation():
    times = [float(i) for i in range(1, 101)]
    p = bu.percentiles(times)
    assert p == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert bu.percentiles([0.2]) == {"p50": 0.2, "p90": 0.2, "p99": 0.2}


def test_queries_per_s_and_throughput():
    assert bu.queries_per_s([0.1, 0.3]) == pytest.approx(5.0)
    assert bu.throughput(1024, 195_000, 0.5) == {"pairs_per_s": 2048.0, "tokens_per_s": 390_000.0}
    assert bu.padding_efficiency(750, 1000) == 0.75


# ---------------------------------------------------------------- timing


def test_time_call_measures_the_call():
    assert bu.time_call(lambda: time.sleep(0.02), "cpu") >= 0.02


def test_sync_is_a_no_op_on_cpu():
    assert bu.sync("cpu") is None


@pytest.mark.parametrize("warmup_calls", [0, 1, 3, 6])
def test_run_timed_counts_warmups_and_runs_in_order(warmup_calls):
    calls = []
    workloads = ["w0", "w1", "w2", "w3"]
    r = bu.run_timed("setup", calls.append, workloads, device="cpu", warmup_calls=warmup_calls, progress=False)
    warm = [workloads[i % 4] for i in range(warmup_calls)]
    assert calls == warm + workloads  # each timed workload exactly once, in order, after the warm-ups
    assert r["warmup_calls"] == warmup_calls and r["runs_planned"] == 4
    assert len(r["times"]) == 4 and all(t > 0 for t in r["times"])
    assert r["complete"] is True and r["summary"]["n"] == 4 and r["warmup_s"] >= 0


def test_run_timed_separate_warmup_inputs_and_outputs():
    calls = []

    def fn(w):
        calls.append(w)
        return w * 2

    r = bu.run_timed("s", fn, [1, 2], device="cpu", warmup_calls=3, progress=False,
                     warmup_workloads=[10], keep_outputs=True)
    assert calls == [10, 10, 10, 1, 2]
    assert r["outputs"] == [2, 4]


def test_run_timed_warmup_time_is_not_in_times():
    def fn(w):
        time.sleep(0.05 if w == "slow" else 0.0)

    r = bu.run_timed("s", fn, ["fast"] * 3, device="cpu", warmup_calls=2, progress=False,
                     warmup_workloads=["slow"])
    assert r["warmup_s"] >= 0.1
    assert max(r["times"]) < 0.05


@pytest.mark.parametrize("interrupt_at", [0, 2, 4])
def test_run_timed_keyboard_interrupt_keeps_finished_runs(interrupt_at):
    calls = []

    def fn(w):
        if w == interrupt_at:
            raise KeyboardInterrupt
        calls.append(w)

    r = bu.run_timed("s", fn, list(range(6)), device="cpu", warmup_calls=2, progress=False,
                     warmup_workloads=["warm"])
    assert r["complete"] is False
    assert len(r["times"]) == interrupt_at and calls == ["warm", "warm"] + list(range(interrupt_at))
    assert (r["summary"] is None) if interrupt_at == 0 else (r["summary"]["n"] == min(interrupt_at, 5))


def test_run_timed_interrupt_during_warmup():
    def fn(w):
        raise KeyboardInterrupt

    r = bu.run_timed("s", fn, [1, 2], device="cpu", warmup_calls=3, progress=False)
    assert r["complete"] is False and r["times"] == [] and r["summary"] is None and r["warmup_calls"] == 0


# ---------------------------------------------------------------- compute floor


@pytest.mark.parametrize("length,dims,expected", [
    # 12 * (2*128*(4*768^2 + 2*768*3072) + 4*128^2*768) = 12 * (1_811_939_328 + 50_331_648)
    (128, {}, 22_347_251_712.0),
    # 2*2*(4*4 + 2*2*4) + 4*4*2 = 128 + 32
    (2, {"hidden": 2, "intermediate": 4, "layers": 1}, 160.0),
    (0, {}, 0.0),
])
def test_flops_per_sequence_formula(length, dims, expected):
    assert bu.flops_per_sequence(length, **dims) == expected


def test_flops_match_the_design_numbers():
    # ~170 MFLOP per token of dense work; a 191-token pair adds ~1.3 GFLOP of attention.
    assert bu.flops_per_sequence(1) == pytest.approx(12 * (2 * 7_077_888 + 4 * 768))
    assert bu.workload_flops([191] * 1024) == pytest.approx(34.5e12, rel=0.01)


def test_workload_flops_and_summary():
    dims = {"hidden": 2, "intermediate": 4, "layers": 1}
    assert bu.workload_flops([2, 2, 0], **dims) == 320.0
    w = bu.workload_summary("pairs", [[2, 4], [2, 2, 2, 2]], **dims)
    assert w["calls"] == 2 and w["pairs"] == 3.0 and w["real_tokens"] == 7.0
    assert w["max_tokens_per_pair"] == 4 and w["mean_tokens_per_pair"] == pytest.approx(14 / 6)
    assert w["flops"] == pytest.approx((bu.workload_flops([2, 4], **dims) + 4 * 160.0) / 2)
    with pytest.raises(ValueError):
        bu.workload_summary("nope", [[1]])


def test_floor_seconds():
    assert bu.floor_seconds(34.7e12, 590.0) == pytest.approx(0.0588, rel=1e-3)
    c = bu.compute_floor(1e12, {"tflops": 2.0, "label": "x"})
    assert c["floor_s"] == 0.5 and c["flops"] == 1e12


def test_measure_gemm_tflops_cpu_is_fast_and_labelled():
    t0 = time.perf_counter()
    g = bu.measure_gemm_tflops("cpu", "bfloat16")
    assert time.perf_counter() - t0 < 2.0
    assert g["dtype"] == "float32" and "CPU" in g["label"] and g["device"] == "cpu"
    assert [(r["m"], r["k"], r["n"]) for r in g["shapes"]] == bu.model_gemm_shapes(1024)
    assert all(r["tflops"] > 0 for r in g["shapes"])
    total = sum(r["flops"] for r in g["shapes"]) / sum(r["seconds"] for r in g["shapes"]) / 1e12
    assert g["tflops"] == pytest.approx(total)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_gemm_tflops_cuda():
    g = bu.measure_gemm_tflops("cuda", torch.bfloat16, iters=5)
    assert g["dtype"] == "bfloat16" and g["tflops"] > 1.0


# ---------------------------------------------------------------- agreement


def test_kendall_tau_known_permutations():
    a = [0.1, 0.5, 0.3, 0.9, 0.7]
    assert bu.kendall_tau(a, a) == pytest.approx(1.0)
    assert bu.kendall_tau(a, [-x for x in a]) == pytest.approx(-1.0)
    # one swapped adjacent pair out of 10: (9 - 1) / 10
    assert bu.kendall_tau([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.8)
    assert bu.kendall_tau(torch.tensor(a), np.array(a)) == pytest.approx(1.0)


@pytest.mark.parametrize("a,b", [([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [3.0, 3.0]), ([1.0], [1.0])])
def test_kendall_tau_constant_or_short_is_nan(a, b):
    assert math.isnan(bu.kendall_tau(a, b))


@pytest.mark.parametrize("b,k,expected", [
    (list(range(20)), 10, 1.0),          # identical
    (list(range(19, -1, -1)), 10, 0.0),  # reversed: top 10 and bottom 10 are disjoint
    (list(range(19, -1, -1)), 20, 1.0),  # k = n: everything is shared
    ([19, 18, 17, 16, 15] + list(range(15)), 10, 0.5),
    (list(range(20)), 50, 1.0),          # k larger than n is clamped
])
def test_top_k_overlap(b, k, expected):
    a = list(range(20))
    assert bu.top_k_overlap(a, b, k) == expected


def test_ranking_agreement_means_over_queries():
    q = [[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]]
    r = bu.ranking_agreement(q, [[1.0, 2.0, 3.0], [-3.0, -1.0, -2.0]], k=1)
    assert r == {"kendall_tau": pytest.approx(0.0), "top1_overlap": 0.5}


def test_score_diff():
    d = bu.score_diff([0.5, 0.25, 1.0], np.array([0.5, 0.5, 0.0]))
    assert d == {"max_abs": 1.0, "mean_abs": pytest.approx(1.25 / 3)}
    with pytest.raises(ValueError, match="length"):
        bu.score_diff([1.0], [1.0, 2.0])


# ---------------------------------------------------------------- config and environment


def test_bench_config_defaults_and_helpers():
    cfg = bu.BenchConfig()
    assert (cfg.batch_size, cfg.num_pairs, cfg.runs, cfg.max_length, cfg.order) == (64, 1024, 10, 512, "both")
    assert cfg.resolved_warmup("cpu") == 2 and cfg.resolved_warmup("cuda") == 10
    assert bu.BenchConfig(warmup=0).resolved_warmup("cuda") == 0
    assert cfg.orders() == ("sorted", "unsorted") and bu.BenchConfig(order="sorted").orders() == ("sorted",)
    text = str(cfg)
    assert "batch_size" in text and "1024" in text and "max_tokens_per_batch" in text


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"warmup": -1}, "warmup must be >= 0"),
    ({"order": "random"}, "order must be one of"),
    ({"workload": "x"}, "workload must be one of"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_bench_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bu.BenchConfig(**kwargs)


def test_add_bench_arguments_round_trip():
    import argparse

    parser = bu.add_bench_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--batch-size", "32", "--order", "sorted", "--packed", "--warmup", "3"])
    cfg = bu.BenchConfig(**vars(args))
    assert (cfg.batch_size, cfg.order, cfg.packed, cfg.warmup, cfg.num_pairs) == (32, "sorted", True, 3, 1024)
    assert bu.BenchConfig(**vars(parser.parse_args([]))) == bu.BenchConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--order", "random"])


def test_resolve_device_and_dtype():
    assert bu.resolve_device("cpu") == "cpu"
    assert bu.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert bu.resolve_dtype("auto", "cpu") == torch.float32 and bu.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert bu.resolve_dtype("float16", "cpu") == torch.float16


def test_environment_has_versions_and_no_hostname():
    env = bu.environment("cpu", "auto")
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    for key in ("transformers", "sentence_transformers", "tokenizers"):
        assert env[key] and env[key][0].isdigit()
    assert env["dtype"] == "float32" and env["gpu"] is None and env["cpu"]
    assert isinstance(env["flash_attn_installed"], bool)
    assert datetime.fromisoformat(env["timestamp_utc"]).utcoffset().total_seconds() == 0
    host = socket.gethostname()
    if len(host) > 3:
        assert host not in json.dumps(env)


def test_peak_memory_is_none_on_cpu():
    bu.reset_peak_memory("cpu")
    assert bu.peak_memory("cpu") is None


# ---------------------------------------------------------------- report


def test_add_setup_derives_efficiency_numbers():
    report = pairs_report()
    base, fast = report["setups"]
    assert base["primary"] == "unsorted" and base["time_s"] == 0.2961
    assert fast["pairs_per_s"] == pytest.approx(1024 / 0.2595)
    assert fast["tokens_per_s"] == pytest.approx(191 * 1024 / 0.2595)
    assert fast["x_floor"] == pytest.approx(0.2595 / 0.059) and fast["mfu"] == pytest.approx(0.059 / 0.2595)
    assert fast["warmup_s"] == 3.0 and fast["complete"] is True
    with pytest.raises(ValueError):
        bu.add_setup(report, "empty")


def test_add_setup_drops_outputs():
    report = bu.new_report(bu.BenchConfig(), environment={}, model_source="m", workload={"kind": "pairs"})
    run = dict(fake_run(0.1, 0.01), outputs=[np.zeros(3)])
    s = bu.add_setup(report, "s", sorted=run)
    assert "outputs" not in s["sorted"] and s["primary"] == "sorted" and "x_floor" not in s


def test_format_table_has_original_columns_and_numbers():
    text = bu.format_table(pairs_report())
    for header in ("Setup", "Sorted Inputs (s)", "Unsorted Inputs (s)", "Speedup", "max |score diff|",
                   "pairs/s", "x floor", "peak mem (GiB)", "compile (s)"):
        assert header in text
    assert "0.2658 ± 0.0119" in text and "0.2595 ± 0.0077" in text
    assert "1.00x" in text and f"{0.2961 / 0.2595:.2f}x" in text
    assert "3.1e-03" in text and f"{1024 / 0.2595:,.0f}" in text and f"{0.2595 / 0.059:.2f}x" in text
    assert "NVIDIA H100" in text and "random-weight synthetic twin" in text
    assert "tau" not in text.split("\n\n")[1]  # only NaN values: the column is left out
    assert "INCOMPLETE" in text  # complete was never set


def test_format_table_marks_interrupted_runs_and_missing_cells():
    report = pairs_report()
    bu.add_setup(report, "partial", sorted=fake_run(0.3, 0.01, complete=False, n=2))
    text = bu.format_table(report)
    row = next(line for line in text.splitlines() if line.startswith("partial"))
    assert "0.3000 ± 0.0100*" in row and " - " in row
    assert "interrupted" in text


def test_format_table_rerank_columns():
    text = bu.format_table(rerank_report())
    for header in ("p50 (ms)", "p90 (ms)", "p99 (ms)", "queries/s", "tau", "top-10", "Speedup"):
        assert header in text
    assert "Sorted Inputs" not in text and "x floor" not in text and "INCOMPLETE" not in text
    p = bu.percentiles([0.010 * (1 + i / 20) for i in range(20)])
    assert f"{p['p99'] * 1e3:.1f}" in text and "2.00x" in text


@pytest.mark.parametrize("make", [pairs_report, rerank_report])
def test_markdown_from_json_round_trip_equals_markdown_from_dict(make, tmp_path):
    report = make()
    md = bu.format_markdown(report)
    loaded = bu.load_json(bu.write_json(report, tmp_path / "r.json"))
    assert bu.format_markdown(loaded) == md
    assert bu.format_table(loaded) == bu.format_table(report)
    header, sep = md.split("\n\n")[2].splitlines()[:2]
    assert header.startswith("| Setup |") and sep.startswith("| --- |")
    if make is pairs_report:
        assert "max \\|score diff\\|" in header and "| 0.2658 ± 0.0119 |" in md


def test_write_json_is_atomic_and_keeps_complete_flag(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.json"
    report = pairs_report()
    bu.write_json(report, path)
    data = json.loads(path.read_text())
    assert data["complete"] is False and len(data["setups"]) == 2
    assert data["setups"][0]["kendall_tau"] is None  # NaN is written as null: strict JSON
    assert data["setups"][0]["peak_mem_bytes"] == 3 * 2**30 and data["config"]["batch_size"] == 64
    report["complete"] = True
    bu.write_json(report, path)  # callable again after each setup
    assert json.loads(path.read_text())["complete"] is True
    assert os.listdir(path.parent) == ["r.json"]  # no temp file left behind

    def broken_dump(obj, f, **kw):
        f.write('{"half": ')
        raise RuntimeError("disk full")

    monkeypatch.setattr(bu.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        bu.write_json(report, path)
    assert json.loads(path.read_text())["complete"] is True  # the old file is intact
    assert os.listdir(path.parent) == ["r.json"]


def test_load_json_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a benchmark report"):
        bu.load_json(p)


@pytest.mark.parametrize("make", [pairs_report, rerank_report])
def test_plot_writes_png(make, tmp_path):
    pytest.importorskip("matplotlib")
    out = bu.plot(make(), tmp_path / "plots" / "bench.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_prints_markdown(tmp_path):
    path = bu.write_json(pairs_report(), tmp_path / "r.json")
    script = os.path.join(os.path.dirname(bu.__file__), "bench_utils.py")
    out = subprocess.run([sys.executable, script, "--markdown", path], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == bu.format_markdown(bu.load_json(path)) + "\n"


@pytest.mark.parametrize("argv", [["--markdown", "nope.json"], ["--table", "nope.json"], []])
def test_cli_errors_exit_2_without_traceback(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        bu.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and ("nope.json" in err or "at least one" in err)


def test_cli_table_in_process(tmp_path, capsys):
    path = bu.write_json(rerank_report(), tmp_path / "r.json")
    assert bu.main(["--table", path]) == 0
    assert "p50 (ms)" in capsys.readouterr().out


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


def test_write_json_file_is_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        path = bu.write_json({"complete": True}, tmp_path / "r.json")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
