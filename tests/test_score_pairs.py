"""score_pairs.py end to end on the tiny twin (CPU, fp32, eager): the local engine, and Ray Data
for real on a local instance (2 CPU slots, 2 workers) shared by this module; plus the streaming
readers of data.py it is built on."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import score_pairs
from helpers import EDGE_PAIRS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # fp32 on both sides, same weights: only summation order differs (thread count, batch mates)
PAIRS = data.load_pairs(70, seed=3, min_sentences=1, max_sentences=6) + EDGE_PAIRS  # 78 pairs
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
FAST = ["--model", "synthetic-tiny", "--device", "cpu", "--dtype", "float32", "--no-compile", "--quiet"]


@pytest.fixture(autouse=True)
def deadline():
    """No test of this module may hang the suite (Ray waits for resources without a limit)."""
    def expired(*_):
        raise TimeoutError("test took longer than 240 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """DynamicCrossEncoder.predict on all of PAIRS in one call: the scores every run must give."""
    from dynamic_cross_encoder import DynamicCrossEncoder

    model = DynamicCrossEncoder(tiny_model_dir, device="cpu", compile=False, model_kwargs={"dtype": torch.float32})
    scores = np.asarray(model.predict(PAIRS, batch_size=16), dtype=np.float64)
    assert scores.std() > 1e-3, "reference scores barely vary: comparing against them would prove nothing"
    return scores


@pytest.fixture(scope="module")
def ray_cluster(tiny_model_dir):
    """One local Ray instance for the module, on loopback with 2 CPU slots; always shut down."""
    # Without this Ray puts even a local instance on the machine's network address. Read when ray is
    # imported (nothing before this fixture imports it) and by the command-line test's process.
    saved = os.environ.get(LOOPBACK)
    os.environ[LOOPBACK] = "0"
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), address
        yield address
    finally:
        ray.shutdown()
        os.environ.pop(LOOPBACK) if saved is None else os.environ.__setitem__(LOOPBACK, saved)


def write_jsonl(path, pairs, ids=None, keys=("query", "document")):
    with open(path, "w") as f:
        for i, (a, b) in enumerate(pairs):
            f.write(json.dumps({keys[0]: a, keys[1]: b, **({"id": ids[i]} if ids else {})}) + "\n")
    return str(path)


def write_tsv(path, pairs, ids=None, header=False):
    with open(path, "w") as f:
        if header:
            f.write("id\tquery\tdocument\n" if ids else "query\tdocument\n")
        for i, (a, b) in enumerate(pairs):
            f.write((f"{ids[i]}\t" if ids else "") + f"{a}\t{b}\n")
    return str(path)


def write_parquet(path, pairs, ids=None, row_group_size=None):
    cols = {"text_a": [a for a, _ in pairs], "text_b": [b for _, b in pairs], **({"id": ids} if ids else {})}
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return str(path)


assert not any(c in t for pair in PAIRS for t in pair for c in "\t\n")  # so they fit a TSV file


def read_output(path) -> dict:
    if str(path).endswith(".parquet"):
        rows = list(zip(*(pq.read_table(path)[c].to_pylist() for c in ("id", "score"))))
    else:
        rows = [(r["id"], r["score"]) for r in map(json.loads, open(path))]
    scores = dict(rows)
    assert len(scores) == len(rows), "an id appears twice"
    return scores


def assert_scores(out: dict, ids, expected):
    assert sorted(out) == sorted(ids), "every input row exactly once, under its id"
    got = np.array([out[i] for i in ids], dtype=np.float64)
    diff = np.abs(got - np.asarray(expected)).max()
    assert diff <= TOL, f"max |score diff| {diff:.2e} > {TOL:.0e}"


def split_input(tmp_path, name="in"):
    """PAIRS over three files of three formats; sorted order a.jsonl, b.tsv, c.parquet."""
    d = tmp_path / name
    d.mkdir()
    write_parquet(d / "c.parquet", PAIRS[50:], row_group_size=7)  # written first: order is by name
    write_jsonl(d / "a.jsonl", PAIRS[:30])
    write_tsv(d / "b.tsv", PAIRS[30:50], header=True)
    (d / "notes.md").write_text("not an input")
    return d


def run(argv) -> dict:
    report = score_pairs.cli(FAST + argv)
    assert report["complete"]
    return report


def exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        score_pairs.cli(FAST + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- the local engine ----------------------------------------------------------------------------


@pytest.mark.parametrize("out_name", ["scores.parquet", "scores.jsonl"])
def test_local_engine_matches_predict(tmp_path, reference, out_name):
    d = split_input(tmp_path)
    out = tmp_path / out_name
    report = run([str(d), str(out), "--batch-size", "5", "--json", str(tmp_path / "s.json")])
    # ids: the row numbers over a.jsonl, b.tsv, c.parquet in sorted name order
    assert_scores(read_output(out), list(range(len(PAIRS))), reference)
    assert report["rows_in"] == report["rows_out"] == len(PAIRS) and report["rows_rejected"] == 0
    assert report["inputs"] == [str(d / n) for n in ("a.jsonl", "b.tsv", "c.parquet")]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl-text-keys", "tsv3", "tsv3-header", "parquet"])
def test_ids_come_from_the_input(tmp_path, reference, fmt):
    ids = [f"q{i}-d{i * 7}" for i in range(len(PAIRS))] if fmt != "parquet" else [10**12 + 3 * i for i in range(len(PAIRS))]
    path = tmp_path / f"pairs.{fmt.split('-')[0][:5] if fmt != 'parquet' else fmt}"
    if fmt.startswith("jsonl"):
        write_jsonl(path, PAIRS, ids, keys=("text_a", "text_b") if "text" in fmt else ("query", "document"))
    elif fmt.startswith("tsv"):
        write_tsv(path, PAIRS, ids, header="header" in fmt)
    else:
        write_parquet(path, PAIRS, ids, row_group_size=10)
    run([str(path), str(tmp_path / "out.jsonl"), "--batch-size", "9"])
    assert_scores(read_output(tmp_path / "out.jsonl"), ids, reference)


def test_glob_takes_matching_files_in_sorted_order(tmp_path, reference):
    d = tmp_path / "shards"
    d.mkdir()
    for k, name in enumerate(["part-2.jsonl", "part-0.jsonl", "part-1.jsonl", "other.jsonl"]):
        write_jsonl(d / name, PAIRS[k * 20:(k + 1) * 20] if k < 3 else PAIRS[:3])
    run([str(d / "part-*.jsonl"), str(tmp_path / "out.parquet")])
    # sorted: part-0 (PAIRS[20:40]), part-1 (PAIRS[40:60]), part-2 (PAIRS[0:20])
    assert_scores(read_output(tmp_path / "out.parquet"), list(range(60)), np.r_[reference[20:60], reference[:20]])


# --- bad input ---------------------------------------------------------------------------------


def test_malformed_row_stops_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import models

    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:5])
    with open(path, "a") as f:
        f.write('{"query": "a", "document": "b"}\n{"query": "a" "document": "b"}\n')
    monkeypatch.setattr(models, "resolve_model", lambda name: pytest.fail("a model was resolved before the check"))
    err = exit_2([path, str(tmp_path / "out.parquet")], capsys)
    assert f"{path}:7: invalid JSON (Expecting ',' delimiter)" in err
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_skip_bad_writes_every_reject_with_line_and_reason(tmp_path, reference):
    d = tmp_path / "in"
    d.mkdir()
    lines = [json.dumps({"query": a, "document": b, "id": f"r{i}"}) for i, (a, b) in enumerate(PAIRS[:10])]
    lines[2] = '{"query": "no document", "id": "x"}'
    lines[5] = json.dumps({"query": "a", "document": "b", "id": "r1"})  # a repeated id
    lines[7] = '{"query": 3, "document": "b", "id": "r7"}'
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    write_tsv(d / "b.tsv", PAIRS[10:14], ids=["t0", "t1", "t2", "t3"])
    (d / "b.tsv").write_text((d / "b.tsv").read_text() + "too\tmany\tcolumns\there\n")
    out = tmp_path / "out.parquet"
    report = run([str(d), str(out), "--skip-bad"])
    rejects = [json.loads(line) for line in open(f"{out}.rejects.jsonl")]
    assert [(os.path.basename(r["file"]), r["line"], r["row"]) for r in rejects] == [
        ("a.jsonl", 3, 2), ("a.jsonl", 6, 5), ("a.jsonl", 8, 7), ("b.tsv", 5, 14)]
    assert rejects[0]["reason"].startswith("expected keys query/document")
    assert rejects[1]["reason"] == f"duplicate id 'r1' (first at {d / 'a.jsonl'}:2)"
    assert rejects[2]["reason"] == "'query' must be a string, got int"
    assert rejects[3]["reason"] == "expected 3 tab-separated columns, got 4"
    assert (report["rows_in"], report["rows_out"], report["rows_rejected"]) == (15, 11, 4)
    keep = [0, 1, 3, 4, 6, 8, 9]
    ids = [f"r{i}" for i in keep] + ["t0", "t1", "t2", "t3"]
    assert_scores(read_output(out), ids, np.r_[reference[keep], reference[10:14]])


def test_duplicate_id_without_skip_bad_exits_2(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS[:4], ids=["a", "b", "c", "a"])
    err = exit_2([path, str(tmp_path / "out.parquet")], capsys)
    assert f"{path}:4: duplicate id 'a' (first at {path}:1)" in err


def test_existing_output_is_not_overwritten(tmp_path, capsys, reference):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    err = exit_2([path, str(out)], capsys)
    assert f"OUTPUT {out} exists; pass --overwrite to replace it" in err
    assert out.read_text() == "precious\n"
    run([path, str(out), "--overwrite"])
    assert_scores(read_output(out), list(range(len(PAIRS))), reference)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--max-length", "2000"], "--max-length must be <= 1024"),
    (["--num-workers", "2"], "--num-workers and --address need --engine ray"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--engine", "spark"], "argument --engine: invalid choice: 'spark'"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, message):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS[:3])
    err = exit_2([path, str(tmp_path / "out.parquet")] + args, capsys)
    assert message in err


@pytest.mark.parametrize("input_, output, message", [
    ("missing.jsonl", "out.parquet", "no such file, directory or pattern"),
    ("*.nothing", "out.parquet", "no pairs files"),
    ("p.jsonl", "out.csv", "must end in .parquet or .jsonl"),
    ("p.jsonl", "p.jsonl", "is also an input"),
    ("p.jsonl", "nodir/out.parquet", "no such directory"),
    ("p.jsonl", None, "OUTPUT is required"),
])
def test_bad_paths_exit_2_with_one_line(tmp_path, capsys, input_, output, message):
    write_jsonl(tmp_path / "p.jsonl", PAIRS[:3])
    argv = [str(tmp_path / input_)] + ([str(tmp_path / output)] if output else [])
    assert message in exit_2(argv, capsys)


# --- the writer's exactly-once guard, without an engine -------------------------------------------


def test_sink_drops_repeated_rows_and_refuses_missing_ones(tmp_path):
    plan = data.PairsPlan(files=[], rows=4)
    block = pa.table({"row": [0, 1], "id": [0, 1], "score": pa.array([0.5, 0.25], pa.float32()),
                      "worker": ["w", "w"], "busy_s": [0.1, 0.1]})
    rest = pa.table({"row": [2, 3], "id": [2, 3], "score": pa.array([0.75, 1.0], pa.float32()),
                     "worker": ["v", "v"], "busy_s": [0.2, 0.2]})
    out = str(tmp_path / "out.jsonl")
    with score_pairs.tqdm(disable=True) as bar:
        sink = score_pairs.Sink(out, None, 4, bar)
        sink.write(block)
        sink.write(block)  # a retried block delivered twice
        with pytest.raises(RuntimeError, match="2 missing"):
            sink.close(plan)
        assert not os.path.exists(out)
        sink.abort()
        sink = score_pairs.Sink(out, None, 4, bar)
        for t in (block, rest, block):
            sink.write(t)
        assert sink.close(plan) == 4 and sink.duplicates == 2
    assert read_output(out) == {0: 0.5, 1: 0.25, 2: 0.75, 3: 1.0}
    assert os.listdir(tmp_path) == ["out.jsonl"]


# --- Ray ---------------------------------------------------------------------------------------


def test_ray_two_workers_match_predict(tmp_path, reference, ray_cluster):
    d = split_input(tmp_path)
    out = tmp_path / "out.jsonl"
    report = run([str(d), str(out), "--engine", "ray", "--num-workers", "2", "--batch-size", "3"])
    assert_scores(read_output(out), list(range(len(PAIRS))), reference)
    assert report["engine"] == "ray" and report["num_workers"] == 2 and report["duplicates_dropped"] == 0
    assert sum(w["rows"] for w in report["workers"]) == len(PAIRS)


def test_ray_worker_killed_mid_run_loses_and_doubles_nothing(tmp_path, reference, ray_cluster, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS * 3, ids=list(range(1000, 1000 + 3 * len(PAIRS))))
    marker = tmp_path / "crashed"
    monkeypatch.setenv(score_pairs.CRASH_ENV, str(marker))
    out = tmp_path / "out.parquet"
    report = run([path, str(out), "--engine", "ray", "--num-workers", "2", "--batch-size", "2"])
    assert marker.exists(), "no worker died: the test proved nothing"
    assert_scores(read_output(out), list(range(1000, 1000 + 3 * len(PAIRS))), np.tile(reference, 3))
    assert report["rows_out"] == 3 * len(PAIRS)


def test_ray_joins_a_running_cluster_from_the_command_line(tmp_path, reference, ray_cluster):
    d = split_input(tmp_path)
    out, summary = tmp_path / "out.parquet", tmp_path / "summary.json"
    argv = [str(d), str(out), "--engine", "ray", "--address", ray_cluster, "--num-workers", "2",
            "--batch-size", "7", "--json", str(summary)] + FAST
    # From another directory: the workers must find the project without help from the cwd.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "score_pairs.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_scores(read_output(out), list(range(len(PAIRS))), reference)
    s = json.loads(summary.read_text())
    for key in ("rows_in", "rows_out", "rows_rejected", "seconds", "pairs_per_s", "workers", "model_source", "versions"):
        assert key in s, key
    assert (s["rows_in"], s["rows_out"], s["rows_rejected"], s["cluster"]) == (len(PAIRS), len(PAIRS), 0, ray_cluster)
    assert s["random_weights"] and "random-weight" in s["model_source"]
    assert all(w["pairs_per_s"] > 0 for w in s["workers"]) and s["pairs_per_s"] > 0
    assert s["versions"]["ray"] and s["versions"]["torch"]
    assert "RANDOM weights" in proc.stdout and f"scored {len(PAIRS)} of {len(PAIRS)} rows" in proc.stdout


def test_benchmark_times_one_and_two_workers(tmp_path, ray_cluster, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    report = run([path, "--benchmark", "--num-workers", "2", "--batch-size", "8"])
    assert [(r["engine"], r["num_workers"]) for r in report["runs"]] == [("local", 1), ("ray", 1), ("ray", 2)]
    assert all(r["rows_out"] == len(PAIRS) and r["max_abs_diff_vs_local"] <= TOL for r in report["runs"])
    assert report["scaling_efficiency"] > 0
    assert "efficiency" in capsys.readouterr().out


# --- the streaming readers (data.py) -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "parquet"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_chunks_cover_every_record_once(tmp_path, fmt, chunk_rows):
    pairs = PAIRS[:23]
    path = {"jsonl": lambda p: write_jsonl(p, pairs), "tsv": lambda p: write_tsv(p, pairs, header=True),
            "parquet": lambda p: write_parquet(p, pairs, row_group_size=5)}[fmt](tmp_path / f"p.{fmt}")
    plan = data.plan_pairs([path, path], chunk_rows=chunk_rows)
    assert plan.rows == 46 and plan.id_type is None
    got = [(n, [r.text_a, r.text_b]) for c in plan.chunks for n, r in data.read_chunk(c)]
    assert got == list(enumerate(pairs + pairs))
    if fmt != "parquet":  # parquet chunks are whole row groups
        assert all(c.rows <= chunk_rows for c in plan.chunks)


def test_read_chunk_notices_a_file_that_changed(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS[:6])
    plan = data.plan_pairs([path], chunk_rows=100)
    write_jsonl(tmp_path / "p.jsonl", PAIRS[:4])
    with pytest.raises(data.PairsFileError, match="changed after it was checked"):
        list(data.read_chunk(plan.chunks[0]))


@pytest.mark.parametrize("text, reason", [
    ('{"query": "a", "document": "b", "id": "x"}\n{"query": "a", "document": "b"}\n',
     "2: no 'id', but the first record"),
    ('{"query": "a", "document": "b"}\n{"query": "a", "document": "b", "id": 3}\n',
     "2: has an 'id', but the first record"),
    ('{"query": "a", "document": "b", "id": 1}\n{"query": "a", "document": "b", "id": "1"}\n',
     "2: 'id' is a string, unlike the first record's"),
    ('{"query": "a", "document": "b", "id": [1]}\n', "1: 'id' must be a string or an integer, got list"),
])
def test_ids_must_be_consistent(tmp_path, text, reason):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(data.PairsFileError) as e:
        data.plan_pairs([str(path)])
    assert str(e.value).startswith(f"{path}:{reason}")


def test_parquet_schema_and_nulls(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"q": ["a"], "d": ["b"]}), bad)
    with pytest.raises(data.PairsFileError, match="expected columns query/document or text_a/text_b"):
        data.plan_pairs([str(bad)])
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"query": ["a", None, "c"], "document": ["b", "x", "d"]}), nulls)
    plan = data.plan_pairs([str(nulls)], skip_bad=True)
    assert plan.rejects == [data.Reject(str(nulls), 2, 1, "'query' is null")]
    assert [(n, r.text_a) for c in plan.chunks for n, r in data.read_chunk(c)] == [(0, "a"), (2, "c")]
