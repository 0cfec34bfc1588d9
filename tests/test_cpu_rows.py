"""The CPU comparison in one run: a reduced-precision run times CrossEncoder fp32 as a reference row
(each row's speed and difference against it), and CrossEncoder on OpenVINO is a peer row when
optimum-intel is installed, a note saying how to add it when not."""

import sys
import types

import numpy as np
import pytest
import sentence_transformers
import torch

import benchmark
import dynamic_cross_encoder  # noqa: F401  (subclasses the real CrossEncoder before a test fakes it)
import report as rp
import run_combined
from bench_helpers import text_row_cells

ARGV = ["--model", "synthetic-tiny", "--device", "cpu", "--num-pairs", "12", "--runs", "2", "--warmup", "1",
        "--batch-size", "4", "--order", "unsorted", "--dtype", "bfloat16", "--check-fp32", "--quiet"]
NAMES = ["CrossEncoder (baseline)", "DynamicCrossEncoder (x16 buckets)", "DynamicCrossEncoder packed",
         benchmark.OPENVINO, "CrossEncoder fp32 (reference)"]


@pytest.fixture()
def fake_openvino(monkeypatch):
    """optimum-intel and openvino importable; CrossEncoder(..., backend="openvino") builds a bf16 torch
    CrossEncoder in its place (a runtime with its own rounding), and each such build is recorded."""
    real, built = sentence_transformers.CrossEncoder, []
    for name in ("openvino", "optimum", "optimum.intel"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["openvino"].__version__ = "0.0.1-123-fake-build"

    def cross_encoder(path, *, backend="torch", **kwargs):
        if backend != "openvino":
            return real(path, backend=backend, **kwargs)
        built.append((path, kwargs))
        return real(path, model_kwargs={"dtype": torch.bfloat16}, local_files_only=True, **kwargs)

    monkeypatch.setattr(sentence_transformers, "CrossEncoder", cross_encoder)
    return built


def test_openvino_and_fp32_reference_rows(fake_openvino, tiny_model_dir, capsys):
    report = run_combined.main(ARGV)
    assert [s.name for s in report.setups] == NAMES and report.complete
    assert fake_openvino == [(tiny_model_dir, {"device": "cpu", "max_length": 512})]
    rows = {s.name: s for s in report.setups}
    ov, ref = rows[benchmark.OPENVINO], rows["CrossEncoder fp32 (reference)"]
    assert ov.attention == "sentence-transformers CrossEncoder, backend openvino 0.0.1, precision default"
    # the same inputs as every row: its scores are compared with the baseline's and with fp32
    assert ov.max_abs_diff is not None and ov.fp32_max_abs_diff > 0 and len(ov.unsorted.times) == 2
    assert ref.fp32_max_abs_diff == 0 and ref.fp32_speedup == 1 and "float32" in ref.attention
    for s in report.setups:
        assert s.fp32_speedup == pytest.approx(np.mean(ref.unsorted.times) / np.mean(s.unsorted.times))
    assert all(rows[n].fp32_max_abs_diff > 0 for n in NAMES[:4])  # bf16 rows: each its own rounding
    text = rp.format_table(report)
    cells = dict(zip(text_row_cells(text, "Setup"), text_row_cells(text, benchmark.OPENVINO)))
    assert cells["fp32 speedup"] == f"{ov.fp32_speedup:.2f}x" and cells["vs fp32"] == f"{ov.fp32_max_abs_diff:.1e}"
    assert "optimum-intel" not in text
    assert f"Note: CPU: {benchmark.device_policy.describe_cpu()}; " in text  # what the CPU has, the threads used


def test_without_optimum_intel_the_table_says_how_to_add_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.intel", None)  # import fails, as when not installed
    cfg = benchmark.BenchConfig(device="cpu")
    [setup] = benchmark.openvino_setups(cfg, "unused")
    assert setup.name == benchmark.OPENVINO and setup.build is None
    assert "pip install 'optimum-intel[openvino]'" in setup.unavailable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert benchmark.openvino_setups(benchmark.BenchConfig(device="cuda"), "unused") == []  # CPU runtime


def test_unavailable_row_is_a_note_not_a_row(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "optimum.intel", None)
    argv = [a for a in ARGV if a != "--check-fp32"]
    report = benchmark.main("x", lambda cfg, path, dtype: [benchmark.baseline_setup(cfg, path, dtype),
                                                            *benchmark.openvino_setups(cfg, path)], argv=argv)
    assert [s.name for s in report.setups] == ["CrossEncoder (baseline)"] and report.complete
    assert f"{benchmark.OPENVINO} not run: {benchmark.OPENVINO_INSTALL}" in report.notes
    assert f"Note: {benchmark.OPENVINO} not run: optimum-intel is not installed" in rp.format_table(report)


def test_fp32_run_uses_its_baseline_as_the_reference(tiny_model_dir):
    argv = [a for a in ARGV if a != "bfloat16"]
    argv[argv.index("--dtype") + 1:argv.index("--dtype") + 1] = ["float32"]
    report = benchmark.main("x", lambda cfg, path, dtype: [benchmark.baseline_setup(cfg, path, dtype),
                                                            benchmark.dynamic_setup(cfg, path, dtype, packed=False)],
                            argv=argv)
    assert [s.name for s in report.setups] == ["CrossEncoder (baseline)", "DynamicCrossEncoder (x16 buckets)"]
    assert report.setups[0].fp32_max_abs_diff == 0 and report.setups[1].fp32_max_abs_diff < 1e-5
    assert all(s.fp32_speedup is None for s in report.setups)  # the Speedup column already says it


def test_real_openvino_row_is_near_fp32(tiny_model_dir, tiny_cross_encoder):
    """Where optimum-intel is installed (a separate venv: it moves torch and transformers)."""
    pytest.importorskip("optimum.intel")
    from helpers import IDENTITY, workload
    from test_device_policy import BF16_TOL_OF_SPREAD

    [setup] = benchmark.openvino_setups(benchmark.BenchConfig(device="cpu", dtype="float32"), tiny_model_dir)
    model = setup.build()
    assert "backend openvino" in setup.describe(model)
    pairs = workload(40, seed=11)
    ref = tiny_cross_encoder.predict(pairs, activation_fn=IDENTITY)
    diff = np.abs(model.predict(pairs, activation_fn=IDENTITY) - ref).max()
    # OpenVINO's default precision: bf16 on CPUs with native bf16, else fp32 (then to summation order)
    assert diff <= BF16_TOL_OF_SPREAD * np.std(ref)
