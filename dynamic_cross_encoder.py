"""DynamicCrossEncoder: a sentence-transformers CrossEncoder that predicts fast on GPUs.

Two paths, same `predict` / `rank` API as CrossEncoder, scores in the caller's order:

* padded (default): the whole call is tokenized once, pairs are sorted by token length, each batch
  is padded to the next multiple of `bucket_multiple` (16) and run through the transformers
  model's forward compiled by inductor.
* packed (`packed=True`): no padding at all. The real tokens of a batch go in one `(T, hidden)`
  tensor, attention is variable-length (cu_seqlens), token 0 of each sequence feeds the head.
  Batches are cut by a token budget (`max_tokens_per_batch`, `batch_size` still a cap), the token
  count is padded to a multiple of 256 so the compiled graph sees few shapes, and the next chunk
  is tokenized in a worker thread while the GPU runs the current batch.

Both paths use the loaded model's own weights; nothing is copied.
"""

from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import CrossEncoder
from tqdm.auto import tqdm

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # optional: pip install flash-attn --no-build-isolation
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10, CUDA only
except ImportError:
    varlen_attn = None

# Padded path: sequence lengths are rounded up to a multiple of this, so a compiled graph
# (or a CUDA graph) is reused across batches instead of one shape per distinct length.
BUCKET_MULTIPLE = 16
# Packed path: the token count of a batch is padded to a multiple of this (the pad tail is its own
# sequence, so no real token attends to it). Keeps GEMM row counts aligned and bounds the shapes a
# static compile or a CUDA graph per shape can meet to max_tokens_per_batch / TOKEN_MULTIPLE.
TOKEN_MULTIPLE = 256
PACKED_MODEL_TYPES = ("xlm-roberta", "roberta")
ROBERTA_POSITION_TYPES = ("xlm-roberta", "roberta", "camembert", "xlm-roberta-xl")


# ----------------------------------------------------------------------------------------------
# Pure helpers: bucket math, batching plans, packing. No model, so they are tested on their own.


def bucket_length(length: int, multiple: int = BUCKET_MULTIPLE) -> int:
    """Smallest multiple of `multiple` that is >= length (and >= multiple)."""
    return max(multiple, -(-length // multiple) * multiple)


def token_buckets(max_tokens_per_batch: int, max_seq_length: int) -> list[int]:
    """Every token count a packed batch can be padded to: multiples of TOKEN_MULTIPLE up to the budget,
    or up to one sequence of max_seq_length when that is larger (a pair over the budget runs alone)."""
    top = bucket_length(max(max_tokens_per_batch, max_seq_length), TOKEN_MULTIPLE)
    return list(range(TOKEN_MULTIPLE, top + 1, TOKEN_MULTIPLE))


def plan_token_batches(lengths, max_tokens: int, max_seqs: int) -> list[tuple[int, int]]:
    """Greedy, in the given order: [start, end) ranges whose token sum stays <= max_tokens and whose
    size is <= max_seqs. A single sequence longer than the budget gets a batch of its own."""
    batches, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (total + n > max_tokens or i - start >= max_seqs):
            batches.append((start, i))
            start, total = i, 0
        total += int(n)
    if start < len(lengths):
        batches.append((start, len(lengths)))
    return batches


@dataclass
class PackedBatch:
    """One packed batch, all int32 in a single buffer (one host-to-device copy).

    input_ids:  (tokens,)       real tokens of every sequence back to back, then pad ids up to the bucket
    positions:  (tokens,)       2, 3, ... restarting at each sequence (XLM-R: padding_idx + 1 + offset)
    cu_seqlens: (max_seqs + 2,) sequence starts, then the end; the pad tail is one extra sequence and
                                unused slots repeat the end, so the shape only depends on max_seqs
    cls_index:  (max_seqs,)     row of token 0 of each sequence (0 in unused slots)
    """

    buffer: torch.Tensor
    tokens: int
    max_seqs: int
    num_seqs: int
    real_tokens: int

    def views(self, buffer: torch.Tensor | None = None):
        """(input_ids, positions, cu_seqlens, cls_index) as views of `buffer` (default: the host one)."""
        t, s = self.tokens, self.max_seqs
        b = self.buffer if buffer is None else buffer
        return b[:t], b[t : 2 * t], b[2 * t : 2 * t + s + 2], b[2 * t + s + 2 :]


def pack_batch(ids: np.ndarray, lengths: np.ndarray, *, tokens: int, max_seqs: int, pad_id: int, pin: bool) -> PackedBatch:
    """Pack right-padded token ids into one flat batch.

    ids: (batch, seq) right-padded, lengths: (batch,) real token counts -> PackedBatch with
    `tokens` >= lengths.sum() rows. Array operations only, no per-token Python loop.
    """
    n = len(lengths)
    real = int(lengths.sum())
    if n > max_seqs or real > tokens:
        raise ValueError(f"batch of {n} sequences / {real} tokens does not fit {max_seqs} / {tokens}")
    buf = torch.empty(2 * tokens + 2 * max_seqs + 2, dtype=torch.int32, pin_memory=pin)
    batch = PackedBatch(buf, tokens, max_seqs, n, real)
    flat_ids, pos, cu, cls = (v.numpy() for v in batch.views())
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    flat_ids[:real] = ids[mask]
    flat_ids[real:] = pad_id
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # XLM-R positions: real tokens count from padding_idx + 1; pads sit at padding_idx.
    pos[:real] = np.arange(real) - np.repeat(starts[:-1], lengths) + pad_id + 1
    pos[real:] = pad_id
    cu[: n + 1] = starts
    cu[n + 1 :] = tokens  # pad tail [real, tokens) is its own sequence; the rest are empty
    cls[:n] = starts[:-1]
    cls[n:] = 0
    return batch


# ----------------------------------------------------------------------------------------------
# Variable-length attention backends: (q, k, v) (tokens, heads, head_dim), cu_seqlens (seqs + 1,)
# -> (tokens, heads, head_dim). Each sequence attends only to itself.


def _attn_flash(q, k, v, cu, max_seqlen, scale):
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)


def _attn_varlen(q, k, v, cu, max_seqlen, scale):
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)


def _attn_nested(q, k, v, cu, max_seqlen, scale):
    offsets = cu.to(torch.int64)
    nt = [torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*nt, scale=scale).transpose(1, 2).values()


def _attn_block_diagonal(q, k, v, cu, max_seqlen, scale):
    # (tokens, tokens) mask: memory grows with tokens^2, so only for small batches (tests, CPU).
    seq_id = torch.searchsorted(cu[1:], torch.arange(q.shape[0], device=q.device, dtype=cu.dtype), right=True)
    mask = seq_id[:, None] == seq_id[None, :]
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


ATTENTION_BACKENDS = {
    "flash_attn": _attn_flash,
    "varlen_attn": _attn_varlen,
    "sdpa_nested": _attn_nested,
    "sdpa_block_diagonal": _attn_block_diagonal,
}


def available_attention_backends(device: torch.device) -> list[str]:
    """Backends usable on `device`, fastest first."""
    names = []
    if device.type == "cuda":
        if flash_attn_varlen_func is not None:
            names.append("flash_attn")
        if varlen_attn is not None:
            names.append("varlen_attn")
    # On the CPU the block-diagonal mask beats nested tensors by ~10x at the small token budgets
    # used there; its (tokens, tokens) mask is why the CPU budget defaults to 2048.
    return names + ["sdpa_block_diagonal", "sdpa_nested"]


def packed_unsupported_reason(model) -> str | None:
    """Why the packed forward cannot run this transformers model, or None if it can."""
    config = model.config
    if config.model_type not in PACKED_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {PACKED_MODEL_TYPES}"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {config.position_embedding_type!r} is not 'absolute'"
    if getattr(config, "is_decoder", False):
        return "decoder models are not supported"
    if not hasattr(model, "roberta") or not hasattr(model, "classifier"):
        return f"{type(model).__name__} is not a *ForSequenceClassification model with a .roberta encoder"
    return None


def packed_forward(model, input_ids, positions, cu_seqlens, cls_index, *, max_seqlen: int, attention) -> torch.Tensor:
    """Padding-free forward of an XLM-R sequence classifier with the model's own weights.

    input_ids, positions: (tokens,); cu_seqlens: (seqs + 1,); cls_index: (seqs,) -> logits (seqs, labels)
    in float32. Mirrors XLMRobertaForSequenceClassification in eval mode (dropout off): post-norm
    blocks, token type 0 for every token, the classification head on token 0 of each sequence.
    """
    enc = model.roberta
    emb = enc.embeddings
    x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions) + emb.token_type_embeddings.weight[0]
    x = emb.LayerNorm(x)
    tokens = x.shape[0]
    for layer in enc.encoder.layer:
        att = layer.attention.self
        heads, head_dim = att.num_attention_heads, att.attention_head_size
        q, k, v = (proj(x).view(tokens, heads, head_dim) for proj in (att.query, att.key, att.value))
        ctx = attention(q, k, v, cu_seqlens, max_seqlen, att.scaling).reshape(tokens, heads * head_dim)
        x = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
        h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        x = layer.output.LayerNorm(layer.output.dense(h) + x)
    # .clone(): under CUDA graphs the output memory is reused by the next replay.
    return model.classifier(x[cls_index].unsqueeze(1)).float().clone()


def compile_count() -> int:
    """Graphs compiled so far in this process (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------------------------------------


class DynamicCrossEncoder(CrossEncoder):
    """CrossEncoder with bucket padding, token-length sorting and a compiled forward.

    Args:
        model_name_or_path: hub id, local directory, "synthetic" or "synthetic-tiny" (models.resolve_model);
            a jina-reranker-v2 checkpoint is converted to the native XLM-R layout once, so sdpa,
            flash-attn and the packed path apply.
        bucket_multiple: padded path: sequence lengths are padded to a multiple of this.
        compile: compile the forward with inductor.
        compile_mode: torch.compile mode; default "max-autotune" on CUDA (as the original), "default"
            on CPU. "reduce-overhead" / "max-autotune" use CUDA graphs; outputs are cloned for them.
        dynamic: torch.compile `dynamic`; default True (as the original): one graph serves every
            bucket. False compiles one graph per bucket (see `warmup`).
        packed: use the padding-free path (XLM-R / RoBERTa classifiers; others fall back with a warning).
        max_tokens_per_batch: packed path token budget per batch; default 16384 on CUDA, 2048 on CPU.
        attention_backend: packed path backend name (see ATTENTION_BACKENDS); default: the fastest available.
        **kwargs: CrossEncoder arguments (device, max_length, model_kwargs, ...). dtype defaults to the
            model config's on CUDA (bf16 for jina) and float32 on CPU; override with model_kwargs={"dtype": ...}.

    `predict` calls are serialized by a lock: one instance is safe to share between threads and each
    caller gets its own scores; for parallel GPU work use one instance per device.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        bucket_multiple: int = BUCKET_MULTIPLE,
        compile: bool = True,
        compile_mode: str | None = None,
        dynamic: bool | None = None,
        packed: bool = False,
        max_tokens_per_batch: int | None = None,
        attention_backend: str | None = None,
        **kwargs,
    ):
        _check_int("bucket_multiple", bucket_multiple)
        device = torch.device(kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        if max_tokens_per_batch is None:
            max_tokens_per_batch = 16384 if device.type == "cuda" else 2048
        _check_int("max_tokens_per_batch", max_tokens_per_batch)
        max_length = kwargs.get("max_length")
        if max_length is not None:
            _check_int("max_length", max_length)
        kwargs["device"] = str(device)
        model_kwargs = dict(kwargs.pop("model_kwargs", None) or {})
        # transformers 5 loads the config's dtype ("auto"): bf16 for jina. On CPU that is slow and
        # not the reference, so float32 there unless asked otherwise.
        model_kwargs.setdefault("dtype", "auto" if device.type == "cuda" else torch.float32)
        # Hub ids and "synthetic" names -> a local directory (a clear error when none can be had);
        # jina's layout -> native XLM-R, converted once and cached. Without this a jina hub id would
        # load as plain XLM-R with its weights unmatched: random scores, silently.
        from models import native_checkpoint, resolve_model

        super().__init__(native_checkpoint(resolve_model(model_name_or_path)), model_kwargs=model_kwargs, **kwargs)
        self.eval()

        limit = self.position_limit
        if max_length is not None and max_length > limit:
            raise ValueError(f"max_length must be <= {limit} (the model's position limit), got {max_length}")
        if not self.max_seq_length or self.max_seq_length > limit:
            self.max_seq_length = limit  # tokenizers without model_max_length report ~1e30

        self.bucket_multiple = bucket_multiple
        self.max_tokens_per_batch = max_tokens_per_batch
        self.compile_enabled = compile
        self.compile_mode = compile_mode or ("max-autotune" if device.type == "cuda" else "default")
        self.dynamic = True if dynamic is None else dynamic
        self.packed = packed
        self.last_timings: dict = {}
        self.compile_seconds = 0.0
        self._lock = threading.RLock()
        self.compiles = 0  # graphs compiled by this instance's calls
        self._compiles_after_warmup: int | None = None
        self._warned_recompiles = 0

        if packed and (reason := packed_unsupported_reason(self.model)):
            warnings.warn(f"packed=True is not supported for this model ({reason}); using the padded path", stacklevel=2)
            self.packed = False
        if self.packed:
            names = available_attention_backends(device)
            if attention_backend is not None and attention_backend not in names:
                raise ValueError(f"attention_backend must be one of {names} on {device.type}, got {attention_backend!r}")
            self.attention_backend = attention_backend or names[0]
            self._attention = ATTENTION_BACKENDS[self.attention_backend]
            fn = self._packed_logits
        else:
            self.attention_backend = self.model.config._attn_implementation
            fn = self._padded_logits
        self._logits = torch.compile(fn, mode=self.compile_mode, dynamic=self.dynamic) if compile else fn

    @property
    def position_limit(self) -> int:
        """Longest sequence the position table holds: RoBERTa-style models start positions at
        padding_idx + 1 (1024 of XLM-R's 1026), BERT-style ones at 0."""
        config = self.model.config
        offset = (config.pad_token_id or 0) + 1 if config.model_type in ROBERTA_POSITION_TYPES else 0
        return config.max_position_embeddings - offset

    def describe(self) -> str:
        how = f"compiled (mode={self.compile_mode}, dynamic={self.dynamic})" if self.compile_enabled else "eager"
        if self.packed:
            path = f"packed, {self.attention_backend}, <= {self.max_tokens_per_batch} tokens/batch"
        else:
            path = f"padded to x{self.bucket_multiple}, {self.attention_backend}"
        return f"DynamicCrossEncoder({path}; {how}; {str(self.model.dtype).removeprefix('torch.')})"

    # --- the compiled boundary ------------------------------------------------------------------

    def _padded_logits(self, input_ids, attention_mask):
        # .clone(): under CUDA graphs the output memory is reused by the next replay.
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float().clone()

    def _packed_logits(self, input_ids, positions, cu_seqlens, cls_index):
        # varlen kernels size their grid by max_seqlen and leave rows past it unwritten; the pad
        # tail is shorter than TOKEN_MULTIPLE, so this bound covers it as well as every real pair.
        max_seqlen = max(self.max_seq_length, TOKEN_MULTIPLE)
        return packed_forward(self.model, input_ids, positions, cu_seqlens, cls_index, max_seqlen=max_seqlen, attention=self._attention)

    # --- public API -----------------------------------------------------------------------------

    def predict(
        self,
        inputs,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn=None,
        apply_softmax: bool | None = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device=None,
        pool=None,
        chunk_size: int | None = None,
        **kwargs,
    ):
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
        if convert_to_tensor:
            out = scores
        elif convert_to_numpy:
            out = scores.numpy()
        else:
            out = list(scores)
        return out[0] if single else out

    def warmup(self, pairs=None, batch_size: int = 32, *, show_progress_bar: bool = False) -> float:
        """Compile the shapes later calls will meet; returns the seconds it took.

        Runs synthetic batches at the extremes of the buckets (dynamic graphs) or at every bucket
        (static graphs: one compile each), then `pairs` once if given. Later calls warn when they
        compile more graphs than this left.
        """
        _check_int("batch_size", batch_size)
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            timings = _new_timings()
            for shape in tqdm(self._warmup_shapes(batch_size), desc="Compiling buckets", disable=not show_progress_bar):
                self._dummy_batch(shape, batch_size, timings)
            _sync(self.device)
        if pairs is not None:
            self.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar)
        _sync(self.device)
        self.compile_seconds = time.perf_counter() - start
        self._compiles_after_warmup = self.compiles
        self._warned_recompiles = 0
        return self.compile_seconds

    def _warmup_shapes(self, batch_size: int) -> list:
        if self.packed:
            buckets = token_buckets(self.max_tokens_per_batch, self.max_seq_length)
            return [buckets[0], buckets[-1]] if self.dynamic else buckets
        widest = bucket_length(self.max_seq_length, self.bucket_multiple)
        if self.dynamic:  # batch 1 and width 16 are specialized by the compiler, so warm them too
            return [(1, self.bucket_multiple), (batch_size, self.bucket_multiple), (batch_size, widest)]
        return []  # static padded graphs: one per (batch, width); warm them with real `pairs`

    def _dummy_batch(self, shape, batch_size, timings):
        tok = self.tokenizer
        if self.packed:
            # as many full-length sequences as fit, like a real full batch
            length = min(shape, self.max_seq_length)
            n = max(1, min(batch_size, shape // length))
            ids = np.full((n, length), tok.unk_token_id, dtype=np.int64)
            ids[:, 0] = tok.cls_token_id
            batch = pack_batch(ids, np.full(n, length), tokens=shape, max_seqs=batch_size, pad_id=tok.pad_token_id, pin=False)
            self._compiled_call(*batch.views(batch.buffer.to(self.device)))
        else:
            rows, width = shape
            batch = np.ones((2, rows, width), dtype=np.int64)
            batch[0] = tok.unk_token_id
            self._padded_call(batch, timings)

    # --- the fast path --------------------------------------------------------------------------

    def _tokenize(self, pairs):
        """-> (ids (n, seq) int64 right-padded, lengths (n,)); truncation exactly as CrossEncoder."""
        enc = self.tokenizer(
            [a for a, _ in pairs],
            [b for _, b in pairs],
            truncation="longest_first",
            max_length=self.max_seq_length,
            padding=True,
            padding_side="right",
            return_tensors="np",
            return_token_type_ids=False,
        )
        return enc["input_ids"].astype(np.int64, copy=False), enc["attention_mask"].sum(1)

    def _predict_logits(self, pairs, batch_size: int, progress: bool) -> torch.Tensor:
        """-> float32 logits (pairs, labels) on the CPU, in the caller's order."""
        timings = _new_timings()
        self.last_timings = timings
        if not pairs:
            return torch.zeros(0, self.num_labels)
        events = []  # (start, end) per batch: GPU busy time, without the gaps between batches
        run = self._run_packed if self.packed else self._run_padded
        out, order = run(pairs, batch_size, timings, events, progress)
        logits = torch.cat(out).cpu()  # the one device-to-host copy; it waits for the GPU
        if events:
            timings["forward_s"] = sum(s.elapsed_time(e) for s, e in events) / 1e3
        self._check_recompiles()
        restored = torch.empty_like(logits)
        restored[torch.from_numpy(order)] = logits
        return restored

    def _run_padded(self, pairs, batch_size, timings, events, progress):
        t0 = time.perf_counter()
        ids, lengths = self._tokenize(pairs)
        timings["tokenize_s"] = time.perf_counter() - t0
        order = np.argsort(-lengths, kind="stable")  # longest first, like CrossEncoder
        pad_id = self.tokenizer.pad_token_id
        out = []
        for start in tqdm(range(0, len(order), batch_size), desc="Batches", disable=not progress):
            t1 = time.perf_counter()
            rows = order[start : start + batch_size]
            width = bucket_length(int(lengths[rows].max()), self.bucket_multiple)
            batch = np.full((2, len(rows), width), pad_id, dtype=np.int64)  # input_ids, attention_mask
            take = min(width, ids.shape[1])
            batch[0, :, :take] = ids[rows, :take]
            batch[1] = np.arange(width)[None, :] < lengths[rows][:, None]
            timings["pack_s"] += time.perf_counter() - t1
            out.append(self._forward_with_retry(batch, events, timings))
        return out, order

    def _run_packed(self, pairs, batch_size, timings, events, progress):
        # Character length stands in for token length so tokenization can stream: chunk i + 1 is
        # tokenized in a worker thread (the tokenizer releases the GIL) while chunk i is packed and
        # launched, and the GPU works through its queue asynchronously.
        order = np.argsort([-(len(a) + len(b)) for a, b in pairs], kind="stable")
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

        def tokenize(rows):
            t = time.perf_counter()
            result = self._tokenize([pairs[i] for i in rows])
            return result, time.perf_counter() - t

        out = []
        with ThreadPoolExecutor(max_workers=1) as pool, tqdm(total=len(pairs), desc="Pairs", disable=not progress) as bar:
            pending = pool.submit(tokenize, chunks[0])
            for c, rows in enumerate(chunks):
                (ids, lengths), seconds = pending.result()
                timings["tokenize_s"] += seconds
                if c + 1 < len(chunks):
                    pending = pool.submit(tokenize, chunks[c + 1])
                for lo, hi in plan_token_batches(lengths, self.max_tokens_per_batch, batch_size):
                    t = time.perf_counter()
                    part = lengths[lo:hi]
                    batch = pack_batch(ids[lo:hi, : part.max()], part, tokens=bucket_length(int(part.sum()), TOKEN_MULTIPLE), max_seqs=batch_size, pad_id=self.tokenizer.pad_token_id, pin=self.device.type == "cuda")
                    timings["pack_s"] += time.perf_counter() - t
                    out.append(self._forward_with_retry(batch, events, timings))
                bar.update(len(rows))
        return out, order

    def _forward_with_retry(self, batch, events, timings):
        """Run one batch; on out-of-memory split it in halves and retry, so no pair is lost."""
        try:
            out = self._timed(batch, events, timings)
            timings["batches"] += 1
            return out
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            halves = self._split(batch)
            if halves is None:
                raise
            warnings.warn(f"out of memory on a batch of {self._batch_size(batch)} pairs; split in two and retried", stacklevel=2)
            return torch.cat([self._forward_with_retry(h, events, timings) for h in halves])

    @staticmethod
    def _batch_size(batch) -> int:
        return batch.num_seqs if isinstance(batch, PackedBatch) else batch.shape[1]

    def _split(self, batch):
        """Two halves of a batch, in order, or None for a single pair."""
        n = self._batch_size(batch)
        if n <= 1:
            return None
        half = n // 2
        if not isinstance(batch, PackedBatch):
            return batch[:, :half], batch[:, half:]
        ids, pos, cu, _ = (v.numpy() for v in batch.views())
        starts = cu[: n + 1].astype(np.int64)
        lengths = np.diff(starts)
        rows = np.zeros((n, int(lengths.max())), dtype=np.int64)
        mask = np.arange(rows.shape[1])[None, :] < lengths[:, None]
        rows[mask] = ids[: starts[-1]]
        pin = self.device.type == "cuda"
        pad = self.tokenizer.pad_token_id
        return [
            pack_batch(rows[a:b], lengths[a:b], tokens=bucket_length(int(lengths[a:b].sum()), TOKEN_MULTIPLE), max_seqs=batch.max_seqs, pad_id=pad, pin=pin)
            for a, b in ((0, half), (half, n))
        ]

    def _timed(self, batch, events, timings):
        call = self._packed_call if isinstance(batch, PackedBatch) else self._padded_call
        if self.device.type != "cuda":
            t = time.perf_counter()
            out = call(batch, timings)
            timings["forward_s"] += time.perf_counter() - t
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = call(batch, timings)
        end.record()
        events.append((start, end))
        return out

    def _packed_call(self, batch: PackedBatch, timings) -> torch.Tensor:
        dev = batch.buffer.to(self.device, non_blocking=True)  # one copy, from pinned memory on CUDA
        logits = self._compiled_call(*batch.views(dev))[: batch.num_seqs]
        timings["real_tokens"] += batch.real_tokens
        timings["padded_tokens"] += batch.tokens
        return logits

    def _padded_call(self, batch: np.ndarray, timings) -> torch.Tensor:
        """batch: (2, batch, width) int64 = input_ids, attention_mask -> logits (batch, labels)."""
        host = torch.from_numpy(np.ascontiguousarray(batch))
        dev = (host.pin_memory() if self.device.type == "cuda" else host).to(self.device, non_blocking=True)
        logits = self._compiled_call(dev[0], dev[1])
        timings["real_tokens"] += int(batch[1].sum())
        timings["padded_tokens"] += batch[1].size
        return logits

    def _compiled_call(self, *args) -> torch.Tensor:
        # dynamo's counter is process-wide; what it gains during our own call (under our lock)
        # is ours, so other instances compiling do not count here.
        before = compile_count()
        out = self._logits(*args)
        self.compiles += compile_count() - before
        return out

    def _check_recompiles(self):
        if self._compiles_after_warmup is None or not self.compile_enabled:
            return
        extra = self.compiles - self._compiles_after_warmup
        if extra > self._warned_recompiles:
            self._warned_recompiles = extra
            warnings.warn(f"{extra} graph compile(s) after warm-up (expected 0): inputs hit shapes the warm-up did not", stacklevel=4)


# ----------------------------------------------------------------------------------------------


def validate_pairs(inputs) -> list[tuple[str, str]]:
    """Check a batch of [text_a, text_b] pairs; lists, tuples and numpy arrays are accepted.
    Raises TypeError / ValueError naming the offending index."""
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    if isinstance(inputs, (str, bytes)) or not hasattr(inputs, "__len__"):
        raise TypeError(f"inputs must be a list of [text_a, text_b] pairs, got {type(inputs).__name__}")
    pairs = []
    for i, pair in enumerate(inputs):
        if isinstance(pair, np.ndarray):
            pair = pair.tolist()
        if not isinstance(pair, (list, tuple)):
            raise TypeError(f"inputs[{i}] must be a [text_a, text_b] pair, got {type(pair).__name__}")
        if len(pair) != 2:
            raise ValueError(f"inputs[{i}] must be a pair of 2 texts, got {len(pair)} item(s)")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise TypeError(f"inputs[{i}][{j}] must be a str, got {type(text).__name__}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _new_timings() -> dict:
    """What `last_timings` reports for one call: host seconds, forward seconds, token counts."""
    return dict(tokenize_s=0.0, pack_s=0.0, forward_s=0.0, real_tokens=0, padded_tokens=0, batches=0)


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
