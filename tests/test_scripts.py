"""The three run scripts end to end on the tiny twin (CPU), their reports, and their errors."""

import json

import numpy as np
import pytest

import benchmark
import run_basic
import run_combined
import run_torch_compile

SMALL = ["--model", "synthetic-tiny", "--device", "cpu", "--num-pairs", "12", "--runs", "2", "--warmup", "1", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def combined(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("combined")
    argv = SMALL + ["--json", str(out / "out.json"), "--markdown", "--plot", str(out / "out.png"), "--check-fp32"]
    report = run_combined.main(argv)
    return report, out


def test_combined_table_json_and_plot(combined, capsys):
    report, out = combined
    saved = json.loads((out / "out.json").read_text())
    assert saved["complete"] is True
    names = [s["name"] for s in saved["setups"]]
    assert names == ["CrossEncoder (baseline)", "DynamicCrossEncoder (x16 buckets)", "DynamicCrossEncoder packed"]
    env = saved["environment"]
    for key in ("torch", "transformers", "sentence_transformers", "device", "dtype"):
        assert env[key]
    assert "random-weight" in saved["model_source"]
    assert saved["config"]["batch_size"] == 4
    for setup in saved["setups"]:
        for order in ("sorted", "unsorted"):
            assert len(setup[order]["times"]) == 2 and all(t > 0 for t in setup[order]["times"])
            assert setup[order]["summary"]["mean"] > 0
    # optimized rows carry their difference from the baseline; fp32 tolerance: summation order only
    for setup in saved["setups"][1:]:
        assert setup["max_abs_diff"] < 1e-5
        assert 0 < setup["padding_efficiency"] <= 1
        assert setup["host_s"] > 0 and setup["forward_s"] > 0
        assert setup["compile_s"] > 0
    assert all(s["fp32_max_abs_diff"] < 1e-5 for s in saved["setups"])
    assert (out / "out.png").stat().st_size > 10_000
    assert (out / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_combined_table_has_original_columns_and_breakdown(combined):
    import bench_utils

    report, _ = combined
    text = bench_utils.format_table(report)
    for header in ("vs fp32", "Sorted Inputs (s)", "Unsorted Inputs (s)", "Speedup", "max |score diff|", "x floor", "MFU", "host (s)", "forward (s)"):
        assert header in text
    assert "±" in text


def test_markdown_regenerates_from_json(combined, capsys):
    import bench_utils

    report, out = combined
    md = bench_utils.format_markdown(bench_utils.load_json(out / "out.json"))
    assert md == bench_utils.format_markdown(json.loads(json.dumps(report, default=str)))
    assert md.count("|") > 20 and "DynamicCrossEncoder packed" in md


def test_basic_and_torch_compile_scripts(tiny_model_dir, tmp_path):
    basic = run_basic.main(SMALL + ["--order", "sorted", "--json", str(tmp_path / "b.json")])
    assert [s["name"] for s in basic["setups"]] == ["CrossEncoder (baseline)"]
    assert "sdpa" in basic["setups"][0]["attention"]
    packed = run_torch_compile.main(SMALL + ["--order", "unsorted", "--packed"])
    assert packed["setups"][1]["name"] == "DynamicCrossEncoder packed"
    assert "packed" in packed["setups"][1]["attention"]
    assert packed["setups"][1]["max_abs_diff"] < 1e-5


def test_rerank_workload_reports_percentiles_and_ranking(tiny_model_dir, tmp_path, capsys):
    report = run_combined.main(SMALL + ["--workload", "rerank", "--num-queries", "3", "--docs-per-query", "12", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    text = capsys.readouterr().out
    assert "p50 (ms)" in text and "p99 (ms)" in text and "queries/s" in text
    for setup in report["setups"]:
        assert len(setup["latency"]["times"]) == 3
        assert setup["p50_s"] <= setup["p90_s"] <= setup["p99_s"]
    for setup in report["setups"][1:]:
        assert setup["kendall_tau"] == pytest.approx(1.0)
        assert setup["top10_overlap"] == pytest.approx(1.0)
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_pairs_file_is_the_workload(tiny_model_dir, tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("query\tdocument\nlorem ipsum\tdolor sit amet\nconsectetur\tadipiscing elit sed\n")
    report = run_basic.main(SMALL + ["--pairs-file", str(path), "--order", "unsorted"])
    assert report["workload"]["pairs"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--runs", "-1"], "runs must be >= 1, got -1"),
        (["--max-length", "5000"], "max_length must be <= 1024"),
        (["--order", "random"], "invalid choice: 'random'"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--num-pairs", "ten"], "invalid int value: 'ten'"),
        (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--model", "./no/such/dir"], "does not exist"),
        (["--model", "nobody/no-such-model"], "--model synthetic"),
        (["--max-tokens-per-batch", "0"], "max_tokens_per_batch must be >= 1, got 0"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        run_combined.main(["--device", "cpu"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_broken_pairs_file_names_line_2_before_loading_a_model(tmp_path, capsys, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "a", "document": "b"}\n{"query": "a", "document": \n')
    monkeypatch.setattr(benchmark.models, "resolve_model", lambda name: pytest.fail("model loaded before the file was checked"))
    with pytest.raises(SystemExit) as e:
        run_combined.main(["--device", "cpu", "--pairs-file", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and "Traceback" not in err


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
    run_basic_like = run_torch_compile.main(SMALL + ["--order", "unsorted", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["complete"] is False
    assert saved["setups"][0]["name"] == "CrossEncoder (baseline)" and saved["setups"][0]["complete"]
    assert any("interrupted" in n for n in saved["notes"])
    assert run_basic_like["complete"] is False


def test_cpu_defaults_shrink_and_say_so():
    p = benchmark.parser("x")
    cfg, notes = benchmark.parse_config(p, ["--device", "cpu"])
    assert cfg.num_pairs == benchmark.CPU_DEFAULTS["num_pairs"] and cfg.runs == benchmark.CPU_DEFAULTS["runs"]
    assert notes and "no GPU" in notes[0]
    cfg, _ = benchmark.parse_config(p, ["--device", "cpu", "--num-pairs", "1024"])
    assert cfg.num_pairs == 1024


def test_workloads_are_fresh_per_run_and_identical_across_orders():
    import bench_utils

    cfg = bench_utils.BenchConfig(num_pairs=20, runs=3)
    w = benchmark.make_workloads(cfg)
    runs = [tuple(map(tuple, r)) for r in w["unsorted"]]
    assert len(set(runs[0]) & set(runs[1])) == 0  # seeds spaced by num_pairs: no shared pair
    for sorted_run, unsorted_run in zip(w["sorted"], w["unsorted"]):
        assert sorted(map(tuple, sorted_run)) == sorted(map(tuple, unsorted_run))
        lengths = [len(a) + len(b) for a, b in sorted_run]
        assert lengths == sorted(lengths, reverse=True)
    assert np.all([len(r) == 20 for r in w["unsorted"]])
