"""The benchmark procedure shared by run_basic.py, run_torch_compile.py and run_combined.py.

One process, one set of inputs, every setup timed on the same workloads in the same order:

    flags -> BenchConfig -> workloads (data.py) -> for each setup: load, warm up / compile,
    timed runs per input order, scores of the first workload kept -> diff against the baseline
    (and fp32 with --check-fp32) -> report (bench_utils) -> table, JSON, markdown, plot.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

import bench_utils as bu
import data
import models

# A machine without a GPU runs the full-size model at a few hundred pairs per minute, so the
# defaults shrink there (only values the user did not set) and the output says so.
# The packed path's CPU attention materializes a (tokens, tokens) mask, hence the smaller budget.
CPU_DEFAULTS = dict(num_pairs=8, runs=3, warmup=1, batch_size=8, num_queries=4, docs_per_query=16, max_tokens_per_batch=2048)
GPU_DEFAULTS = dict(num_pairs=1024, runs=10, warmup=10, batch_size=64, num_queries=100, docs_per_query=100, max_tokens_per_batch=16384)


@dataclass
class Setup:
    """One row of the table: how to build the model and how to call it on a workload."""

    name: str
    build: Callable[[], Any]  # -> model
    describe: Callable[[Any], str]
    compiled: bool = False
    baseline: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block: the flags are in --help
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(description: str, exclude=()) -> argparse.ArgumentParser:
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bu.add_bench_arguments(p, exclude=exclude)
    # None = "not given": filled from the GPU or CPU defaults once the device is known.
    p.set_defaults(**{k: None for k in GPU_DEFAULTS})
    return p


def parse_config(p: argparse.ArgumentParser, argv=None) -> tuple[bu.BenchConfig, list[str]]:
    """Flags -> BenchConfig; every invalid value exits 2 with a one-line message."""
    args = vars(p.parse_args(argv))
    notes = []
    try:
        device = bu.resolve_device(args["device"])
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {args['device']!r} needs CUDA, which this machine does not have; use --device cpu")
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        p.error(f"--device: {e}")
    defaults = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    shrunk = {k: v for k, v in defaults.items() if args[k] is None}
    args.update(shrunk)
    unused = ("num_pairs",) if args["workload"] == "rerank" else ("num_queries", "docs_per_query")
    said = {k: v for k, v in shrunk.items() if k not in unused}
    if not device.startswith("cuda") and said:
        notes.append("no GPU: defaults shrunk to " + ", ".join(f"{k}={v}" for k, v in said.items()) + " (set the flags to override)")
    args["device"] = device
    try:
        cfg = bu.BenchConfig(**args)
    except ValueError as e:
        p.error(str(e))
    if cfg.max_length > 1024:
        p.error(f"max_length must be <= 1024 (the XLM-R position limit), got {cfg.max_length}")
    return cfg, notes


# ---------------------------------------------------------------------------------------------


def make_workloads(cfg: bu.BenchConfig) -> dict:
    """{"warmup": [...], order: [...] per order}: pairs workloads are lists of pairs (run r uses
    seed + r * num_pairs, so runs share no pair); rerank workloads are (query, documents)."""
    if cfg.pairs_file:
        pairs = data.read_pairs_file(cfg.pairs_file)
        runs = [pairs] * cfg.runs  # the file is the workload: every run sees all of it
        warm = [pairs]
    elif cfg.workload == "pairs":
        runs = [data.load_pairs(cfg.num_pairs, seed=cfg.seed + (r + 1) * cfg.num_pairs) for r in range(cfg.runs)]
        warm = [data.load_pairs(cfg.num_pairs, seed=cfg.seed + 10_000_000 + r * cfg.num_pairs) for r in range(2)]
    else:
        queries = data.load_rerank(cfg.num_queries, cfg.docs_per_query, seed=cfg.seed)
        warm = data.load_rerank(min(cfg.num_queries, 5), cfg.docs_per_query, seed=cfg.seed + 10_000_000)
        return {"warmup": warm, "latency": queries}
    by_order = {"warmup": warm}
    for order in cfg.orders():
        by_order[order] = runs if order == "unsorted" else [sort_by_length(w) for w in runs]
    return by_order


def sort_by_length(pairs):
    """The original's "sorted inputs": longest pair first, by characters."""
    return sorted(pairs, key=lambda p: -(len(p[0]) + len(p[1])))


def token_lengths(tokenizer, pairs, max_length: int) -> list[int]:
    enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


def baseline_padding(lengths: list[int], pairs, batch_size: int) -> float:
    """Padding efficiency of CrossEncoder.predict: it sorts by characters and pads each batch to its longest."""
    order = np.argsort([-(len(a) + len(b)) for a, b in pairs], kind="stable")
    lens = np.asarray(lengths)[order]
    padded = sum(int(lens[i : i + batch_size].max()) * len(lens[i : i + batch_size]) for i in range(0, len(lens), batch_size))
    return float(lens.sum() / padded)


def call(model, workload, batch_size):
    """One predict call as a user makes it: pairs -> scores, or a rerank query -> scores per document."""
    if isinstance(workload, tuple):
        query, docs = workload
        return model.predict([[query, d] for d in docs], batch_size=batch_size, show_progress_bar=False)
    return model.predict(workload, batch_size=batch_size, show_progress_bar=False)


# ---------------------------------------------------------------------------------------------


def baseline_setup(cfg, path, dtype) -> Setup:
    holder = {}

    def build():
        model, attention = models.load_baseline(path, device=cfg.device, dtype=dtype, max_length=cfg.max_length)
        holder["attention"] = attention
        return model

    return Setup("CrossEncoder (baseline)", build, lambda m: f"sentence-transformers CrossEncoder, attention: {holder['attention']}", baseline=True)


def dynamic_setup(cfg, path, dtype, *, packed: bool) -> Setup:
    from dynamic_cross_encoder import DynamicCrossEncoder

    def build():
        return DynamicCrossEncoder(
            path,
            device=cfg.device,
            max_length=cfg.max_length,
            model_kwargs={"dtype": dtype},
            compile_mode=cfg.compile_mode,
            packed=packed,
            max_tokens_per_batch=cfg.max_tokens_per_batch,
        )

    name = "DynamicCrossEncoder packed" if packed else "DynamicCrossEncoder (x16 buckets)"
    return Setup(name, build, lambda m: m.describe(), compiled=True)


def run(cfg: bu.BenchConfig, setups_for: Callable[[bu.BenchConfig, str, torch.dtype], list[Setup]], *, notes=(), title: str) -> dict:
    """Time every setup on the same workloads; returns the report (also written as JSON)."""
    device, dtype = cfg.device, bu.resolve_dtype(cfg.dtype, cfg.device)
    progress = not cfg.quiet and sys.stderr.isatty()
    if not progress:  # the libraries' own loading bars too
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    workloads = make_workloads(cfg)  # a broken pairs file stops here, before any model loads
    path = models.resolve_model(cfg.model)  # so does a model that cannot be found
    print(title)
    print(cfg)
    for note in notes:
        print(f"note: {note}")
    source = models.model_source(path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    timed = workloads.get("latency") or workloads.get("unsorted") or workloads.get("sorted")
    pairs_of = (lambda w: [[w[0], d] for d in w[1]]) if cfg.workload == "rerank" and not cfg.pairs_file else (lambda w: w)
    lengths = [token_lengths(tokenizer, pairs_of(w), cfg.max_length) for w in timed]
    config = model_dims(path)
    report = bu.new_report(
        cfg,
        environment=bu.environment(device, dtype),
        model_source=source,
        workload=bu.workload_summary(cfg.workload if not cfg.pairs_file else "pairs", lengths, **config),
        notes=list(notes),
    )
    if models.is_synthetic(path):
        report["notes"].append("random weights: timings are valid, scores are not meaningful (the differences between setups still are)")
    report["compute"] = bu.compute_floor(report["workload"]["flops"], bu.measure_gemm_tflops(device, dtype))
    print(f"model: {source}")
    print(f"compute floor: {report['compute']['floor_s']:.4f} s per call ({report['compute']['label']}, {report['compute']['tflops']:.3g} TFLOP/s)")

    reference = None  # the baseline's scores on every timed workload
    first_scores = {}  # setup name -> scores on the first timed workload (for --check-fp32)
    orders = [o for o in ("sorted", "unsorted", "latency") if o in workloads]
    try:
        for setup in setups_for(cfg, path, dtype):
            print(f"\n== {setup.name}")
            bu.reset_peak_memory(device)
            t0 = time.perf_counter()
            model = setup.build()
            load_s = time.perf_counter() - t0
            extras = {"load_s": load_s, "attention": setup.describe(model)}
            print(f"   {extras['attention']} (loaded in {load_s:.1f} s)")
            if setup.compiled:
                first = workloads["warmup"][0]
                extras["compile_s"] = model.warmup(pairs_of(first), batch_size=cfg.batch_size, show_progress_bar=progress)
                print(f"   warm-up and compilation: {extras['compile_s']:.1f} s")
            runs = {}
            for order in orders:
                runs[order] = bu.run_timed(
                    f"{setup.name} [{order}]",
                    lambda w, m=model: call(m, w, cfg.batch_size),
                    workloads[order],
                    device=device,
                    warmup_calls=cfg.resolved_warmup(device),
                    warmup_workloads=workloads["warmup"],
                    progress=progress,
                    keep_outputs=True,
                )
                if not runs[order]["complete"]:
                    raise KeyboardInterrupt
            extras.update(score_checks(runs, reference, orders))
            first_scores[setup.name] = runs[orders[-1]]["outputs"][0]
            if setup.baseline:
                reference = {o: runs[o]["outputs"] for o in orders}
                extras["padding_efficiency"] = baseline_padding(lengths[0], pairs_of(timed[0]), cfg.batch_size)
            if setup.compiled:
                t = model.last_timings
                extras.update(host_s=t["tokenize_s"] + t["pack_s"], forward_s=t["forward_s"], padding_efficiency=bu.padding_efficiency(t["real_tokens"], t["padded_tokens"]))
            extras["peak_mem_bytes"] = bu.peak_memory(device)
            bu.add_setup(report, setup.name, baseline=setup.baseline, **{o: runs[o] for o in orders}, **extras)
            if cfg.json:
                bu.write_json(report, cfg.json)
            del model
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if cfg.check_fp32:
            fp32_check(cfg, path, report, workloads[orders[-1]][0], first_scores)
        report["complete"] = True
    except KeyboardInterrupt:
        report["notes"].append("interrupted: the setups and runs finished before Ctrl-C are kept")
        print("\ninterrupted: writing what finished", file=sys.stderr)
    if cfg.json:
        bu.write_json(report, cfg.json)
        print(f"\nwrote {cfg.json}")
    print()
    print(bu.format_table(report))
    if cfg.markdown:
        print()
        print(bu.format_markdown(report))
    if cfg.plot and report["setups"]:
        bu.plot(report, cfg.plot)
        print(f"wrote {cfg.plot}")
    return report


def score_checks(runs: dict, reference: dict | None, orders) -> dict:
    """Max / mean |score diff| against the baseline over every timed workload's scores, and for
    rerank the ranking agreement per query."""
    if reference is None:
        return {}
    ours = np.concatenate([np.ravel(s) for o in orders for s in runs[o]["outputs"]])
    ref = np.concatenate([np.ravel(s) for o in orders for s in reference[o]])
    out = {f"{k}_diff": v for k, v in bu.score_diff(ours, ref).items()}  # max_abs_diff, mean_abs_diff
    if "latency" in orders:
        agree = bu.ranking_agreement(runs["latency"]["outputs"], reference["latency"], k=10)
        out.update(agree)
    return out


def fp32_check(cfg, path, report, workload, first_scores):
    """--check-fp32: the baseline in fp32 on the first timed workload, against every setup."""
    print("\n== fp32 reference (CrossEncoder, float32)")
    model, _ = models.load_baseline(path, device=cfg.device, dtype=torch.float32, max_length=cfg.max_length)
    ref = np.ravel(call(model, workload, cfg.batch_size))
    for setup in report["setups"]:
        diff = bu.score_diff(np.ravel(first_scores[setup["name"]]), ref)
        setup["fp32_max_abs_diff"], setup["fp32_mean_abs_diff"] = diff["max_abs"], diff["mean_abs"]
    del model


def model_dims(path) -> dict:
    """Sizes for the FLOP count, from the checkpoint's config.json (jina's uses the same names)."""
    import json
    import os

    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    return dict(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"])


def main(description: str, setups_for, *, exclude=(), argv=None) -> dict:
    """Entry point of the run scripts: bad flags, a missing model or a malformed pairs file exit 2
    with one line, no traceback."""
    p = parser(description, exclude)
    cfg, notes = parse_config(p, argv)
    try:
        return run(cfg, setups_for, notes=notes, title=description)
    except (data.PairsFileError, models.ModelNotFoundError) as e:
        p.error(str(e))
