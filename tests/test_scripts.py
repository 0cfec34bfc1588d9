"""The run scripts end to end on the tiny twin (CPU), their configuration and flags, their reports
and errors, and the installable form of the flat modules."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark
import data
import report as rp
from device_policy import cpu_capabilities, cpu_dtype
import run_basic
import run_combined
import run_torch_compile
from bench_helpers import table_rows, text_row_cells

ROOT = Path(__file__).resolve().parent.parent
# fp32 asked for: these runs check the exact path (the CPU default is bf16 where the CPU has it)
SMALL = ["--model", "synthetic-tiny", "--device", "cpu", "--num-pairs", "12", "--runs", "2", "--warmup", "1",
         "--batch-size", "4", "--dtype", "float32", "--quiet"]
SETUPS = ["CrossEncoder (baseline)", "DynamicCrossEncoder (x16 buckets)", "DynamicCrossEncoder packed"]


@pytest.fixture(scope="module")
def combined(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("combined")
    argv = SMALL + ["--json", str(out / "out.json"), "--markdown", "--plot", str(out / "out.png"), "--check-fp32"]
    return run_combined.main(argv), out


# ---------------------------------------------------------------- end to end


def test_combined_json_and_plot(combined):
    report, out = combined
    saved = json.loads((out / "out.json").read_text())
    assert saved["complete"] is True and [s["name"] for s in saved["setups"]] == SETUPS
    env = saved["environment"]
    assert (env["device"], env["dtype"], env["gpu"], env["torch"]) == ("cpu", "float32", None, torch.__version__)
    assert "random-weight" in saved["model_source"]
    # the config as it ran: flags, and device defaults resolved for the CPU
    config = saved["config"]
    assert (config["batch_size"], config["dtype"], config["compile_mode"]) == (4, "float32", "default")
    assert saved["workload"]["calls"] == 2 and saved["workload"]["pairs"] == 12
    for setup in saved["setups"]:
        for order in ("sorted", "unsorted"):
            assert len(setup[order]["times"]) == 2 and all(t > 0 for t in setup[order]["times"])
            assert setup[order]["runs_planned"] == 2 and setup[order]["warmup_calls"] == 1
    # optimized rows carry their difference from the baseline; fp32 tolerance: summation order only
    for setup in saved["setups"][1:]:
        assert setup["max_abs_diff"] < 1e-5 and 0 < setup["padding_efficiency"] <= 1
        assert setup["host_s"] > 0 and setup["forward_s"] > 0 and setup["compile_s"] > 0
    assert "max_abs_diff" not in saved["setups"][0] and "host_s" not in saved["setups"][0]
    assert all(s["fp32_max_abs_diff"] < 1e-5 for s in saved["setups"])
    assert rp.load_json(out / "out.json") == report  # the file holds what the run returned
    assert (out / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "out.png").stat().st_size > 10_000


def test_combined_table_cells_come_from_the_runs(combined):
    report, _ = combined
    text = rp.format_table(report)
    header = text_row_cells(text, "Setup")
    assert header == ["Setup", "Sorted Inputs (s)", "Unsorted Inputs (s)", "Speedup", "max |score diff|", "vs fp32",
                      "pairs/s", "tokens/s", "pad eff.", "x floor", "MFU", "host (s)", "forward (s)", "host pairs/s",
                      "tok pairs/s", "new shapes", "compile (s)"]
    base_time = float(np.mean(report.setups[0].unsorted.times))  # 2 runs: the mean of both
    for setup in report.setups:
        cells = dict(zip(header, text_row_cells(text, setup.name)))
        assert len(cells) == len(header)
        for order in ("sorted", "unsorted"):
            times = getattr(setup, order).times
            assert cells[f"{order.capitalize()} Inputs (s)"] == f"{np.mean(times):.4f} ± {np.std(times):.4f}"
        assert cells["Speedup"] == f"{base_time / np.mean(setup.unsorted.times):.2f}x"
        assert cells["pairs/s"] == f"{12 / np.mean(setup.unsorted.times):,.0f}"
        # the tokenizer alone is measured beside every setup; the host pipeline beside the fast ones
        assert cells["tok pairs/s"] == f"{setup.tokenizer_pairs_per_s:,.0f}" and setup.tokenizer_pairs_per_s > 0
        if setup.baseline:
            assert cells["host (s)"] == cells["forward (s)"] == cells["max |score diff|"] == cells["host pairs/s"] == "-"
        else:
            assert cells["host (s)"] == f"{setup.host_s:.4f}" and cells["forward (s)"] == f"{setup.forward_s:.4f}"
            assert cells["host pairs/s"] == f"{setup.host_pairs_per_s:,.0f}" and cells["new shapes"] == f"{setup.new_shapes}"


def test_markdown_regenerates_from_json(combined):
    report, out = combined
    rows = table_rows(rp.format_markdown(rp.load_json(out / "out.json")))
    assert rows == table_rows(rp.format_markdown(report))
    assert len(rows) == 2 + 3 and [row.split(" | ")[0] for row in rows[2:]] == [f"| {name}" for name in SETUPS]
    assert all(row.count(" | ") == rows[0].count(" | ") for row in rows)  # 17 cells in every row


def test_basic_and_torch_compile_scripts(tiny_model_dir, tmp_path):
    basic = run_basic.main(SMALL + ["--order", "sorted", "--json", str(tmp_path / "b.json")])
    assert [s.name for s in basic.setups] == ["CrossEncoder (baseline)"]
    assert basic.setups[0].attention == "sentence-transformers CrossEncoder, float32, attention: sdpa"
    assert basic.setups[0].unsorted is None and len(basic.setups[0].sorted.times) == 2
    packed = run_torch_compile.main(SMALL + ["--order", "unsorted", "--packed"])
    assert [s.name for s in packed.setups] == ["CrossEncoder (baseline)", "DynamicCrossEncoder packed"]
    assert "packed" in packed.setups[1].attention and packed.setups[1].max_abs_diff < 1e-5


def test_rerank_workload_reports_percentiles_and_ranking(tiny_model_dir, tmp_path, capsys):
    report = run_combined.main(SMALL + ["--workload", "rerank", "--num-queries", "3", "--docs-per-query", "12",
                                       "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    header = text_row_cells(capsys.readouterr().out, "Setup")
    assert header[:6] == ["Setup", "p50 (ms)", "p90 (ms)", "p99 (ms)", "queries/s", "Speedup"]
    assert (report.workload.kind, report.workload.calls, report.workload.pairs) == ("rerank", 3, 12)
    for setup in report.setups:
        times = setup.latency.times
        assert len(times) == 3 and setup.time_s == pytest.approx(np.mean(times))
        assert (setup.p50_s, setup.p90_s, setup.p99_s) == pytest.approx(tuple(np.percentile(times, [50, 90, 99])))
    for setup in report.setups[1:]:
        assert setup.kendall_tau == pytest.approx(1.0) and setup.top10_overlap == pytest.approx(1.0)
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_pairs_file_is_the_workload(tiny_model_dir, tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("query\tdocument\nlorem ipsum\tdolor sit amet\nconsectetur\tadipiscing elit sed\n")
    report = run_basic.main(SMALL + ["--pairs-file", str(path), "--order", "unsorted"])
    assert (report.workload.kind, report.workload.pairs) == ("pairs", 2)


def test_interrupted_run_keeps_finished_setups(tiny_model_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_call = benchmark.call

    def flaky(model, workload, batch_size):
        calls["n"] += 1
        if type(model).__name__ == "DynamicCrossEncoder" and calls["n"] > 4:
            raise KeyboardInterrupt
        return real_call(model, workload, batch_size)

    monkeypatch.setattr(benchmark, "call", flaky)
    path = tmp_path / "partial.json"
    report = run_torch_compile.main(SMALL + ["--order", "unsorted", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["complete"] is False and report.complete is False
    assert [s["name"] for s in saved["setups"]] == ["CrossEncoder (baseline)"] and saved["setups"][0]["complete"]
    assert any("interrupted" in n for n in saved["notes"])


# ---------------------------------------------------------------- errors


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--runs", "-1"], "runs must be >= 1, got -1"),
    (["--warmup", "-1"], "warmup must be >= 0, got -1"),
    (["--max-length", "5000"], "max_length must be <= 1024 (the model's position limit), got 5000"),
    (["--order", "random"], "invalid choice: 'random'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--num-pairs", "ten"], "invalid int value: 'ten'"),
    (["--device", "tpu0"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu0'"),
    pytest.param(["--device", "cuda"], "device 'cuda' needs CUDA, which this machine does not have", marks=NO_CUDA),
    (["--model", "./no/such/dir"], "does not exist"),
    (["--model", "nobody/no-such-model"], "--model synthetic"),
    (["--max-tokens-per-batch", "0"], "max_tokens_per_batch must be >= 1, got 0"),
])
def test_bad_flags_exit_2_with_one_line_before_any_model_loads(argv, message, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(benchmark.models, "load_baseline", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as e:
        run_combined.main(["--device", "cpu", "--model", "synthetic-tiny"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_broken_pairs_file_names_line_2_before_loading_a_model(tmp_path, capsys, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "a", "document": "b"}\n{"query": "a", "document": \n')
    monkeypatch.setattr(benchmark.models, "resolve_model", lambda name: pytest.fail("model resolved before the file"))
    with pytest.raises(SystemExit) as e:
        run_combined.main(["--device", "cpu", "--pairs-file", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and "Traceback" not in err


# ---------------------------------------------------------------- configuration and --help


CPU_DTYPE = str(cpu_dtype(cpu_capabilities())[0]).removeprefix("torch.")  # the policy itself: test_device_policy.py
CPU = {"num_pairs": 8, "runs": 3, "warmup": 1, "batch_size": 8, "num_queries": 4, "docs_per_query": 16,
       "max_tokens_per_batch": 4096, "dtype": CPU_DTYPE, "compile_mode": "default", "packed": True}
CUDA = {"num_pairs": 1024, "runs": 10, "warmup": 10, "batch_size": 64, "num_queries": 100, "docs_per_query": 100,
        "max_tokens_per_batch": 16384, "dtype": "bfloat16", "compile_mode": "max-autotune", "packed": False}


def test_config_resolves_the_device_defaults_once(monkeypatch):
    cfg = benchmark.BenchConfig(device="cpu")
    assert {k: getattr(cfg, k) for k in CPU} == CPU and cfg.torch_dtype == getattr(torch, CPU_DTYPE)
    assert benchmark.BenchConfig(device="cpu", batch_size=32, dtype="bfloat16").batch_size == 32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = benchmark.BenchConfig()  # auto -> cuda
    assert cfg.device == "cuda" and {k: getattr(cfg, k) for k in CUDA} == CUDA
    assert benchmark.BenchConfig(device="cuda:1", warmup=0).warmup == 0
    assert "  batch_size           = 64" in str(cfg).splitlines()


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"warmup": -1}, "warmup must be >= 0"),
    ({"order": "random"}, "order must be one of"),
    ({"workload": "x"}, "workload must be one of"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark.BenchConfig(device="cpu", **kwargs)


def test_report_reads_config_fields_that_exist():
    assert set(rp.SHOWN_SETTINGS) <= set(benchmark.BenchConfig.__dataclass_fields__)


def _flag_help(help_text: str) -> dict[str, str]:
    """--flag -> its help text, whitespace collapsed, from a --help output."""
    text = " ".join(help_text.split("options:")[1].split())
    # the flag (and its --no- form) and its metavar or choices
    flag = r"(--[a-z0-9-]+)(?:, --no-[a-z0-9-]+)?(?: [A-Z_]+| \{[^}]*\})? "
    return {m[1]: m[2] for m in re.finditer(flag + r"(.*?)(?= --[a-z0-9-]+[ ,]|$)", text)}


@pytest.mark.parametrize("script, excluded", [
    (run_basic, {"--packed", "--max-tokens-per-batch", "--compile-mode"}),
    (run_torch_compile, set()),
    (run_combined, {"--packed"}),
])
def test_help_says_each_default_once_and_truly(script, excluded, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    helps = _flag_help(capsys.readouterr().out)
    every = {"--help"} | {"--" + f.replace("_", "-") for f in benchmark.BenchConfig.__dataclass_fields__}
    assert set(helps) == every - excluded
    for flag, text in helps.items():
        assert text.count("(default:") <= 1 and "(default: None)" not in text, f"{flag}: {text}"
    # the device defaults --help states are the ones a config gets on each device
    said = {flag: re.search(r"\(default: (\S+) on CUDA, (\S+) on CPU\)", text) for flag, text in helps.items()}
    said = {flag[2:].replace("-", "_"): m.groups() for flag, m in said.items() if m}
    assert set(said) == {name for name in CPU if "--" + name.replace("_", "-") not in excluded}
    assert {name: cpu for name, (_, cpu) in said.items()} == {name: str(CPU[name]) for name in said}
    assert {name: cuda for name, (cuda, _) in said.items()} == {name: str(CUDA[name]) for name in said}
    assert helps["--max-length"].endswith("(default: 512)") and "(r + 1) * num_pairs" in helps["--seed"]


def test_seed_help_matches_the_workloads():
    cfg = benchmark.BenchConfig(device="cpu", num_pairs=20, runs=3, seed=7)
    w = benchmark.make_workloads(cfg)
    assert w["unsorted"] == [data.load_pairs(20, seed=7 + (r + 1) * 20) for r in range(3)]
    assert w["warmup"] == [data.load_pairs(20, seed=7 + 10_000_000 + r * 20) for r in range(2)]


def test_cpu_defaults_shrink_and_say_so():
    p = benchmark.parser("x")
    cfg, notes = benchmark.parse_config(p, ["--device", "cpu"])
    assert (cfg.num_pairs, cfg.runs, cfg.warmup) == (8, 3, 1)
    assert notes == ["no GPU: defaults shrunk to num_pairs=8, runs=3, warmup=1, batch_size=8, "
                     "max_tokens_per_batch=4096 (set the flags to override)"]  # rerank sizes unused here
    cfg, notes = benchmark.parse_config(p, ["--device", "cpu", "--num-pairs", "1024", "--workload", "rerank"])
    assert cfg.num_pairs == 1024 and notes == ["no GPU: defaults shrunk to runs=3, warmup=1, batch_size=8, "
                                               "num_queries=4, docs_per_query=16, max_tokens_per_batch=4096 "
                                               "(set the flags to override)"]
    _, notes = benchmark.parse_config(benchmark.parser("x", exclude=("max_tokens_per_batch",)),
                                      ["--device", "cpu", "--runs", "2"])
    assert "max_tokens_per_batch" not in notes[0] and "runs" not in notes[0]  # not a flag here / set by the user


def test_workloads_are_fresh_per_run_and_identical_across_orders():
    w = benchmark.make_workloads(benchmark.BenchConfig(device="cpu", num_pairs=20, runs=3))
    runs = [tuple(map(tuple, r)) for r in w["unsorted"]]
    assert len(set(runs[0]) & set(runs[1])) == 0  # seeds spaced by num_pairs: no shared pair
    for sorted_run, unsorted_run in zip(w["sorted"], w["unsorted"]):
        assert sorted(map(tuple, sorted_run)) == sorted(map(tuple, unsorted_run))
        lengths = [len(a) + len(b) for a, b in sorted_run]
        assert lengths == sorted(lengths, reverse=True)
    assert all(len(r) == 20 for r in w["unsorted"])


def test_sorting_and_baseline_padding_by_hand():
    pairs = [["a", "b"], ["ccc", "dd"], ["e", "ffff"], ["g", "h"]]  # 2, 5, 5, 2 characters
    assert benchmark.sort_by_length(pairs) == [["ccc", "dd"], ["e", "ffff"], ["a", "b"], ["g", "h"]]  # stable
    # token lengths 3, 9, 6, 4 -> batches of 2 in that order: (9, 6) padded to 9, (3, 4) padded to 4
    assert benchmark.baseline_padding([3, 9, 6, 4], pairs, 2) == pytest.approx(22 / 26)


def test_last_call_breakdown_reads_attributes():
    timings = type("T", (), dict(tokenize_s=0.5, pack_s=0.25, forward_s=2.0, real_tokens=30, padded_tokens=40))
    assert benchmark.last_call_breakdown(timings) == {"host_s": 0.75, "forward_s": 2.0, "padding_efficiency": 0.75}


# ---------------------------------------------------------------- installable form


def test_pyproject_lists_every_module():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setuptools["py-modules"]) == sorted(p.stem for p in ROOT.glob("*.py"))
    assert setuptools["packages"] == sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def test_pip_install_provides_the_flat_modules(tmp_path):
    pytest.importorskip("setuptools", reason="pip install . needs setuptools (--no-build-isolation)")
    src = tmp_path / "src"
    src.mkdir()
    # A copy: building in place would leave build/ and *.egg-info in the working tree.
    for name in ["pyproject.toml", "requirements.txt"] + [p.name for p in ROOT.glob("*.py")]:
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "families", src / "families", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(target), str(src)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    probe = ("import importlib.util, json, dynamic_cross_encoder; print(json.dumps([dynamic_cross_encoder.__file__] + "
             "[importlib.util.find_spec(m).origin for m in ('models', 'bench_utils', 'report', 'benchmark', 'families.bert')]))")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert all(path.startswith(str(target)) for path in json.loads(out.stdout.splitlines()[-1]))


# ---------------------------------------------------------------- gpu_check.sh, dry runs


def run_gpu_check(out, **env):
    return subprocess.run(["bash", "gpu_check.sh", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def step_exits(log: str) -> dict:
    return {name: int(rc) for name, rc in re.findall(r"^== (\S+): exit (\d+) after \d+ s$", log, re.M)}


def test_gpu_check_needs_an_output_folder():
    done = subprocess.run(["bash", "gpu_check.sh"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2 and "usage: bash gpu_check.sh OUT_DIR" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without CUDA does")
def test_gpu_check_dry_run_writes_every_step(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    done = run_gpu_check(out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dry run: skipping the preflight and the GPU tests (no CUDA)" in done.stdout
    log = (out / "log.txt").read_text()
    assert "no CUDA device: dry run" in log
    assert step_exits(log) == {"combined-pairs": 0, "combined-rerank": 0}
    for name in ("combined-pairs", "combined-rerank"):
        report = json.loads((out / f"{name}.json").read_text())
        # a CPU run in bf16 (the default where the CPU has it) times its fp32 reference as a row
        timed_fp32 = name == "combined-pairs" and report["config"]["dtype"] != "float32"
        assert report["complete"] and len(report["setups"]) == 3 + timed_fp32
    assert log.count("| DynamicCrossEncoder packed |") == 2  # each step's markdown table


# The CUDA branch's steps, most important first, and their limits in seconds (gpu_check.sh's header
# says how each was derived); they add up to the 420 s a lent machine's call leaves.
CUDA_STEPS = {"build-tiny": 20, "preflight": 60, "cuda-default": 150, "build-full": 30, "combined-pairs": 130,
              "gpu-tests": 30}


def test_gpu_check_cuda_branch_fits_a_lent_machine(tmp_path, tiny_model_dir):
    """A lent GPU machine returns at most 8 files, 2 folders deep, from a call of at most 600 s on a
    15-minute lease: the CUDA branch, dry-run on the CPU, must stay within 8 files and 420 s of limits."""
    out = tmp_path / "out"
    done = run_gpu_check(out, GPU_CHECK_FAKE_CUDA="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert "fake CUDA" in log
    limits = {name: int(s) for name, s in re.findall(r"^== (\S+) \(limit (\d+) s\)$", log, re.M)}
    assert limits == CUDA_STEPS and list(limits) == list(CUDA_STEPS)  # in this order
    assert sum(limits.values()) == 420
    assert step_exits(log) == dict.fromkeys(CUDA_STEPS, 0)
    assert "combined-rerank: not run on CUDA" in log
    # each pytest step selected its tests (they skip without CUDA): none ran the preflight twice
    sections = dict(zip(CUDA_STEPS, re.split(r"^== \S+ \(limit \d+ s\)$", log, flags=re.M)[1:]))
    summary = r"^=+ {} skipped, \d+ deselected"
    assert re.search(summary.format(2), sections["preflight"], re.M)
    assert re.search(summary.format(2), sections["cuda-default"], re.M)  # the padded default, then packed
    assert "cuda_default_configuration_replays_cuda_graphs[padded-default-bf16] SKIPPED" in sections["cuda-default"]
    assert "preflight" not in sections["gpu-tests"] and re.search(summary.format(r"\d+"), sections["gpu-tests"], re.M)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files), files
    assert {p.name for p in files} >= {"log.txt", "combined-pairs.json"}


def run_step(tmp_path, name: str, limit: int, code: str):
    """gpu_check.sh's step function alone (the script sourced defines its functions and returns)."""
    script = 'source gpu_check.sh && log=$1 && status=0 && step "$2" "$3" "$4" -c "$5"; echo "status $status"'
    start = time.monotonic()
    done = subprocess.run(["bash", "-c", script, "-", str(tmp_path / "log.txt"), name, str(limit), sys.executable, code],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    return done, (tmp_path / "log.txt").read_text(), time.monotonic() - start


def test_gpu_check_step_that_runs_past_its_limit_keeps_its_output_and_says_so(tmp_path):
    """Interrupted 5 s before its limit (Ctrl-C: pytest prints what passed, run_combined.py writes what
    finished), and so are the processes it started (inductor's compile workers), which would otherwise
    hold the log's pipe open past the limit."""
    code = ("import subprocess, sys, time; subprocess.Popen(['sleep', '100']); print('before the limit', flush=True)\n"
            "try:\n    time.sleep(100)\nexcept KeyboardInterrupt:\n    print('interrupted: writing what finished'); sys.exit(130)")
    done, log, seconds = run_step(tmp_path, "slow", 8, code)
    assert "before the limit" in log and "interrupted: writing what finished" in log
    assert "== slow: timed out: interrupted at 3 s (its limit, 8 s, less 5 s to write what it has)" in log
    assert step_exits(log) == {"slow": 124} and "status 1" in done.stdout
    assert 3 <= seconds < 8, seconds


def test_gpu_check_step_that_ignores_the_interrupt_is_killed_at_its_limit(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('started', flush=True); time.sleep(100)"
    done, log, seconds = run_step(tmp_path, "stuck", 7, code)
    assert "started" in log and "== stuck: timed out" in log and step_exits(log) == {"stuck": 137}
    assert 7 <= seconds < 12, seconds


def test_gpu_check_step_within_its_limit_exits_with_its_status(tmp_path):
    done, log, _ = run_step(tmp_path, "quick", 7, "print('done'); raise SystemExit(3)")
    assert "done" in log and "timed out" not in log and step_exits(log) == {"quick": 3} and "status 1" in done.stdout
    done, log, _ = run_step(tmp_path, "fine", 7, "print('done')")
    assert step_exits(log)["fine"] == 0 and "status 0" in done.stdout
