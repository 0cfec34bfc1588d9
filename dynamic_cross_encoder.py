"""DynamicCrossEncoder: a sentence-transformers CrossEncoder that predicts fast on GPUs.

Two paths, same `predict` / `rank` API as CrossEncoder, scores in the caller's order:

* padded (default): pairs sorted by token length, each batch padded to the next multiple of
  `bucket_multiple` (16) and run through the transformers model's forward compiled by inductor.
* packed (`packed=True`): no padding at all. The real tokens of a batch go in one `(T, hidden)`
  tensor, attention is variable-length (cu_seqlens), token 0 of each sequence feeds the head.
  Batches are cut by a token budget (`max_tokens_per_batch`, `batch_size` still a cap) and the
  token count is padded to a multiple of 256 so the compiled graph sees few shapes.

Both tokenize a call in chunks at the tokenizer's own speed (pair_tokenizer.py), the next chunk in
a worker thread while the current one is packed and launched. Batch layouts, attention backends
and the packed forward live in packing.py. Both paths use the loaded model's own weights.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from sentence_transformers import CrossEncoder
from tqdm.auto import tqdm

from device_policy import compile_kwargs, device_defaults, model_dtype  # device_defaults: imported from here too
from pair_tokenizer import PairTokenizer, Ragged, validate_pairs
from packing import (
    ATTENTION_BACKENDS,
    BUCKET_MULTIPLE,
    TOKEN_MULTIPLE,
    PaddedBatch,
    bucket_length,
    choose_attention_backend,
    chunk_bounds,
    pack_batch,
    packed_forward,
    packed_unsupported_reason,
    plan_token_batches,
    position_limit,
    token_buckets,
)

# torch.compile modes that capture CUDA graphs: a graph is recorded per input shape, and every
# replay writes its outputs into the same memory.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def uses_cuda_graphs(device_type: str, compile: bool, mode: str) -> bool:
    return compile and device_type == "cuda" and mode in CUDA_GRAPH_MODES


def compile_count() -> int:
    """Graphs compiled so far in this process (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class CallTimings:
    """What one `predict` call did (`last_timings`). forward_s is device time between CUDA events
    around each launch (idle gaps inside a launch included); wall time on the CPU."""

    tokenize_s: float = 0.0
    pack_s: float = 0.0
    forward_s: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    new_shapes: list = field(default_factory=list)  # batch shapes first met after warm-up


class DynamicCrossEncoder(CrossEncoder):
    """CrossEncoder with bucket padding, token-length sorting and a compiled forward.

    Args:
        model_name_or_path: a local directory or a hub id; a jina-reranker-v2 checkpoint is converted
            to the native XLM-R layout once (cached), so sdpa, flash-attn and the packed path apply.
        bucket_multiple: padded path: sequence lengths are padded to a multiple of this.
        compile: compile the forward with inductor.
        compile_mode: torch.compile mode; default "max-autotune" on CUDA (as the original), "default"
            on CPU. "reduce-overhead" / "max-autotune" capture CUDA graphs (one per batch shape).
        dynamic: torch.compile `dynamic`; default True (as the original): one graph serves every
            bucket. False compiles one graph per shape (see `warmup`).
        packed: use the padding-free path (XLM-R / RoBERTa classifiers; others fall back with a warning).
        max_tokens_per_batch: packed path token budget per batch; default 16384 on CUDA, 2048 on CPU.
        attention_backend: packed path backend name (packing.ATTENTION_BACKENDS); default: the fastest
            one for the device and dtype (`describe()` says which and why).
        **kwargs: CrossEncoder arguments (device, max_length, model_kwargs, ...). dtype defaults to the
            model config's on CUDA (bf16 for jina); on CPU to bf16 where the CPU has native bf16
            (AVX-512 BF16 or AMX), else float32 (device_policy.py); override with model_kwargs={"dtype": ...}.

    `predict` calls are serialized by a lock: one instance is safe to share between threads and each
    caller gets its own scores; for parallel GPU work use one instance per device.
    """

    def __init__(self, model_name_or_path: str, *, bucket_multiple: int = BUCKET_MULTIPLE, compile: bool = True,
                 compile_mode: str | None = None, dynamic: bool | None = None, packed: bool = False,
                 max_tokens_per_batch: int | None = None, attention_backend: str | None = None, **kwargs):
        device = torch.device(kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        defaults = device_defaults(device)
        if max_tokens_per_batch is None:
            max_tokens_per_batch = defaults["max_tokens_per_batch"]
        checked = {"bucket_multiple": bucket_multiple, "max_tokens_per_batch": max_tokens_per_batch,
                   "max_length": kwargs.get("max_length")}
        for name, value in ((k, v) for k, v in checked.items() if v is not None):
            _check_int(name, value)
        kwargs["device"] = str(device)
        model_kwargs = dict(kwargs.pop("model_kwargs", None) or {})
        model_kwargs["dtype"], dtype_reason = model_dtype(device, model_kwargs.get("dtype"))
        path = checkpoint_dir(model_name_or_path, local_files_only=kwargs.get("local_files_only", False))
        super().__init__(path, model_kwargs=model_kwargs, **kwargs)
        self.eval()
        self._check_max_length(kwargs.get("max_length"))

        self.dtype_reason = dtype_reason  # describe() says it beside the dtype
        self.bucket_multiple = bucket_multiple
        self.max_tokens_per_batch = max_tokens_per_batch
        self.compile_enabled = compile
        self.compile_mode = compile_mode or defaults["compile_mode"]
        self.dynamic = True if dynamic is None else dynamic
        self.last_timings = CallTimings()
        self.compile_seconds = 0.0
        self._lock = threading.RLock()
        self.compiles = 0  # graphs compiled by this instance's calls
        self._compiles_after_warmup: int | None = None
        self._shapes_seen: set = set()
        self.unwarmed_shapes: list = []  # shapes met after warm-up that it did not run, in order
        self._warned = (0, 0)
        self._graph_limit = 8  # dynamo's default recompile limit
        self._pairs_tok: PairTokenizer | None = None
        self._host_only = False
        self._dev = self.device  # refreshed per call: CrossEncoder.device walks every parameter
        self._setup_forward(packed, attention_backend)

    def _check_max_length(self, max_length):
        limit = self.position_limit
        if max_length is not None and max_length > limit:
            raise ValueError(f"max_length must be <= {limit} (the model's position limit), got {max_length}")
        if not self.max_seq_length or self.max_seq_length > limit:
            self.max_seq_length = limit  # tokenizers without model_max_length report ~1e30

    def _setup_forward(self, packed: bool, attention_backend: str | None):
        if packed and (reason := packed_unsupported_reason(self.model)):
            warnings.warn(f"packed=True is not supported for this model ({reason}); using the padded path", stacklevel=3)
            packed = False
        self.packed = packed
        if packed:
            self.attention_backend, self.attention_reason = choose_attention_backend(
                self.device.type, self.model.dtype, attention_backend)
            self._attention = ATTENTION_BACKENDS[self.attention_backend]
            fn = self._packed_logits
        else:
            self.attention_backend, self.attention_reason = self.model.config._attn_implementation, "the model's own"
            fn = self._padded_logits
        self._logits = (torch.compile(_own_code(fn), **compile_kwargs(self.device.type, self.compile_mode, self.dynamic))
                        if self.compile_enabled else fn)

    @property
    def position_limit(self) -> int:
        return position_limit(self.model.config)

    @property
    def uses_cuda_graphs(self) -> bool:
        return uses_cuda_graphs(self._dev.type, self.compile_enabled, self.compile_mode)

    @property
    def graphs_per_shape(self) -> bool:
        """Each new batch shape costs a compile (static graphs) or a CUDA-graph recording."""
        return self.compile_enabled and (self.uses_cuda_graphs or not self.dynamic)

    def describe(self) -> str:
        how = f"compiled (mode={self.compile_mode}, dynamic={self.dynamic}" if self.compile_enabled else "eager"
        if self.compile_enabled:
            how += ", CUDA graphs per shape)" if self.uses_cuda_graphs else ")"
        if self.packed:
            path = f"packed, {self.attention_backend} ({self.attention_reason}), <= {self.max_tokens_per_batch} tokens/batch"
        else:
            path = f"padded to x{self.bucket_multiple}, {self.attention_backend}"
        dtype = f"{str(self.model.dtype).removeprefix('torch.')} ({self.dtype_reason})"
        return f"DynamicCrossEncoder({path}; {how}; {dtype}; host: {self._pair_tokenizer().describe()})"

    # --- the compiled boundary: what it returns may live in CUDA-graph memory (see _run_batch) ----

    def _padded_logits(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    def _packed_logits(self, input_ids, positions, cu_seqlens, cls_index):
        # varlen kernels size their grid by max_seqlen and leave rows past it unwritten; the pad
        # tail is shorter than TOKEN_MULTIPLE, so this bound covers it as well as every real pair.
        max_seqlen = max(self.max_seq_length, TOKEN_MULTIPLE)
        return packed_forward(self.model, input_ids, positions, cu_seqlens, cls_index, max_seqlen=max_seqlen, attention=self._attention)

    # --- public API -----------------------------------------------------------------------------

    def predict(self, inputs, prompt_name: str | None = None, prompt: str | None = None, batch_size: int = 32,
                show_progress_bar: bool | None = None, activation_fn=None, apply_softmax: bool | None = False,
                convert_to_numpy: bool = True, convert_to_tensor: bool = False, device=None, pool=None,
                chunk_size: int | None = None, **kwargs):
        """Same contract as CrossEncoder.predict. Prompts, pools and device lists go to the
        CrossEncoder implementation (uncompiled); everything else takes the fast path."""
        _check_int("batch_size", batch_size)
        if prompt_name is not None or prompt is not None or pool is not None or isinstance(device, list) or kwargs:
            return super().predict(inputs, prompt_name=prompt_name, prompt=prompt, batch_size=batch_size, show_progress_bar=show_progress_bar, activation_fn=activation_fn, apply_softmax=apply_softmax, convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor, device=device, pool=pool, chunk_size=chunk_size, **kwargs)
        single = self.is_singular_input(inputs)
        pairs = validate_pairs([inputs] if single else inputs)
        if self.max_seq_length > self.position_limit:
            raise ValueError(f"max_length must be <= {self.position_limit} (the model's position limit), got {self.max_seq_length}")
        with self._lock, torch.inference_mode():
            if device is not None:
                self.to(device)
            logits = self._predict_logits(pairs, batch_size, bool(show_progress_bar))
            scores = (activation_fn or self.activation_fn)(logits)
        if self.num_labels == 1:
            scores = scores.squeeze(-1)
        elif apply_softmax:
            scores = torch.softmax(scores, dim=1)
        out = scores if convert_to_tensor else scores.numpy() if convert_to_numpy else list(scores)
        return out[0] if single else out

    def warmup(self, pairs=None, batch_size: int = 32, *, show_progress_bar: bool = False) -> float:
        """Compile (and record) the shapes later calls will meet, largest first; returns the seconds.

        Dynamic graphs: the extremes of the buckets. Per-shape graphs (CUDA graphs, or dynamic=False):
        every shape a call with this batch_size can meet. Then `pairs` once, if given. Shapes met
        later that this did not run are listed in `unwarmed_shapes` and counted in `last_timings`;
        where they cost a compile or a CUDA-graph recording, a warning says so.
        """
        _check_int("batch_size", batch_size)
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            self._graph_limit = self._graphs_needed(batch_size)
            self._dev, timings = self.device, CallTimings()
            for shape in tqdm(self._warmup_shapes(batch_size), desc="Compiling buckets", disable=not show_progress_bar):
                self._run_batch(self._dummy_batch(shape, batch_size), timings, [])
            _sync(self.device)
        if pairs is not None:
            self.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar)
        _sync(self.device)
        self.compile_seconds = time.perf_counter() - start
        self._compiles_after_warmup = self.compiles
        self.unwarmed_shapes, self._warned = [], (0, 0)
        return self.compile_seconds

    def host_seconds(self, pairs, batch_size: int = 32) -> float:
        """Seconds a `predict` call on `pairs` spends on all but the forward: tokenize, sort, pack, copy
        to the device, restore the order. len(pairs) / this is the most pairs/s this process can feed
        the GPU, whatever the GPU's speed."""
        _check_int("batch_size", batch_size)
        pairs = validate_pairs(pairs)
        kept = self.last_timings
        with self._lock, torch.inference_mode():
            self._host_only = True
            try:
                _sync(self.device)
                start = time.perf_counter()
                self._predict_logits(pairs, batch_size, progress=False)
                _sync(self.device)
                return time.perf_counter() - start
            finally:
                self._host_only, self.last_timings = False, kept

    def _warmup_shapes(self, batch_size: int) -> list:
        """Largest first: autotuning picks its kernels on the first shape it sees."""
        if self.packed:
            buckets = token_buckets(self.max_tokens_per_batch, self.max_seq_length)[::-1]
            return buckets if self.graphs_per_shape else [buckets[0], buckets[-1]]
        widths = list(range(bucket_length(self.max_seq_length, self.bucket_multiple), 0, -self.bucket_multiple))
        if self.graphs_per_shape:  # rows are padded to batch_size there, so the widths are every shape
            return [(batch_size, w) for w in widths]
        # batch 1 and the narrowest width are specialized by the compiler, so warm them too
        return [(batch_size, widths[0]), (batch_size, widths[-1]), (1, widths[-1])]

    def _graphs_needed(self, batch_size: int) -> int:
        """Static graphs: one per shape; dynamo's recompile limit is raised to exactly that many, so
        no warm shape falls back to eager (the default limit is 8)."""
        return max(8, len(self._warmup_shapes(batch_size)) + 1)

    def _dummy_batch(self, shape, batch_size):
        """A batch of `shape` filled with full-length sequences, like a real full batch."""
        tok = self.tokenizer
        if self.packed:
            length = min(shape, self.max_seq_length)
            n = max(1, min(batch_size, shape // length))
            flat = np.full(n * length, tok.unk_token_id, dtype=np.int32)
            flat[::length] = tok.cls_token_id
            return pack_batch(flat, np.full(n, length), tokens=shape, max_seqs=batch_size, pad_id=tok.pad_token_id, pin=False)
        rows, width = shape
        flat = np.full(rows * width, tok.unk_token_id, dtype=np.int32)
        return PaddedBatch.build(flat, np.full(rows, width), width=width, pad_id=tok.pad_token_id)

    # --- the fast path --------------------------------------------------------------------------

    def _pair_tokenizer(self) -> PairTokenizer:
        """The host tokenizer for the current max_seq_length (users may change it between calls)."""
        if self._pairs_tok is None or self._pairs_tok.max_length != self.max_seq_length:
            self._pairs_tok = PairTokenizer(self.tokenizer, self.max_seq_length)
        return self._pairs_tok

    def _encode(self, pairs) -> Ragged:
        """Token ids exactly as CrossEncoder's tokenizer call gives them (longest_first at max_length)."""
        return self._pair_tokenizer().encode(pairs)

    def _predict_logits(self, pairs, batch_size: int, progress: bool) -> torch.Tensor:
        """-> float32 logits (pairs, labels) on the CPU, in the caller's order."""
        timings = self.last_timings = CallTimings()
        self._dev = self.device
        if not pairs:
            return torch.zeros(0, self.num_labels)
        self._graph_limit = max(self._graph_limit, self._graphs_needed(batch_size))
        batches = self._packed_batches if self.packed else self._padded_batches
        out, order, events = [], [], []  # events: (start, end) per launch on CUDA
        with tqdm(total=len(pairs), desc="Pairs", disable=not progress) as bar:
            for batch, rows in batches(self._encoded_chunks(pairs, batch_size, timings), batch_size, timings):
                out.append(self._run_with_retry(batch, timings, events))
                order.append(rows)
                bar.update(len(rows))
        logits = torch.cat(out).cpu()  # the one device-to-host copy; it waits for the GPU
        if events:
            timings.forward_s = sum(s.elapsed_time(e) for s, e in events) / 1e3
        self._warn_new_graphs()
        restored = torch.empty_like(logits)
        restored[torch.from_numpy(np.concatenate(order))] = logits
        return restored

    def _encoded_chunks(self, pairs, batch_size, timings):
        """Yields (row indices into pairs, Ragged ids) chunk by chunk; chunk i + 1 is tokenized in a
        worker thread (the tokenizer releases the GIL) while chunk i is packed and launched."""
        bounds = chunk_bounds(len(pairs), batch_size)
        encoder = self._pair_tokenizer()

        def encode(lo, hi):
            t = time.perf_counter()
            return encoder.encode(pairs[lo:hi]), time.perf_counter() - t

        if len(bounds) == 1:  # nothing to overlap: no thread to start and hand over to
            ragged, timings.tokenize_s = encode(*bounds[0])
            yield np.arange(len(pairs)), ragged
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(encode, *bounds[0])
            for i, (lo, hi) in enumerate(bounds):
                ragged, seconds = pending.result()
                timings.tokenize_s += seconds
                if i + 1 < len(bounds):
                    pending = pool.submit(encode, *bounds[i + 1])
                yield np.arange(lo, hi), ragged

    def _padded_batches(self, chunks, batch_size, timings):
        """Yields (PaddedBatch, row indices into pairs): each chunk sorted longest first (as
        CrossEncoder sorts its call), cut into batches padded to the next bucket."""
        pin, pad_id = self._dev.type == "cuda", self.tokenizer.pad_token_id
        for chunk_rows, ids in chunks:
            t = time.perf_counter()
            order = np.argsort(-ids.lengths, kind="stable")
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                # per-shape graphs: a short last batch is filled up with copies of its own rows (their
                # logits are dropped), so every batch has one of the shapes warmup() ran
                part = ids.take(rows if not self.graphs_per_shape else np.resize(rows, batch_size))
                width = bucket_length(int(part.lengths.max()), self.bucket_multiple)
                batch = PaddedBatch.build(part.flat, part.lengths, width=width, pad_id=pad_id, rows=len(rows), pin=pin)
                timings.pack_s += time.perf_counter() - t
                yield batch, chunk_rows[rows]
                t = time.perf_counter()

    def _packed_batches(self, chunks, batch_size, timings):
        """Yields (PackedBatch, row indices into pairs): sequences in the caller's order (without
        padding their order does not matter), cut by the token budget and batch_size."""
        pin, pad_id = self._dev.type == "cuda", self.tokenizer.pad_token_id
        for chunk_rows, ids in chunks:
            t = time.perf_counter()
            starts = ids.starts
            for lo, hi in plan_token_batches(ids.lengths, self.max_tokens_per_batch, batch_size):
                batch = pack_batch(ids.flat[starts[lo] : starts[hi]], ids.lengths[lo:hi], max_seqs=batch_size, pad_id=pad_id, pin=pin)
                timings.pack_s += time.perf_counter() - t
                yield batch, chunk_rows[lo:hi]
                t = time.perf_counter()

    def _run_with_retry(self, batch, timings, events) -> torch.Tensor:
        """Run one batch; on out-of-memory split it in halves and retry, so no pair is lost."""
        try:
            return self._run_batch(batch, timings, events)
        except torch.OutOfMemoryError:
            if self._dev.type == "cuda":
                torch.cuda.empty_cache()
            halves = batch.split(self.tokenizer.pad_token_id)
            if halves is None:
                raise
            warnings.warn(f"out of memory on a batch of {batch.num_seqs} pairs; split in two and retried", stacklevel=2)
            return torch.cat([self._run_with_retry(h, timings, events) for h in halves])

    def _run_batch(self, batch, timings: CallTimings, events: list) -> torch.Tensor:
        """One launch -> logits (num_seqs, labels) on the device, in memory this call owns."""
        args = batch.device_args(self._dev)
        before = compile_count()
        cuda = self._dev.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        if self._host_only:  # host_seconds(): everything but the forward
            out = torch.zeros(batch.num_seqs, self.num_labels, device=self._dev)
        else:
            with self._static_graph_limit():
                out = self._logits(*args)
        # Copied here, outside the compiled function and before the next launch: under CUDA graphs
        # `out` is the graph's static output, which the next replay overwrites (a clone made inside
        # the compiled function lives in the graph's memory pool too).
        logits = out[: batch.num_seqs].clone()
        if cuda:
            end.record()
            events.append((start, end))
        else:
            timings.forward_s += time.perf_counter() - t
        self.compiles += compile_count() - before  # under our lock: other instances do not count
        if not self._host_only:
            self._note_shape(batch.shape_key, timings)
        timings.real_tokens += batch.real_tokens
        timings.padded_tokens += batch.padded_tokens
        timings.batches += 1
        return logits

    def _static_graph_limit(self):
        if not (self.compile_enabled and not self.dynamic):
            return contextlib.nullcontext()
        return torch._dynamo.config.patch(recompile_limit=self._graph_limit)

    def _note_shape(self, key, timings: CallTimings):
        if key in self._shapes_seen:
            return
        self._shapes_seen.add(key)
        if self._compiles_after_warmup is not None:
            timings.new_shapes.append(key)
            self.unwarmed_shapes.append(key)

    def _warn_new_graphs(self):
        """A compile or a CUDA-graph recording after warm-up runs inside a user's call: say so, once per
        new graph. Dynamo's counter does not see CUDA-graph recordings, so new shapes count them."""
        if self._compiles_after_warmup is None or not self.compile_enabled:
            return
        compiles = self.compiles - self._compiles_after_warmup
        recordings = len(self.unwarmed_shapes) if self.uses_cuda_graphs else 0
        if compiles > self._warned[0] or recordings > self._warned[1]:
            self._warned = (compiles, recordings)
            warnings.warn(f"{compiles} graph compile(s) after warm-up and {recordings} CUDA-graph recording(s) "
                          f"(expected 0): shapes the warm-up did not run: {self.unwarmed_shapes[:8]}", stacklevel=5)


def _own_code(method):
    """The bound method on a private copy of its code object. Dynamo keeps compiled graphs, and counts
    its recompile limit, per code object: without this, graphs of every instance in the process
    would count against each one's limit (and the limit, once hit, runs that code eager for good)."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(own, method.__self__)


def checkpoint_dir(name: str, *, local_files_only: bool = False) -> str:
    """A local checkpoint directory for a directory or a hub id (fetched by huggingface_hub, as
    CrossEncoder would). jina-reranker-v2's layout loads into XLM-R with unmatched weights (random
    scores, silently), so it is converted to the native layout once and cached."""
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(name, local_files_only=local_files_only)
        except Exception as e:  # not a repo id, not cached offline, no network, ...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"model_name_or_path {name!r} is not a local directory and could not be fetched "
                             f"from the hub ({reason})") from None
    from models import is_jina_checkpoint, native_checkpoint  # the conversion only; no hub probe or twin

    return native_checkpoint(path) if is_jina_checkpoint(path) else path


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
