"""The report of a benchmark run: typed records (SetupResult, Report) and what is made from them,
the text table, the markdown table, the JSON file and the latency plot.

The records are written to JSON field by field and read back into the same classes, so a saved
file gives the same table as the run that wrote it:

    python report.py --markdown results/cpu-epyc-2core/combined-tiny-pairs.json
    python report.py --table results/x.json --plot results/x.json results/x.png

A new per-setup number is a SetupResult field plus one Column line in COLUMNS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bench_utils import LAST_N, Compute, Environment, RunResult, Workload, percentiles, queries_per_s, throughput

ORDERS = ("sorted", "unsorted")
# The run settings the table and plot show, read from Report.config (benchmark.BenchConfig's
# fields); a test checks they are still BenchConfig fields.
SHOWN_SETTINGS = ("batch_size", "max_length")
# Field metadata for the JSON writer: a number a setup may not have is left out of its file when
# None (or NaN), so a file carries only what was measured, as the files before these records did.
OMIT_NONE = {"json": "omit_none"}


def _measured():
    return field(default=None, metadata=OMIT_NONE)


@dataclass
class SetupResult:
    """One row of the table. Times in seconds, memory in bytes."""

    name: str
    baseline: bool = False  # the row the speedups and score differences are against
    sorted: RunResult | None = _measured()  # pairs workload, longest pairs first
    unsorted: RunResult | None = _measured()  # pairs workload as generated
    latency: RunResult | None = _measured()  # rerank workload: one timed call per query
    complete: bool = True  # False when Ctrl-C cut a run short
    warmup_s: float = 0.0  # summed over the runs
    primary: str = "unsorted"  # the run time_s comes from: latency, else unsorted, else sorted
    p50_s: float | None = _measured()
    p90_s: float | None = _measured()
    p99_s: float | None = _measured()
    queries_per_s: float | None = _measured()
    time_s: float | None = None  # mean seconds per timed call of the primary run
    pairs_per_s: float | None = _measured()
    tokens_per_s: float | None = _measured()
    x_floor: float | None = _measured()
    mfu: float | None = _measured()
    load_s: float | None = None
    attention: str | None = None  # the model's own description of its attention and compile
    compile_s: float | None = _measured()
    max_abs_diff: float | None = _measured()
    mean_abs_diff: float | None = _measured()
    kendall_tau: float | None = _measured()
    top10_overlap: float | None = _measured()
    fp32_max_abs_diff: float | None = _measured()
    fp32_mean_abs_diff: float | None = _measured()
    fp32_speedup: float | None = _measured()  # the fp32 reference's time / this time (--check-fp32)
    host_s: float | None = _measured()
    forward_s: float | None = _measured()
    padding_efficiency: float | None = _measured()
    host_pairs_per_s: float | None = _measured()
    tokenizer_pairs_per_s: float | None = _measured()
    new_shapes: int | None = _measured()  # batch shapes first met after warm-up
    peak_mem_bytes: int | None = None  # None on CPU


@dataclass
class Report:
    """Everything one benchmark run measured. Rewrite the JSON after each setup: `complete` says
    whether the run got to the end."""

    complete: bool = field(default=False, kw_only=True)
    config: dict[str, Any]  # benchmark.BenchConfig's fields as run, kept verbatim for the record
    environment: Environment
    model_source: str  # e.g. "random-weight synthetic twin (tiny, seed 0)"
    workload: Workload
    compute: Compute | None = None
    setups: list[SetupResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def baseline(self) -> SetupResult | None:
        return next((s for s in self.setups if s.baseline), self.setups[0] if self.setups else None)


def add_setup(report: Report, name: str, *, sorted: RunResult | None = None, unsorted: RunResult | None = None,
              latency: RunResult | None = None, baseline: bool = False, **measured) -> SetupResult:
    """Append one setup with the numbers derived from its primary run; returns it.

    Pass `sorted`/`unsorted` runs for the pairs workload or `latency` for rerank. The primary time
    (unsorted when present: real inputs arrive unsorted) gives pairs/s, tokens/s, x floor and MFU
    against report.workload and report.compute. `measured`: other SetupResult fields.
    """
    runs = {k: r for k, r in (("sorted", sorted), ("unsorted", unsorted), ("latency", latency)) if r is not None}
    if not runs:
        raise ValueError(f"setup {name!r} needs a sorted, unsorted or latency run")
    primary = next(k for k in ("latency", "unsorted", "sorted") if k in runs)
    setup = SetupResult(name, baseline=baseline, **runs, complete=all(r.complete for r in runs.values()),
                        warmup_s=sum(r.warmup_s for r in runs.values()), primary=primary, **measured)
    times = runs[primary].times
    if primary == "latency" and times:
        setup.time_s = float(np.mean(times))  # every query counts, not the last 5
        p = percentiles(times)
        setup.p50_s, setup.p90_s, setup.p99_s = p["p50"], p["p90"], p["p99"]
        setup.queries_per_s = queries_per_s(times)
    elif primary != "latency" and runs[primary].summary:
        setup.time_s = runs[primary].summary.mean
    if setup.time_s:
        wl, compute = report.workload, report.compute
        setup.pairs_per_s, setup.tokens_per_s = throughput(wl.pairs, wl.real_tokens, setup.time_s)
        if compute and compute.floor_s:
            setup.x_floor, setup.mfu = setup.time_s / compute.floor_s, compute.floor_s / setup.time_s
    report.setups.append(setup)
    return setup


# ---------------------------------------------------------------- table


def _num(x) -> float | None:
    """A finite float, or None for missing / NaN (so a record and its JSON read the same)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    x = _num(x)
    return "-" if x is None else f"{x * scale:{spec}}{suffix}"


@dataclass(frozen=True)
class Column:
    """A table column showing one SetupResult field; shown when any setup has a number for it."""

    header: str
    field: str
    spec: str  # format spec of the number
    help: str
    suffix: str = ""
    scale: float = 1.0

    def cell(self, setup: SetupResult) -> str:
        return _fmt(getattr(setup, self.field), self.spec, self.suffix, self.scale)


HOST_HELP = "tokenize + pack on the host, in the last timed call"
FORWARD_HELP = ("the model's forward, in the last timed call: on CUDA the time between CUDA events around "
                "each launch (device time, idle gaps between the events included), on CPU wall time")
# rerank: latency per query, before the Speedup column
LATENCY_COLUMNS = [Column(f"{p} (ms)", f"{p}_s", ".1f", f"{p} latency of one query's rank call", scale=1e3)
                   for p in ("p50", "p90", "p99")]
LATENCY_COLUMNS.append(Column("queries/s", "queries_per_s", ",.1f", "queries over the summed latency"))
# after the Speedup column, in this order
COLUMNS = [
    Column("max |score diff|", "max_abs_diff", ".1e", "max |score - baseline's score| over every timed workload"),
    Column("vs fp32", "fp32_max_abs_diff", ".1e", "max |score - fp32 baseline's score| on the first timed workload"),
    Column("fp32 speedup", "fp32_speedup", ".2f", "time of CrossEncoder fp32 (reference) / this time, where the "
           "run's dtype is not fp32", suffix="x"),
    Column("tau", "kendall_tau", ".4f", "Kendall tau of each query's ranking vs the baseline's, mean over queries"),
    Column("top-10", "top10_overlap", ".2f", "share of the baseline's top 10 documents in this top 10, mean over "
           "queries"),
    Column("pairs/s", "pairs_per_s", ",.0f", "pairs per second of the primary runs"),
    Column("tokens/s", "tokens_per_s", ",.0f", "real (unpadded) tokens per second of the primary runs"),
    Column("pad eff.", "padding_efficiency", ".0%", "real tokens / tokens the model processed"),
    Column("x floor", "x_floor", ".2f", "time / compute floor (the workload's FLOPs at the measured GEMM rate)",
           suffix="x"),
    Column("MFU", "mfu", ".0%", "compute floor / time"),
    Column("host (s)", "host_s", ".4f", HOST_HELP),
    Column("forward (s)", "forward_s", ".4f", FORWARD_HELP),
    Column("host pairs/s", "host_pairs_per_s", ",.0f", "pairs/s of predict with the forward skipped (tokenize, sort, "
           "pack, copy, restore order): the most this process can feed the GPU"),
    Column("tok pairs/s", "tokenizer_pairs_per_s", ",.0f", "pairs/s of the tokenizers backend alone on the same pairs "
           "(parallel encode_batch_fast, longest_first, no padding)"),
    Column("new shapes", "new_shapes", ".0f", "batch shapes met after warm-up: each a compile or a CUDA-graph "
           "recording inside a timed call where graphs are per shape"),
    Column("peak mem (GiB)", "peak_mem_bytes", ".2f", "peak GPU memory allocated while the setup ran",
           scale=2.0**-30),
    Column("compile (s)", "compile_s", ".1f", "warm-up and compilation before the timed runs"),
]


def _run_cell(setup: SetupResult, order: str) -> str:
    run = getattr(setup, order)
    if run is None or run.summary is None:
        return "-"
    return f"{run.summary.mean:.4f} ± {run.summary.std:.4f}" + ("" if run.complete else "*")


def _columns(report: Report) -> list[tuple[str, Callable[[SetupResult], str]]]:
    """(header, cell function) for every column this report has data for."""
    base = report.baseline()
    base_t = _num(base.time_s) if base else None

    def speedup(s: SetupResult) -> str:
        t = _num(s.time_s)
        return "-" if not (t and base_t) else f"{base_t / t:.2f}x"

    def shown(columns):
        return [(c.header, c.cell) for c in columns
                if any(_num(getattr(s, c.field)) is not None for s in report.setups)]

    cols: list[tuple[str, Callable[[SetupResult], str]]] = [("Setup", lambda s: str(s.name))]
    if report.workload.kind == "rerank":
        cols += shown(LATENCY_COLUMNS)
    for order in ORDERS:
        if any(getattr(s, order) is not None for s in report.setups):
            cols.append((f"{order.capitalize()} Inputs (s)", lambda s, o=order: _run_cell(s, o)))
    return cols + [("Speedup", speedup)] + shown(COLUMNS)


def _setting(report: Report, name: str):
    assert name in SHOWN_SETTINGS, name
    return report.config.get(name)


def _preamble(report: Report) -> list[str]:
    env, wl, compute = report.environment, report.workload, report.compute
    if wl.kind == "rerank":
        what = f"rerank workload, {wl.calls} queries x {_fmt(wl.pairs, '.0f')} documents"
    else:
        what = f"pairs workload, {_fmt(wl.pairs, '.0f')} pairs per run"
    hw = env.gpu or f"CPU ({env.cpu})"
    lines = [
        f"Cross-encoder benchmark: {what}, batch {_setting(report, 'batch_size')}, "
        f"max_length {_setting(report, 'max_length')}, {env.dtype}",
        f"{hw}, torch {env.torch}, transformers {env.transformers}, "
        f"sentence-transformers {env.sentence_transformers}",
        f"Model: {report.model_source}",
        f"Work per timed call: {_fmt(wl.real_tokens, ',.0f')} real tokens, "
        f"{_fmt(wl.flops, '.2f', scale=1e-12)} TFLOP",
    ]
    if compute and compute.floor_s:
        lines.append(f"Compute floor: {compute.floor_s:.4g} s per call at {compute.tflops:.3g} TFLOP/s "
                     f"({compute.label})")
    return lines


def _footer(report: Report) -> list[str]:
    setups, base = report.setups, report.baseline()
    lines = []
    if report.workload.kind == "rerank":
        lines.append("Latency per query (one rank call over its documents), over every query; "
                     f"speedup is mean latency vs {base.name if base else 'the baseline'}.")
    elif setups:
        runs = getattr(base, base.primary).runs_planned
        primary = "unsorted" if any(s.unsorted is not None for s in setups) else "sorted"
        lines.append(f"Times: mean ± std (population) over the last {min(LAST_N, runs)} of {runs} runs. "
                     f"Speedup vs {base.name}, pairs/s and x floor use {primary} inputs.")
    if any(s.host_s is not None for s in setups):
        lines.append(f"host (s): {HOST_HELP}; forward (s): {FORWARD_HELP}. "
                     "On a GPU the two overlap, so their sum can exceed the wall time.")
    if any(s.host_pairs_per_s is not None for s in setups):
        lines.append("host pairs/s: predict with the forward skipped; a setup whose pairs/s nears it is host-bound. "
                     "tok pairs/s: the tokenizer alone on the same pairs.")
    if any(not s.complete for s in setups):
        lines.append("* interrupted: fewer runs than planned.")
    if not report.complete:
        lines.append("INCOMPLETE: the run stopped before every setup finished.")
    return lines + [f"Note: {n}" for n in report.notes]


def format_table(report: Report) -> str:
    """Plain-text table of every setup, with the original's sorted/unsorted columns."""
    cols = _columns(report)
    rows = [[h for h, _ in cols]] + [[cell(s) for _, cell in cols] for s in report.setups]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]

    def fmt_row(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    table = [fmt_row(rows[0]), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in rows[1:]]
    return "\n".join(_preamble(report) + [""] + table + [""] + _footer(report))


def format_markdown(report: Report) -> str:
    """The same table as GitHub markdown."""
    cols = _columns(report)

    def row(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(h for h, _ in cols), "| " + " | ".join(["---"] + ["---:"] * (len(cols) - 1)) + " |"]
    lines += [row(cell(s) for _, cell in cols) for s in report.setups]
    pre = _preamble(report)
    br = [line + "  " for line in pre[1:]]  # two trailing spaces: a markdown line break
    return "\n".join([f"**{pre[0]}**", ""] + br + [""] + lines + [""] + [line + "  " for line in _footer(report)])


# ---------------------------------------------------------------- JSON


def _is_nan(x) -> bool:
    return isinstance(x, (float, np.floating)) and math.isnan(x)


def to_json(x):
    """Records -> plain JSON types, field by field; numpy numbers become Python ones, NaN becomes None."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        out = {}
        for f in dataclasses.fields(x):
            value, how = getattr(x, f.name), f.metadata.get("json")
            if how == "skip" or (how == "omit_none" and (value is None or _is_nan(value))):
                continue
            out[f.name] = to_json(value)
        return out
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [to_json(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)  # torch.dtype, Path, ...


def _typed(tp, value):
    """A JSON value as the annotated type: nested records and lists of records are rebuilt."""
    if value is None:
        return None
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value)
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return [from_json(typing.get_args(tp)[0], v) for v in value]
    return value


def from_json(cls, data: dict):
    """The inverse of to_json for a record class. Keys the class has no field for are ignored, so
    a newer file still reads; a missing required field raises TypeError."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _typed(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data})


def write_json(report: Report, path: str | os.PathLike) -> str:
    """Write the report atomically (temp file + rename): a crash never leaves half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(to_json(report), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a report is for everyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_json(path: str | os.PathLike) -> Report:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "setups" not in data:
        raise ValueError(f"{path}: not a benchmark report (no 'setups' key)")
    try:
        return from_json(Report, data)
    except (TypeError, KeyError, StopIteration) as e:
        raise ValueError(f"{path}: not a benchmark report ({e})") from None


# ---------------------------------------------------------------- plot


def _bars_rerank(ax, setups: list[SetupResult], x) -> np.ndarray:
    def ms(name):
        return np.array([(_num(getattr(s, name)) or float("nan")) * 1e3 for s in setups])

    p50, p90, p99 = ms("p50_s"), ms("p90_s"), ms("p99_s")
    ax.bar(x, p50, width=0.55, color="tab:blue", label="p50")
    ax.scatter(x, p90, marker="_", s=900, linewidths=2.5, color="tab:orange", label="p90", zorder=3)
    ax.scatter(x, p99, marker="_", s=900, linewidths=2.5, color="tab:red", label="p99", zorder=3)
    ax.set_ylabel("latency per query (ms)")
    return np.nanmax(np.vstack([p50, p90, p99, np.zeros(len(setups))]), axis=0)


def _bars_pairs(ax, report: Report, x) -> np.ndarray:
    setups = report.setups
    orders = [o for o in ORDERS if any(getattr(s, o) is not None for s in setups)]
    width = 0.8 / max(len(orders), 1)
    tops = np.zeros(len(setups))
    for j, order in enumerate(orders):
        summaries = [getattr(s, order).summary if getattr(s, order) else None for s in setups]
        mean = np.array([m.mean if m else float("nan") for m in summaries])
        std = np.array([m.std if m else 0.0 for m in summaries])
        ax.bar(x + (j - (len(orders) - 1) / 2) * width, mean, width, yerr=std, capsize=4,
               label=f"{order} inputs", color=("tab:blue", "tab:orange")[j])
        tops = np.fmax(tops, np.nan_to_num(mean + std))
    ax.set_ylabel(f"seconds per run of {_fmt(report.workload.pairs, '.0f')} pairs")
    return tops


def _title(report: Report) -> str:
    env, source = report.environment, report.model_source or ""
    title = f"{env.gpu or f'CPU ({env.cpu})'}, {env.dtype}, batch {_setting(report, 'batch_size')}"
    title += ", random weights" if "synthetic" in source or "random" in source else ""
    return title + ("" if report.complete else " (incomplete)")


def plot(report: Report, path: str | os.PathLike) -> str:
    """Bar chart of latency per setup (PNG), with the compute floor where known."""
    import matplotlib  # optional: only this function needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups, rerank = report.setups, report.workload.kind == "rerank"
    x = np.arange(len(setups))
    fig, ax = plt.subplots(figsize=(max(6.5, 2.0 * len(setups) + 2.5), 4.8))
    tops = _bars_rerank(ax, setups, x) if rerank else _bars_pairs(ax, report, x)
    floor = _num(report.compute.floor_s) if report.compute else None
    if floor:
        floor, unit = (floor * 1e3, "ms") if rerank else (floor, "s")
        ax.axhline(floor, color="gray", linestyle="--", linewidth=1.2, label=f"compute floor ({floor:.3g} {unit})")
    for i, s in enumerate(setups):
        if (xf := _num(s.x_floor)) is not None:
            ax.annotate(f"{xf:.3g}x floor", (x[i], tops[i]), xytext=(0, 6), textcoords="offset points",
                        ha="center", fontsize=9)
    ax.set_xticks(x, [textwrap.fill(str(s.name), 22) for s in setups], fontsize=9)
    ymax = max([float(t) for t in tops if np.isfinite(t)] + [floor or 0.0])
    ax.set_ylim(0, ymax * 1.18 if ymax > 0 else 1.0)  # headroom for the annotations
    # below the axes: inside, it hid the annotation of whichever bar was tallest
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(_title(report), fontsize=11)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    columns = "\n".join(f"  {c.header}: {c.help}" for c in LATENCY_COLUMNS + COLUMNS)
    parser = argparse.ArgumentParser(description="Print or plot a saved benchmark report (JSON).",
                                     epilog=f"columns (each shown when a setup has the number):\n{columns}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", metavar="JSON", help="print the report's table as GitHub markdown")
    parser.add_argument("--table", metavar="JSON", help="print the report's table as plain text")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="draw the report's latency chart")
    args = parser.parse_args(argv)
    if not (args.markdown or args.table or args.plot):
        parser.error("give at least one of --markdown, --table, --plot")
    try:  # read every file first, so a bad path is an argparse error (exit 2), not a traceback
        reports = {p: load_json(p) for p in (args.table, args.markdown, args.plot and args.plot[0]) if p}
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        parser.error(str(e))
    if args.table:
        print(format_table(reports[args.table]))
    if args.markdown:
        print(format_markdown(reports[args.markdown]))
    if args.plot:
        print(plot(reports[args.plot[0]], args.plot[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
