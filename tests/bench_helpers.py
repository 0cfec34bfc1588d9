"""Hand-built reports and a fake clock for the harness and report tests.

The reports use numbers whose table cells can be worked out by hand (see the tests), so a test
compares the table against values written in the test, not against the code that made them.
"""

import re
import types

import numpy as np

import bench_utils as bu
import report as rp

# The seed's H100 numbers (mean, std), as a report would hold them.
SEED_TIMES = {
    "baseline": {"sorted": (0.2658, 0.0119), "unsorted": (0.2961, 0.0089)},
    "compiled": {"sorted": (0.2089, 0.0196), "unsorted": (0.2595, 0.0077)},
}
H100 = bu.Environment(gpu="NVIDIA H100 80GB HBM3", dtype="bfloat16", torch="2.11.0", transformers="5.17.0",
                      sentence_transformers="6.0.1")
CONFIG = {"batch_size": 64, "max_length": 512}  # the BenchConfig fields the table reads


class FakeClock:
    """Stands in for bench_utils' `time` module: perf_counter() returns `now`, which only moves
    when a test calls advance(); `log` records each reading among other events."""

    def __init__(self, log=None):
        self.now, self.log = 0.0, log if log is not None else []

    def perf_counter(self):
        self.log.append("clock")
        return self.now

    def advance(self, seconds):
        self.now += seconds

    def install(self, monkeypatch):
        monkeypatch.setattr(bu, "time", types.SimpleNamespace(perf_counter=self.perf_counter))
        return self


def fake_run(mean, std, complete=True, n=5):
    times = [mean - std, mean + std] * (n // 2) + [mean] * (n % 2)
    summary = bu.Summary(mean=mean, std=std, median=mean, min=mean - std, max=mean + std, n=n, n_total=n,
                         all_times=times)
    return bu.RunResult("x", times=times, summary=summary, warmup_s=1.5, warmup_calls=10, runs_planned=n,
                        complete=complete)


def pairs_report(floor_s=0.059) -> rp.Report:
    """Two setups on 1024 pairs of 190 and 192 tokens (mean 191 tokens, 195,584 per call)."""
    gemm = bu.GemmMeasurement("cuda", "bfloat16", 50, [], 600.0, "test")
    report = rp.Report(config=dict(CONFIG), environment=H100, model_source="random-weight synthetic twin (full)",
                       workload=bu.workload_summary("pairs", [[190] * 1024, [192] * 1024]),
                       compute=bu.Compute(gemm, 600.0, 0.0, floor_s, "test"))
    for name, orders in SEED_TIMES.items():
        runs = {o: fake_run(*ms) for o, ms in orders.items()}
        rp.add_setup(report, name, baseline=name == "baseline", **runs,
                     max_abs_diff=0.0 if name == "baseline" else 3.1e-3, kendall_tau=float("nan"),
                     peak_mem_bytes=np.int64(3 * 2**30), compile_s=np.float64(40.2))
    return report


def rerank_report() -> rp.Report:
    """20 queries x 50 documents of 200 tokens; query i takes (i + 1) ms in the baseline and a
    quarter of that in the fast setup."""
    report = rp.Report(config=dict(CONFIG), environment=bu.Environment(cpu="test cpu", dtype="float32"),
                       model_source="local: /models/x", workload=bu.workload_summary("rerank", [[200] * 50] * 20))
    for name, scale in (("CrossEncoder", 1.0), ("DynamicCrossEncoder", 0.25)):
        times = [scale * (i + 1) / 1000 for i in range(20)]
        run = bu.RunResult(name, times=times, summary=bu.summarize(times), warmup_s=0.3, warmup_calls=2,
                           runs_planned=20, complete=True)
        agreement = {} if scale == 1.0 else {"kendall_tau": 0.98, "top10_overlap": 0.9}
        rp.add_setup(report, name, baseline=scale == 1.0, latency=run, **agreement)
    report.complete = True
    return report


def table_rows(markdown: str) -> list[str]:
    """The table lines of a markdown report (header, separator, one per setup)."""
    return [line for line in markdown.splitlines() if line.startswith("| ")]


def text_row_cells(table: str, name: str) -> list[str]:
    """Cells of the text-table row that starts with `name` (columns are two or more spaces apart)."""
    row = next(line for line in table.splitlines() if line.startswith(name + "  "))
    return [name] + re.split(r"\s{2,}", row[len(name):].strip())
