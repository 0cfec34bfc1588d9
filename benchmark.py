"""The benchmark procedure shared by run_basic.py, run_torch_compile.py and run_combined.py.

One process, one set of inputs, every setup timed on the same workloads in the same order:

    flags -> BenchConfig (device defaults resolved once, printed)
    prepare:    workloads (data.py), model path and its limits, tokens and FLOPs, compute floor
    time_setup: per setup, load, warm up / compile, timed runs per input order, score checks
    emit:       JSON, table, markdown, plot (report.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

import bench_utils as bu
import data
import models
import packing
import report as rp
import device_policy
from device_policy import device_defaults as class_defaults

ORDERS = ("sorted", "unsorted")
DTYPES = ("auto", "bfloat16", "float16", "float32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Every value that depends on the device, as (on CUDA, on CPU): a config field left unset (None,
# or "auto" for dtype) takes its device's value when the BenchConfig is made, and --help shows both.
# A machine without a GPU runs the full-size model at a few hundred pairs per minute, so the sizes
# shrink there and the output says so; the token budget, the path (packed on a CPU) and the compile
# mode are the class's (device_policy.device_defaults); CPU kernels are not compiled per shape, so
# one warm-up call suffices; the CPU dtype is device_policy's (bf16 where the CPU has it natively,
# else fp32: emulated half precision is slow there).
DEVICE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "num_pairs": (1024, 8),
    "runs": (10, 3),
    "warmup": (10, 1),
    "batch_size": (64, 8),
    "num_queries": (100, 4),
    "docs_per_query": (100, 16),
    # the class's own defaults (max-autotune on CUDA: the original's recipe)
    **{k: (class_defaults("cuda")[k], class_defaults("cpu")[k]) for k in ("max_tokens_per_batch", "compile_mode", "packed")},
    "dtype": ("bfloat16", str(class_defaults("cpu")["dtype"]).removeprefix("torch.")),
}
SHRUNK = ("num_pairs", "runs", "warmup", "batch_size", "num_queries", "docs_per_query", "max_tokens_per_batch")


def _opt(kind, help, **kw):
    return {"type": kind, "help": help, **kw}


@dataclass
class BenchConfig:
    """Every knob of a benchmark run, in one place; `print(cfg)` at start. After construction every
    field holds the value that runs (device and device defaults resolved)."""

    model: str = field(default="auto", metadata=_opt(
        str, "hub id, local dir, 'synthetic[-tiny]' or 'synthetic-<family>[-tiny]' (models.FAMILY_TWINS); "
        "auto: the hub model, else its synthetic twin"))
    device: str = field(default="auto", metadata=_opt(str, "'auto' (cuda if available), 'cuda', 'cuda:N' or 'cpu'"))
    dtype: str = field(default="auto", metadata=_opt(
        str, "dtype of the model weights; on a CPU bf16 where it is native (AVX-512 BF16 or AMX), else float32 "
             f"(here: {device_policy.model_dtype('cpu')[1]})", choices=DTYPES))
    batch_size: int | None = field(default=None, metadata=_opt(int, "pairs per predict batch"))
    num_pairs: int | None = field(default=None, metadata=_opt(int, "pairs per timed run (pairs workload)"))
    runs: int | None = field(default=None, metadata=_opt(int, "timed runs; mean +- std over the last 5"))
    warmup: int | None = field(default=None, metadata=_opt(int, "untimed warm-up calls before each input order"))
    max_length: int = field(default=512, metadata=_opt(int, "truncate each pair to this many tokens (at most the "
                                                               "model's position limit, 1024 for XLM-R)"))
    order: str = field(default="both", metadata=_opt(str, "input order of the pairs workload",
                                                     choices=ORDERS + ("both",)))
    compile_mode: str | None = field(default=None, metadata=_opt(str, "torch.compile mode of DynamicCrossEncoder",
                                                                  choices=COMPILE_MODES))
    workload: str = field(default="pairs", metadata=_opt(
        str, "'pairs': random pairs per run; 'rerank': 1 query x N docs per call", choices=bu.WORKLOADS))
    num_queries: int | None = field(default=None, metadata=_opt(int, "queries (rerank workload)"))
    docs_per_query: int | None = field(default=None, metadata=_opt(int, "documents per query (rerank workload)"))
    pairs_file: str | None = field(default=None, metadata=_opt(
        str, "your own pairs (.jsonl with query/document, .tsv or .parquet) instead of random ones"))
    packed: bool | None = field(default=None, metadata=_opt(bool, "padding-free packed batches (run_torch_compile.py, "
                                                                   "serve.py); --no-packed: x16 buckets"))
    max_tokens_per_batch: int | None = field(default=None, metadata=_opt(int, "token budget per packed batch"))
    check_fp32: bool = field(default=False, metadata=_opt(bool, "also compare scores against an fp32 reference"))
    json: str | None = field(default=None, metadata=_opt(
        str, "write the report as JSON to this path (rewritten after each setup)"))
    markdown: bool = field(default=False, metadata=_opt(bool, "also print the table as GitHub markdown"))
    plot: str | None = field(default=None, metadata=_opt(str, "save a latency bar chart (PNG) to this path"))
    quiet: bool = field(default=False, metadata=_opt(bool, "no progress bars"))
    seed: int = field(default=0, metadata=_opt(
        int, "seed of the workloads: timed run r (from 0) uses seed + (r + 1) * num_pairs, the warm-up ones "
             "seed + 10000000 + r * num_pairs; rerank queries use seed + q"))

    def __post_init__(self):
        self.device = bu.resolve_device(self.device)
        try:
            cuda = bu.is_cuda(self.device)
        except RuntimeError:  # torch's message lists every device type it knows
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        if cuda and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} needs CUDA, which this machine does not have; use --device cpu")
        for name, values in DEVICE_DEFAULTS.items():
            if getattr(self, name) in (None, "auto"):
                setattr(self, name, values[0] if cuda else values[1])
        for name in ("batch_size", "num_pairs", "runs", "max_length", "num_queries", "docs_per_query",
                     "max_tokens_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def orders(self) -> tuple[str, ...]:
        return ORDERS if self.order == "both" else (self.order,)

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        lines = [f"  {f.name:<{width}} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)]
        return "BenchConfig\n" + "\n".join(lines)


class SettingError(ValueError):
    """A flag that does not fit the model (found once the model is known): a usage error, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block: the flags are in --help
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _default_text(f: dataclasses.Field) -> str:
    if f.name in DEVICE_DEFAULTS:
        on_cuda, on_cpu = DEVICE_DEFAULTS[f.name]
        return f" (default: {on_cuda} on CUDA, {on_cpu} on CPU)"
    return "" if f.default is None else f" (default: {f.default})"


def parser(description: str, exclude=()) -> argparse.ArgumentParser:
    """One flag per BenchConfig field (`--batch-size`, ...), each default said once in its help."""
    p = _Parser(description=description)
    for f in dataclasses.fields(BenchConfig):
        if f.name in exclude:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if meta["type"] is bool and f.name in DEVICE_DEFAULTS:  # on or off, else the device's
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=meta["help"] + _default_text(f))
        elif meta["type"] is bool:
            p.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
        else:
            p.add_argument(flag, dest=f.name, type=meta["type"], default=f.default, choices=meta.get("choices"),
                           help=meta["help"] + _default_text(f))
    return p


def parse_config(p: argparse.ArgumentParser, argv=None) -> tuple[BenchConfig, list[str]]:
    """Flags -> BenchConfig and notes for the output; every invalid value exits 2 with one line."""
    args = vars(p.parse_args(argv))
    try:
        cfg = BenchConfig(**args)
    except ValueError as e:
        p.error(str(e))
    unused = ("num_pairs",) if cfg.workload == "rerank" else ("num_queries", "docs_per_query")
    shrunk = [k for k in SHRUNK if k in args and args[k] is None and k not in unused]
    notes = []
    if not bu.is_cuda(cfg.device) and shrunk:
        said = ", ".join(f"{k}={getattr(cfg, k)}" for k in shrunk)
        notes.append(f"no GPU: defaults shrunk to {said} (set the flags to override)")
    return cfg, notes


# ---------------------------------------------------------------------------------------------


def make_workloads(cfg: BenchConfig) -> dict:
    """{"warmup": [...], order: [...] per order}: pairs workloads are lists of pairs (run r uses
    seed + (r + 1) * num_pairs, so runs share no pair); rerank workloads are (query, documents)."""
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


def longest_first(pairs) -> np.ndarray:
    """Indices of `pairs` by character length, longest first (stable): the order in which
    CrossEncoder.predict batches, and the original's "sorted inputs"."""
    return np.argsort([-(len(a) + len(b)) for a, b in pairs], kind="stable")


def sort_by_length(pairs):
    return [pairs[i] for i in longest_first(pairs)]


def baseline_padding(lengths: list[int], pairs, batch_size: int) -> float:
    """Padding efficiency of CrossEncoder.predict: each batch of its order is padded to its longest."""
    lens = np.asarray(lengths)[longest_first(pairs)]
    batches = [lens[i : i + batch_size] for i in range(0, len(lens), batch_size)]
    return float(lens.sum() / sum(int(b.max()) * len(b) for b in batches))


def as_pairs(workload) -> list:
    """A pairs workload as it is, a rerank item (query, documents) as its [query, document] pairs."""
    if isinstance(workload, tuple):
        query, docs = workload
        return [[query, d] for d in docs]
    return workload


def call(model, workload, batch_size):
    """One predict call as a user makes it: pairs -> scores, or a rerank query -> scores per document."""
    return model.predict(as_pairs(workload), batch_size=batch_size, show_progress_bar=False)


def token_lengths(tokenizer, pairs, max_length: int) -> list[int]:
    enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


def last_call_breakdown(timings) -> dict:
    """DynamicCrossEncoder.last_timings as SetupResult fields: the one place that reads them."""
    return dict(host_s=timings.tokenize_s + timings.pack_s, forward_s=timings.forward_s,
                padding_efficiency=bu.padding_efficiency(timings.real_tokens, timings.padded_tokens))


# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One row of the table: how to build the model and how to call it on a workload. A row that
    cannot run here (`unavailable`: why, and how to add it) is named in the report's notes."""

    name: str
    build: Callable[[], Any] | None  # -> model
    describe: Callable[[Any], str] | None
    compiled: bool = False
    baseline: bool = False
    unavailable: str | None = None


def baseline_setup(cfg: BenchConfig, path, dtype, name: str = "CrossEncoder (baseline)", baseline: bool = True) -> Setup:
    holder = {}

    def build():
        model, attention = models.load_baseline(path, device=cfg.device, dtype=dtype, max_length=cfg.max_length)
        holder["attention"] = attention
        return model

    return Setup(name, build, lambda m: f"sentence-transformers CrossEncoder, {str(dtype).removeprefix('torch.')}, "
                                        f"attention: {holder['attention']}", baseline=baseline)


def dynamic_setup(cfg: BenchConfig, path, dtype, *, packed: bool) -> Setup:
    from dynamic_cross_encoder import DynamicCrossEncoder

    def build():
        return DynamicCrossEncoder(path, device=cfg.device, max_length=cfg.max_length, model_kwargs={"dtype": dtype},
                                   compile_mode=cfg.compile_mode, packed=packed,
                                   max_tokens_per_batch=cfg.max_tokens_per_batch)

    name = "DynamicCrossEncoder packed" if packed else "DynamicCrossEncoder (x16 buckets)"
    return Setup(name, build, lambda m: m.describe(), compiled=True)


OPENVINO = "CrossEncoder (OpenVINO)"
OPENVINO_INSTALL = ("optimum-intel is not installed; add this row with pip install 'optimum-intel[openvino]' "
                    "(it moves torch and transformers to other versions: a separate venv keeps this one)")


def openvino_setups(cfg: BenchConfig, path) -> list[Setup]:
    """The CPU runtime a user would pick instead of torch, as a peer row: CrossEncoder on OpenVINO
    (optimum-intel) at its default precision (bf16 where the CPU has it); [] on CUDA."""
    if bu.is_cuda(cfg.device):
        return []
    try:
        import openvino
        import optimum.intel  # noqa: F401  (the backend CrossEncoder loads)
    except ImportError:
        return [Setup(OPENVINO, None, None, unavailable=OPENVINO_INSTALL)]
    from dynamic_cross_encoder import checkpoint_dir
    from sentence_transformers import CrossEncoder

    def build():  # jina's layout converted to native XLM-R first, as DynamicCrossEncoder loads it
        return CrossEncoder(checkpoint_dir(path), backend="openvino", device="cpu", max_length=cfg.max_length)

    def describe(model) -> str:  # optimum-intel's `request` is the compiled model (the precision it runs in)
        compiled = getattr(model[0].auto_model, "request", None)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT") if compiled is not None else None
        precision = hint.to_string() if hint is not None else "default"  # e.g. "bf16"
        version = openvino.__version__.split("-")[0]  # "2026.4.1-22982-<hash>-releases/2026/4"
        return f"sentence-transformers CrossEncoder, backend openvino {version}, precision {precision}"

    return [Setup(OPENVINO, build, describe)]


@dataclass
class Prepared:
    """What every setup of one run shares: the same inputs, in the same order, and the report."""

    cfg: BenchConfig
    path: str  # the model directory
    workloads: dict  # make_workloads()
    orders: list[str]  # the timed lists of workloads: "sorted" and/or "unsorted", or "latency"
    primary: str  # the order report numbers come from: latency, else unsorted, else sorted
    lengths: list[list[int]]  # token lengths of each timed workload of the primary order
    report: rp.Report
    progress: bool

    @property
    def first(self) -> list:  # the first timed workload of the primary order, as pairs
        return as_pairs(self.workloads[self.primary][0])


def model_config(path: str):
    """The model's transformers config; jina checkpoints define theirs in remote code."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=models.is_jina_checkpoint(path))


def model_dims(config) -> dict[str, int]:
    """hidden, intermediate and layer count for the FLOPs count, under each family's config names
    (DistilBERT: dim, hidden_dim, n_layers)."""
    text = config.get_text_config()

    def first(*names):
        return next(int(getattr(text, n)) for n in names if getattr(text, n, None) is not None)

    return dict(hidden=first("hidden_size", "dim"), intermediate=first("intermediate_size", "hidden_dim"),
                layers=first("num_hidden_layers", "n_layers"))


def prepare(cfg: BenchConfig, notes, title: str) -> Prepared:
    """Inputs, model path and report; every user error is raised here, before any model loads."""
    progress = not cfg.quiet and sys.stderr.isatty()
    if not progress:  # the libraries' own loading bars too
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    workloads = make_workloads(cfg)  # a broken pairs file stops here
    path = models.resolve_model(cfg.model)  # so does a model that cannot be found
    config = model_config(path)
    if (limit := packing.position_limit(config)) is not None and cfg.max_length > limit:
        raise SettingError(f"max_length must be <= {limit} (the model's position limit), got {cfg.max_length}")
    print(title)
    print(cfg)
    for note in notes:
        print(f"note: {note}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    orders = [o for o in ("sorted", "unsorted", "latency") if o in workloads]
    primary = next(o for o in ("latency", "unsorted", "sorted") if o in workloads)
    lengths = [token_lengths(tokenizer, as_pairs(w), cfg.max_length) for w in workloads[primary]]
    dims = model_dims(config)
    report = rp.Report(config=dataclasses.asdict(cfg), environment=bu.environment(cfg.device, cfg.torch_dtype),
                       model_source=models.model_source(path), notes=list(notes),
                       workload=bu.workload_summary("rerank" if primary == "latency" else "pairs", lengths, **dims))
    if models.is_synthetic(path):
        report.notes.append("random weights: timings are valid, scores are not meaningful "
                            "(the differences between setups still are)")
    if not bu.is_cuda(cfg.device):  # before the GEMM rate is measured: it runs on these threads
        report.notes.append(f"CPU: {device_policy.describe_cpu()}; {device_policy.match_cpu_threads()}")
    report.compute = bu.compute_floor(report.workload.flops, bu.measure_gemm_tflops(cfg.device, cfg.torch_dtype))
    print(f"model: {report.model_source}")
    print(f"compute floor: {report.compute.floor_s:.4f} s per call ({report.compute.label}, "
          f"{report.compute.tflops:.3g} TFLOP/s)")
    return Prepared(cfg, path, workloads, orders, primary, lengths, report, progress)


def time_setup(prep: Prepared, setup: Setup, reference: dict | None) -> dict[str, bu.RunResult]:
    """Load, warm up / compile and time one setup on every order; adds its row to the report and
    returns its runs (with their scores). Ctrl-C in a run stops the benchmark, this row left out."""
    cfg = prep.cfg
    print(f"\n== {setup.name}")
    bu.reset_peak_memory(cfg.device)
    t0 = time.perf_counter()
    model = setup.build()
    measured: dict[str, Any] = {"load_s": time.perf_counter() - t0, "attention": setup.describe(model)}
    print(f"   {measured['attention']} (loaded in {measured['load_s']:.1f} s)")
    if setup.compiled:
        warm = as_pairs(prep.workloads["warmup"][0])
        measured["compile_s"] = model.warmup(warm, batch_size=cfg.batch_size, show_progress_bar=prep.progress)
        print(f"   warm-up and compilation: {measured['compile_s']:.1f} s")
    runs = {}
    for order in prep.orders:
        runs[order] = bu.run_timed(f"{setup.name} [{order}]", lambda w, m=model: call(m, w, cfg.batch_size),
                                   prep.workloads[order], device=cfg.device, warmup_calls=cfg.warmup,
                                   warmup_workloads=prep.workloads["warmup"], progress=prep.progress,
                                   keep_outputs=True)
        if not runs[order].complete:
            raise KeyboardInterrupt
    measured.update(score_checks(runs, reference, prep.orders))
    if setup.baseline:
        measured["padding_efficiency"] = baseline_padding(prep.lengths[0], prep.first, cfg.batch_size)
    if setup.compiled:
        measured.update(last_call_breakdown(model.last_timings), new_shapes=len(model.unwarmed_shapes))
        if model.unwarmed_shapes:
            print(f"   batch shapes met after warm-up: {model.unwarmed_shapes}")
    ceiling = bu.host_ceiling([as_pairs(w) for w in prep.workloads[prep.primary]], model.tokenizer, cfg.max_length,
                              model=model if setup.compiled else None, batch_size=cfg.batch_size)
    measured.update(dataclasses.asdict(ceiling))
    measured["peak_mem_bytes"] = bu.peak_memory(cfg.device)
    rp.add_setup(prep.report, setup.name, baseline=setup.baseline, **runs, **measured)
    del model
    gc.collect()
    if bu.is_cuda(cfg.device):
        torch.cuda.empty_cache()
    return runs


def score_checks(runs: dict[str, bu.RunResult], reference: dict | None, orders) -> dict:
    """Max / mean |score diff| against the baseline over every timed workload's scores, and for
    rerank the ranking agreement per query; as SetupResult fields."""
    if reference is None:
        return {}
    ours = np.concatenate([np.ravel(s) for o in orders for s in runs[o].outputs])
    ref = np.concatenate([np.ravel(s) for o in orders for s in reference[o]])
    diff = bu.score_diff(ours, ref)
    out = {"max_abs_diff": diff.max_abs, "mean_abs_diff": diff.mean_abs}
    if "latency" in orders:
        agree = bu.ranking_agreement(runs["latency"].outputs, reference["latency"], k=10)
        out.update(kendall_tau=agree.kendall_tau, top10_overlap=agree.top_k_overlap)
    return out


def fp32_check(prep: Prepared, first_scores: dict, reference: dict | None) -> None:
    """--check-fp32: every setup's scores on the first timed workload of the last order against
    CrossEncoder fp32, which a CPU run in another dtype times as a row (each row's fp32 speedup; on
    a GPU one untimed call: fp32 there is no contender, and the GPU check's time is short)."""
    cfg, setups = prep.cfg, prep.report.setups
    if cfg.dtype == "float32" and (base := prep.report.baseline()) is not None and base.baseline:
        ref, ref_row = first_scores[base.name], None
    elif bu.is_cuda(cfg.device):
        model, _ = models.load_baseline(prep.path, device=cfg.device, dtype=torch.float32, max_length=cfg.max_length)
        ref, ref_row = np.ravel(call(model, prep.workloads[prep.orders[-1]][0], cfg.batch_size)), None
        del model
    else:
        setup = baseline_setup(cfg, prep.path, torch.float32, name="CrossEncoder fp32 (reference)", baseline=False)
        ref = np.ravel(time_setup(prep, setup, reference)[prep.orders[-1]].outputs[0])
        ref_row = setups[-1]
        first_scores[setup.name] = ref
    for setup in setups:
        diff = bu.score_diff(np.ravel(first_scores[setup.name]), np.ravel(ref))
        setup.fp32_max_abs_diff, setup.fp32_mean_abs_diff = diff.max_abs, diff.mean_abs
        if ref_row is not None and ref_row.time_s and setup.time_s:
            setup.fp32_speedup = ref_row.time_s / setup.time_s


def emit(report: rp.Report, cfg: BenchConfig) -> None:
    if cfg.json:
        rp.write_json(report, cfg.json)
        print(f"\nwrote {cfg.json}")
    print()
    print(rp.format_table(report))
    if cfg.markdown:
        print()
        print(rp.format_markdown(report))
    if cfg.plot and report.setups:
        rp.plot(report, cfg.plot)
        print(f"wrote {cfg.plot}")


def run(cfg: BenchConfig, setups_for: Callable[[BenchConfig, str, torch.dtype], list[Setup]], *, notes=(),
        title: str) -> rp.Report:
    """Time every setup on the same workloads; returns the report (also written as JSON)."""
    prep = prepare(cfg, notes, title)
    reference = None  # the baseline's scores on every timed workload
    first_scores = {}  # setup name -> scores on the first timed workload of the last order
    try:
        for setup in setups_for(cfg, prep.path, cfg.torch_dtype):
            if setup.unavailable:
                print(f"\n== {setup.name}: not run ({setup.unavailable})")
                prep.report.notes.append(f"{setup.name} not run: {setup.unavailable}")
                continue
            runs = time_setup(prep, setup, reference)
            if setup.baseline:
                reference = {o: runs[o].outputs for o in prep.orders}
            first_scores[setup.name] = runs[prep.orders[-1]].outputs[0]
            if cfg.json:  # an interrupted run still leaves a file
                rp.write_json(prep.report, cfg.json)
        if cfg.check_fp32:
            fp32_check(prep, first_scores, reference)
        prep.report.complete = True
    except KeyboardInterrupt:
        prep.report.notes.append("interrupted: the setups and runs finished before Ctrl-C are kept")
        print("\ninterrupted: writing what finished", file=sys.stderr)
    emit(prep.report, cfg)
    return prep.report


def main(description: str, setups_for, *, exclude=(), argv=None) -> rp.Report:
    """Entry point of the run scripts: bad flags, a missing model, a max_length the model cannot take
    or a malformed pairs file exit 2 with one line, no traceback."""
    p = parser(description, exclude)
    cfg, notes = parse_config(p, argv)
    try:
        return run(cfg, setups_for, notes=notes, title=description)
    except (data.PairsFileError, models.ModelNotFoundError, SettingError) as e:
        p.error(str(e))
