"""DynamicCrossEncoder: a sentence-transformers CrossEncoder that predicts fast on GPUs.

Two paths, same `predict` / `rank` API as CrossEncoder, scores in the caller's order:

* padded (default): pairs sorted by token length, each batch padded to the next multiple of
  `bucket_multiple` (16) and run through the transformers base model compiled by inductor.
* packed (`packed=True`): no padding at all. The real tokens of a batch go in one `(1, T)` input to
  the same transformers code, whose attention runs per sequence (cu_seqlens) through a function
  registered in its AttentionInterface. Batches are cut by a token budget (`max_tokens_per_batch`,
  `batch_size` still a cap) and the token count is padded to a multiple of 256 where each shape
  costs a graph (CUDA graphs, static compiles), of 128 for a dynamic graph.

Every reranker family (families/: BERT, XLM-R, ModernBERT, Qwen, causal yes/no LMs, ...) says which
token its head reads and what the head is; both paths apply it to those rows only. Both tokenize a
call in chunks at the tokenizer's own speed (pair_tokenizer.py), the next chunk in a worker thread
while the current one is packed and launched. Batch layouts and attention backends live in
packing.py. Both paths use the loaded model's own weights. `encode_pairs` tokenizes on the caller's
thread ahead of `predict` (a server's request handlers), so the model's thread only packs and runs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from sentence_transformers import CrossEncoder
from tqdm.auto import tqdm

from compiled import (  # noqa: F401  (compile_count, cudagraph_skips: imported from here too)
    CallTimings,
    compile_count,
    cudagraph_skips,
    own_code,
    sync,
    timing_event,
    uses_cuda_graphs,
)
from families import default_position_offset, describe_family, family_of, packed_logits, padded_logits, uses_token_types
from device_policy import device_defaults, inductor_settings, model_dtype  # device_defaults: imported from here too
from pair_tokenizer import EncodedPairs, PairTokenizer, Ragged, chunk_bounds, validate_pairs
from packing import (
    BUCKET_MULTIPLE,
    GRID_BACKENDS,
    PaddedBatch,
    bucket_length,
    choose_attention_backend,
    dynamic_tokens,
    pack_batch,
    packed_attention_on,
    plan_token_batches,
    position_limit,
    register_library_attention,
    seqlen_bounds,
    token_buckets,
    warm_lengths,
)
from models import checkpoint_dir




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
        packed: use the padding-free path (every family whose transformers code dispatches through the
            attention interface; DeBERTa-v2 falls back to padded, with a warning when asked for,
            `describe()` says why). Default: the device's (device_policy.device_defaults): packed on a
            CPU, where bucket padding does not beat the baseline; padded on CUDA.
        max_tokens_per_batch: packed path token budget per batch; default 16384 on CUDA, 4096 on CPU.
        attention_backend: packed path backend name (packing.ATTENTION_BACKENDS); default: the fastest
            one for the device and dtype (`describe()` says which and why).
        **kwargs: CrossEncoder arguments (device, max_length, model_kwargs, ...). dtype defaults to the
            model config's on CUDA (bf16 for jina); on CPU to bf16 where the CPU has native bf16
            (AVX-512 BF16 or AMX), else float32 (device_policy.py); override with model_kwargs={"dtype": ...}.

    One instance is safe to share between threads: every call that runs the model is made by one
    worker thread the instance owns (inductor's CUDA graphs are per thread), one call at a time, and
    each caller gets its own scores or exception. For parallel GPU work use one instance per device.
    """

    def __init__(self, model_name_or_path: str, *, bucket_multiple: int = BUCKET_MULTIPLE, compile: bool = True,
                 compile_mode: str | None = None, dynamic: bool | None = None, packed: bool | None = None,
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
        self.family = family_of(self)  # UnsupportedModelError (a ValueError) naming what is missing
        self._pool = self.family.pool(self)
        self._token_types = uses_token_types(self)
        self._check_max_length(kwargs.get("max_length"))

        self.dtype_reason = dtype_reason  # describe() says it beside the dtype
        self.bucket_multiple = bucket_multiple
        self.max_tokens_per_batch = max_tokens_per_batch
        self.compile_enabled = compile
        self.compile_mode = compile_mode or defaults["compile_mode"]
        self.dynamic = True if dynamic is None else dynamic
        self.last_timings = CallTimings()
        self.compile_seconds = 0.0
        # the one thread that makes this instance's model calls (started on first use; see _on_owner)
        self._owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{type(self).__name__}-model")
        self._owner_ident: int | None = None
        self.compiles = 0  # graphs compiled by this instance's calls
        self._compiles_after_warmup: int | None = None
        self._shape_runs: dict = {}  # batch shape -> times it ran (CUDA graphs record on the 2nd)
        self.unwarmed_shapes: list = []  # shapes met after warm-up that it did not run, in order
        self._late_recordings: set = set()  # shapes whose CUDA graph is recorded inside a user's call
        self._warned = (0, 0)
        self._graph_limit = 8  # dynamo's default recompile limit
        self._pairs_tok: PairTokenizer | None = None
        self._host_only = False
        self._dev = self.device  # refreshed per call: CrossEncoder.device walks every parameter
        self._setup_forward(defaults["packed"] if packed is None else packed, attention_backend, asked=packed is not None)

    def _check_max_length(self, max_length):
        limit = self.position_limit
        if max_length is not None and max_length > limit:
            raise ValueError(f"max_length must be <= {limit} (the model's position limit), got {max_length}")
        if not self.max_seq_length or self.max_seq_length > limit:
            self.max_seq_length = limit  # tokenizers without model_max_length report ~1e30

    def _setup_forward(self, packed: bool, attention_backend: str | None, asked: bool = True):
        self.packed_reason = self.family.packed_reason(self)
        if packed and self.packed_reason:
            if asked:  # the device's default falls back without a word; describe() says why
                warnings.warn(f"packed=True is not supported for {self.family.name} ({self.packed_reason}); "
                              "using the padded path", stacklevel=3)
            packed = False
        self.packed = packed
        if packed:
            window = "sliding_attention" in (getattr(self.model.config, "layer_types", None) or ())
            self.attention_backend, self.attention_reason = choose_attention_backend(
                self.device.type, self.model.dtype, attention_backend, window=window)
            register_library_attention()
            fn = self._packed_logits
        else:
            self.attention_backend, self.attention_reason = self.model.config._attn_implementation, "the model's own"
            fn = self._padded_logits
        self._logits = (torch.compile(own_code(fn), mode=self.compile_mode, dynamic=self.dynamic)
                        if self.compile_enabled else fn)

    @property
    def position_limit(self) -> int:
        limit = position_limit(self.model.config)
        return limit if limit is not None else int(self.tokenizer.model_max_length)

    @property
    def _pad_id(self) -> int:
        """The model config's pad id (what RoBERTa positions and "last non-pad token" heads compare
        with, as transformers does), else the tokenizer's."""
        for pad in (self.model.config.pad_token_id, self.tokenizer.pad_token_id):
            if pad is not None:
                return int(pad)
        return 0

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
            if self.packed_reason:
                path += f" (no packed path: {self.packed_reason})"
        dtype = f"{str(self.model.dtype).removeprefix('torch.')} ({self.dtype_reason})"
        family = describe_family(self.family, self._pool, self._token_types)
        return f"DynamicCrossEncoder({family}; {path}; {how}; {dtype}; host: {self._pair_tokenizer().describe()})"

    # --- the compiled boundary: what it returns may live in CUDA-graph memory (see _run_batch) ----

    def _padded_logits(self, *args):
        return padded_logits(self, self.family, self._pool, self._token_types, *args)

    def _packed_logits(self, *args):
        # the last argument, max_seqlen, bounds every sequence of the batch and its pad tail (pack_batch)
        return packed_logits(self, self.family, self._pool, self._token_types, *args)

    # --- public API -----------------------------------------------------------------------------

    def predict(self, inputs, prompt_name: str | None = None, prompt: str | None = None, batch_size: int = 32,
                show_progress_bar: bool | None = None, activation_fn=None, apply_softmax: bool | None = False,
                convert_to_numpy: bool = True, convert_to_tensor: bool = False, device=None, pool=None,
                chunk_size: int | None = None, **kwargs):
        """Same contract as CrossEncoder.predict (convert_to_tensor: on the model's device). Prompts, pools
        and device lists go to the CrossEncoder implementation (uncompiled, on the model's thread);
        everything else takes the fast path. `inputs` may also be `encode_pairs`' result: the pairs
        tokenized ahead, on another thread."""
        _check_int("batch_size", batch_size)
        slow_path = prompt_name is not None or prompt is not None or pool is not None or isinstance(device, list) or kwargs
        if isinstance(inputs, EncodedPairs):
            if slow_path:
                raise ValueError("encoded inputs take the fast path only: no prompt, pool, device list or extra arguments")
            if inputs.max_length != self.max_seq_length:
                raise ValueError(f"inputs were encoded at max_length {inputs.max_length}, the model now truncates "
                                 f"at {self.max_seq_length}: encode them again")
            single, pairs = False, inputs
        elif slow_path:  # on the model's thread too: a packed call there switches the model's attention
            return self._on_owner(functools.partial(
                super().predict, inputs, prompt_name=prompt_name, prompt=prompt, batch_size=batch_size,
                show_progress_bar=show_progress_bar, activation_fn=activation_fn, apply_softmax=apply_softmax,
                convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor, device=device, pool=pool,
                chunk_size=chunk_size, **kwargs))
        else:
            single = self.is_singular_input(inputs)
            pairs = validate_pairs([inputs] if single else inputs)
        if self.max_seq_length > self.position_limit:
            raise ValueError(f"max_length must be <= {self.position_limit} (the model's position limit), got {self.max_seq_length}")
        scores = self._on_owner(self._predict_scores, pairs, batch_size, bool(show_progress_bar), activation_fn, device)
        if self.num_labels == 1:
            scores = scores.squeeze(-1)
        elif apply_softmax:
            scores = torch.softmax(scores, dim=1)
        # a tensor where the model is, as CrossEncoder stacks its scores on the model's device
        out = scores.to(self.device) if convert_to_tensor else scores.numpy() if convert_to_numpy else list(scores)
        return out[0] if single else out

    def encode_pairs(self, pairs) -> EncodedPairs:
        """Tokenize pairs on the calling thread, exactly as `predict` would; `predict(encoded)` then
        skips its tokenization. Also gives each pair's token count before truncation."""
        return self._pair_tokenizer().encode_pairs(validate_pairs(pairs))

    def warmup(self, pairs=None, batch_size: int = 32, *, show_progress_bar: bool = False) -> float:
        """Compile (and record) the shapes later calls will meet, largest first; returns the seconds.

        Dynamic graphs: the extremes of the buckets. Per-shape graphs (CUDA graphs, or dynamic=False):
        every shape a call with this batch_size can meet; under CUDA graphs each runs twice, since
        inductor records a shape on its second call (the first runs eagerly in the graph's pool).
        Then `pairs` once, if given. Shapes met later that this did not run are listed in
        `unwarmed_shapes` and counted in `last_timings`; where they cost a compile or a CUDA-graph
        recording, a warning says so.
        """
        _check_int("batch_size", batch_size)
        if pairs is not None:
            validate_pairs(pairs)
        return self._on_owner(self._warmup, pairs, batch_size, show_progress_bar)

    def _warmup(self, pairs, batch_size: int, show_progress_bar: bool) -> float:
        start = time.perf_counter()
        self._graph_limit = self._graphs_needed(batch_size)
        self._dev, timings = self.device, CallTimings()
        runs = 2 if self.uses_cuda_graphs else 1
        for shape in tqdm(self._warmup_shapes(batch_size), desc="Compiling buckets", disable=not show_progress_bar):
            batch = self._dummy_batch(shape, batch_size)
            for _ in range(runs):
                self._run_batch(batch, timings, [])
        sync(self.device)
        if pairs is not None:
            self.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar)
        sync(self.device)
        self.compile_seconds = time.perf_counter() - start
        self._compiles_after_warmup = self.compiles
        self.unwarmed_shapes, self._late_recordings, self._warned = [], set(), (0, 0)
        return self.compile_seconds

    def host_seconds(self, pairs, batch_size: int = 32) -> float:
        """Seconds a `predict` call on `pairs` spends on all but the forward: tokenize, sort, pack, copy
        to the device, restore the order. len(pairs) / this is the most pairs/s this process can feed
        the GPU, whatever the GPU's speed."""
        _check_int("batch_size", batch_size)
        return self._on_owner(self._host_seconds, validate_pairs(pairs), batch_size)

    def _host_seconds(self, pairs, batch_size: int) -> float:
        kept = self.last_timings
        self._host_only = True
        try:
            sync(self.device)
            start = time.perf_counter()
            self._predict_logits(pairs, batch_size, progress=False)
            sync(self.device)
            return time.perf_counter() - start
        finally:
            self._host_only, self.last_timings = False, kept

    # --- the thread that owns the model calls ---------------------------------------------------

    def _on_owner(self, fn, *args):
        """fn(*args) under inference mode on the instance's own worker thread; the caller waits and
        gets its result, or its exception unchanged. Inductor's CUDA-graph manager is thread-local
        (torch/_inductor/cudagraph_trees.py): recording from a thread other than the one that compiled
        fails an assertion on torch 2.11-2.12 (pytorch issue 123177) and starts a second tree on 2.13.
        One worker also serializes the calls, so each sees the instance's state alone."""
        if threading.get_ident() == self._owner_ident:  # warmup() calling predict()
            return fn(*args)
        return self._owner.submit(self._owned, fn, *args).result()

    def _owned(self, fn, *args):
        self._owner_ident = threading.get_ident()
        with torch.inference_mode(), inductor_settings(self._dev.type):
            return fn(*args)

    def _predict_scores(self, pairs, batch_size: int, progress: bool, activation_fn, device) -> torch.Tensor:
        if device is not None:
            self.to(device)
        return (activation_fn or self.activation_fn)(self._predict_logits(pairs, batch_size, progress))

    def _warmup_shapes(self, batch_size: int) -> list:
        """Largest first: autotuning picks its kernels on the first shape it sees. Packed graphs per
        shape: (tokens, max_seqlen) for every bound a batch of that token count can have."""
        if self.packed:
            buckets = token_buckets(self.max_tokens_per_batch, self.max_seq_length)[::-1]
            if not self.graphs_per_shape:
                return [buckets[0], buckets[-1]]  # a dynamic graph: max_seqlen is a symbolic int
            bounds = seqlen_bounds(self.max_seq_length) if self._sized_grid else [0]
            return [(t, b) for t in buckets for b in bounds if self._warm_lengths((t, b), batch_size) is not None]
        widths = list(range(bucket_length(self.max_seq_length, self.bucket_multiple), 0, -self.bucket_multiple))
        if self.graphs_per_shape:  # rows are padded to batch_size there, so the widths are every shape
            return [(batch_size, w) for w in widths]
        return [(batch_size, widths[0]), (batch_size, widths[-1])]  # no batch of 1: see _padded_batches

    def _graphs_needed(self, batch_size: int) -> int:
        """Static graphs: one per shape; dynamo's recompile limit is raised to exactly that many, so
        no warm shape falls back to eager (the default limit is 8)."""
        return max(8, len(self._warmup_shapes(batch_size)) + 1)

    def _rows(self, n: int, batch_size: int) -> int:
        """Rows of a batch of n pairs: the padded batch's rows, the packed batch's sequence slots (the
        CPU grid's rows). A graph per shape: always batch_size. A dynamic graph: n, but 2 at least
        (dynamo specializes a size of 1: a second compile) unless batch_size is 1. Never batch_size
        when fewer pairs fit the token budget: each spare slot is a grid row of attention."""
        return batch_size if self.graphs_per_shape else max(n, min(batch_size, 2) * self.compile_enabled)

    def _dummy_batch(self, shape, batch_size):
        """A batch of `shape` filled with full-length sequences, like a real full batch."""
        # the ids do not matter, only the shapes: a token that is not the pad
        token = 1 + self._pad_id if self._pad_id + 1 < len(self.tokenizer) else 0
        if self.packed and isinstance(shape, tuple):  # a graph per shape: (tokens, max_seqlen)
            lengths = self._warm_lengths(shape, batch_size)
            flat = np.full(int(lengths.sum()), token, dtype=np.int32)
            return self._pack(flat, lengths, None, max_seqs=batch_size, pin=False, tokens=shape[0])
        if self.packed:
            length = min(shape, self.max_seq_length)
            n = max(1, min(batch_size, shape // length))
            lengths = np.full(n, length)
            # graphs per shape: exactly this token count; a dynamic graph: as _packed_batches makes it
            rows = self._rows(n, batch_size)
            return self._pack(np.full(n * length, token, dtype=np.int32), lengths, None, max_seqs=rows, pin=False,
                              tokens=shape if self.graphs_per_shape else dynamic_tokens(lengths, rows))
        rows, width = shape
        return self._pad(np.full(rows * width, token, dtype=np.int32), np.full(rows, width), None, width=width)

    def _warm_lengths(self, shape, batch_size):
        return warm_lengths(*shape, max_length=self.max_seq_length, max_seqs=batch_size,
                            max_tokens=self.max_tokens_per_batch)

    @property
    def _sized_grid(self) -> bool:
        """The packed attention reads max_seqlen (packing.GRID_BACKENDS); else batches carry 0."""
        return self.attention_backend in GRID_BACKENDS

    def _pack(self, flat, lengths, types, **kw):
        return pack_batch(flat, lengths, pad_id=self._pad_id, types=types, pool=self._pool, sized_grid=self._sized_grid,
                          position_offset=default_position_offset(self.model.config), **kw)

    def _pad(self, flat, lengths, types, **kw):
        return PaddedBatch.build(flat, lengths, pad_id=self._pad_id, types=types, pool=self._pool, **kw)

    # --- the fast path --------------------------------------------------------------------------

    def _pair_tokenizer(self) -> PairTokenizer:
        """The host tokenizer for the current max_seq_length (users may change it between calls)."""
        if self._pairs_tok is None or self._pairs_tok.max_length != self.max_seq_length:
            self._pairs_tok = PairTokenizer(self.tokenizer, self.max_seq_length, token_types=self._token_types,
                                            reference=self._reference_tokenize)
        return self._pairs_tok

    def _reference_tokenize(self, pairs) -> dict:
        """CrossEncoder's own tokenization (prompt templates, truncation keeping their end)."""
        return self.preprocess([list(p) for p in pairs])

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
        """Yields (row indices into pairs, Ragged ids) chunk by chunk, the next one tokenized ahead;
        encoded pairs in one chunk, as they are."""
        if isinstance(pairs, EncodedPairs):
            yield np.arange(len(pairs)), pairs.ids
            return
        for rows, ragged, seconds in self._pair_tokenizer().encode_chunks(pairs, chunk_bounds(len(pairs), batch_size)):
            timings.tokenize_s += seconds
            yield rows, ragged

    def _padded_batches(self, chunks, batch_size, timings):
        """Yields (PaddedBatch, row indices into pairs): each chunk sorted longest first (as
        CrossEncoder sorts its call), cut into batches padded to the next bucket."""
        pin = self._dev.type == "cuda"
        for chunk_rows, ids in chunks:
            t = time.perf_counter()
            order = np.argsort(-ids.lengths, kind="stable")
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                # a short batch is filled up with copies of its own rows (their logits are dropped): per-
                # shape graphs get one of the shapes warmup() ran, a dynamic graph no size of 1 (_rows)
                part = ids.take(np.resize(rows, self._rows(len(rows), batch_size)))
                width = bucket_length(int(part.lengths.max()), self.bucket_multiple)
                batch = self._pad(part.flat, part.lengths, part.types, width=width, rows=len(rows), pin=pin)
                timings.pack_s += time.perf_counter() - t
                yield batch, chunk_rows[rows]
                t = time.perf_counter()

    def _packed_batches(self, chunks, batch_size, timings):
        """Yields (PackedBatch, row indices into pairs): each chunk sorted longest first, cut by the
        token budget and batch_size. Without padding the order leaves the tokens as they are, but
        a batch of like lengths has the smallest longest sequence: the CPU grid's width and the
        GPU kernels' max_seqlen."""
        pin = self._dev.type == "cuda"
        for chunk_rows, ids in chunks:
            t = time.perf_counter()
            order = np.argsort(-ids.lengths, kind="stable")
            ids, chunk_rows = ids.take(order), chunk_rows[order]
            starts = ids.starts
            for lo, hi in plan_token_batches(ids.lengths, self.max_tokens_per_batch, batch_size):
                span = slice(starts[lo], starts[hi])
                lengths = ids.lengths[lo:hi]
                # a graph per shape needs few token counts (TOKEN_MULTIPLE); a dynamic one takes a short tail
                rows = self._rows(hi - lo, batch_size)
                tokens = None if self.graphs_per_shape else dynamic_tokens(lengths, rows)
                batch = self._pack(ids.flat[span], lengths, None if ids.types is None else ids.types[span],
                                   max_seqs=rows, pin=pin, tokens=tokens)
                timings.pack_s += time.perf_counter() - t
                yield batch, chunk_rows[lo:hi]
                t = time.perf_counter()

    def _run_with_retry(self, batch, timings, events) -> torch.Tensor:
        """Run one batch; on out-of-memory split it in halves and retry, so no pair is lost."""
        try:
            return self._run_batch(batch, timings, events)
        except torch.OutOfMemoryError:
            halves = batch.split(self._pad_id)
            if halves is None:
                raise
        # Retried out here: inside the except block the traceback keeps every frame of the failed
        # attempt alive (its device copies, the activations allocated before the failure), so the
        # cache could free none of it and the halves would compete with it (pytorch issue 18853).
        if self._dev.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(f"out of memory on a batch of {batch.num_seqs} pairs; split in two and retried", stacklevel=2)
        return torch.cat([self._run_with_retry(h, timings, events) for h in halves])

    def _run_batch(self, batch, timings: CallTimings, events: list) -> torch.Tensor:
        """One launch -> logits (num_seqs, labels) on the device, in memory this call owns."""
        args = batch.device_args(self._dev)
        before = compile_count()
        cuda = self._dev.type == "cuda"
        if cuda:
            start = timing_event(self._dev)
        t = time.perf_counter()
        if self._host_only:  # host_seconds(): everything but the forward
            out = torch.zeros(batch.num_seqs, self.num_labels, device=self._dev)
        else:
            with self._static_graph_limit(), packed_attention_on(self.model.config, self.attention_backend, self.packed):
                out = self._logits(*args)
        # Copied here, outside the compiled function and before the next launch: under CUDA graphs
        # `out` is the graph's static output, which the next replay overwrites (a clone made inside
        # the compiled function lives in the graph's memory pool too).
        logits = out[: batch.num_seqs].clone()
        if cuda:
            events.append((start, timing_event(self._dev)))
        else:
            timings.forward_s += time.perf_counter() - t
        self.compiles += compile_count() - before  # a process-wide counter: a concurrent instance would count too
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
        runs = self._shape_runs.get(key, 0)
        self._shape_runs[key] = runs + 1
        if self._compiles_after_warmup is None:
            return
        if runs == 0:
            timings.new_shapes.append(key)
            self.unwarmed_shapes.append(key)
        if runs < 2 and self.uses_cuda_graphs:  # not recorded yet: it is, in this call or the next
            self._late_recordings.add(key)

    def _warn_new_graphs(self):
        """A compile or a CUDA-graph recording after warm-up runs inside a user's call: say so, once per
        new graph. Dynamo's counter does not see CUDA-graph recordings, so shapes that had not run
        twice (see `_note_shape`) count them."""
        if self._compiles_after_warmup is None or not self.compile_enabled:
            return
        compiles = self.compiles - self._compiles_after_warmup
        recordings = len(self._late_recordings)
        if compiles > self._warned[0] or recordings > self._warned[1]:
            self._warned = (compiles, recordings)
            shapes = self.unwarmed_shapes + [k for k in self._late_recordings if k not in self.unwarmed_shapes]
            warnings.warn(f"{compiles} graph compile(s) after warm-up and {recordings} CUDA-graph recording(s) "
                          f"(expected 0): shapes the warm-up did not run or record: {shapes[:8]}", stacklevel=5)


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
