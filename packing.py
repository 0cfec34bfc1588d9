"""Batch layouts and the padding-free attention of DynamicCrossEncoder: pure helpers, no model state.

* bucket math and batch plans (which shapes a compiled graph can meet),
* one type per batch layout: `PaddedBatch` (rows x width, right-padded) and `PackedBatch` (real
  tokens back to back, variable-length attention over cu_seqlens),
* the variable-length attention backends and the rule that picks one for a device and dtype,
* the attention functions registered in transformers' AttentionInterface, so each model's own
  modeling code runs packed inputs, and the pooling of the rows a family's head reads.

Kept apart from the CrossEncoder glue (as flash-attention keeps `bert_padding.py` apart from its
models) so each piece is tested on its own, on the CPU.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from families import default_position_offset
from pair_tokenizer import ragged_arange

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
# A dynamic graph takes any token count (dynamic_tokens): the tail is cut to under this, which still
# keeps the distinct GEMM row counts few: oneDNN sets up each new one, ~1 ms per GEMM on a CPU (84
# GEMMs in a 12-layer model); on the tiny twin 128 beat 64 (fewer new shapes, README "CPU").
DYNAMIC_TOKEN_MULTIPLE = 128
# The varlen kernels (flash-attn's and torch's) take half precision only.
VARLEN_DTYPES = (torch.float16, torch.bfloat16)
# Backends whose kernels size their launch grid by max_seqlen and leave rows past it unwritten; the
# others never read it, and their batches carry 0 (no shape of its own).
GRID_BACKENDS = ("flash_attn", "varlen_attn", "sdpa_nested")


def flash_attn_available() -> bool:
    """The one probe for the optional flash-attn package."""
    return flash_attn_varlen_func is not None


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def position_limit(config) -> int | None:
    """Longest sequence the position table holds: RoBERTa-style models start positions at
    padding_idx + 1 (1024 of XLM-R's 1026), BERT-style ones at 0. None: no table to overflow."""
    table = getattr(config, "max_position_embeddings", None)
    return None if table is None else table - default_position_offset(config)


# ---- bucket math and batch plans --------------------------------------------------------------


def bucket_length(length: int, multiple: int = BUCKET_MULTIPLE) -> int:
    """Smallest multiple of `multiple` that is >= length (and >= multiple)."""
    return max(multiple, -(-length // multiple) * multiple)


def token_buckets(max_tokens_per_batch: int, max_seq_length: int) -> list[int]:
    """Every token count a packed batch can be padded to: multiples of TOKEN_MULTIPLE up to the budget,
    or up to one sequence of max_seq_length when that is larger (a pair over the budget runs alone)."""
    top = bucket_length(max(max_tokens_per_batch, max_seq_length), TOKEN_MULTIPLE)
    return list(range(TOKEN_MULTIPLE, top + 1, TOKEN_MULTIPLE))


def dynamic_tokens(lengths: np.ndarray, max_seqs: int) -> int:
    """Token count of a packed batch for a dynamic graph: the real tokens rounded up to
    DYNAMIC_TOKEN_MULTIPLE, but never more than a (max_seqs, longest rounded up to BUCKET_MULTIPLE)
    grid holds, so the pad tail fits in its free cells without widening it (pack_batch)."""
    real, longest = int(lengths.sum()), int(lengths.max())
    return min(bucket_length(real, DYNAMIC_TOKEN_MULTIPLE), max_seqs * bucket_length(longest))


def seqlen_bound(longest: int, tail: int) -> int:
    """max_seqlen of a packed batch: its longest sequence or its pad tail (the last sequence), rounded
    up to a power of two >= TOKEN_MULTIPLE. Sized by the batch, not by max_seq_length (8192 positions
    for bge-reranker-v2-m3), and few: each distinct bound is a CUDA-graph recording or a static compile
    per token count, log2(max_length / 256) + 1 of them (6 for 8192, where multiples of 256 would make
    32), at the price of at most twice the grid blocks, which exit at once past a sequence's end."""
    n = max(longest, tail, TOKEN_MULTIPLE)
    return 1 << (n - 1).bit_length()


def seqlen_bounds(max_length: int) -> list[int]:
    """Every seqlen_bound of a batch of sequences up to max_length (its pad tail under TOKEN_MULTIPLE),
    largest first."""
    bounds = [seqlen_bound(max_length, 0)]
    while bounds[-1] > TOKEN_MULTIPLE:
        bounds.append(bounds[-1] // 2)
    return bounds


def warm_lengths(tokens: int, bound: int, *, max_length: int, max_seqs: int, max_tokens: int) -> np.ndarray | None:
    """Lengths of a batch that packs to `tokens` (a TOKEN_MULTIPLE bucket) with seqlen_bound `bound`, as a
    real batch would: at most max_seqs sequences of at most max_length tokens, more than one only within
    max_tokens (plan_token_batches). None where no real batch can. bound 0: no kernel reads it."""
    longest = min(max_length, tokens, bound or tokens)
    if bound and seqlen_bound(longest, 0) != bound:
        return None
    total = min(tokens, max_seqs * longest, max(max_tokens, longest))
    if bound and total <= tokens - TOKEN_MULTIPLE:  # a pad tail that long would raise the bound
        return None
    n = -(-total // longest)
    return np.array([longest] * (n - 1) + [total - (n - 1) * longest], dtype=np.int64)


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


# ---- one type per batch layout ----------------------------------------------------------------


def _host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy; from pinned memory and non-blocking on CUDA, so the host goes on packing."""
    if device.type != "cuda":
        return host.to(device)
    return (host if host.is_pinned() else host.pin_memory()).to(device, non_blocking=True)


def pool_index(flat: np.ndarray, lengths: np.ndarray, starts: np.ndarray, pool: str, pad_id: int) -> np.ndarray:
    """(seqs,) row, in the batch's token layout, of the token a family's head reads.

    flat: (real tokens,) ids back to back; lengths: (seqs,); starts: (seqs,) row of each sequence's
    first token in the layout. "first": token 0; "last": the last token; "last_non_pad": the last token
    whose id is not pad_id, token 0 if there is none (transformers' GenericForSequenceClassification);
    "mean" reads every token, so its index is token 0 (unused).
    """
    starts = np.asarray(starts, dtype=np.int64)
    if pool in ("first", "mean"):
        return starts
    last = np.maximum(lengths, 1) - 1
    if pool == "last":
        return starts + last
    if pool != "last_non_pad":
        raise ValueError(f"pool must be one of first, last, last_non_pad, mean, got {pool!r}")
    offsets = ragged_arange(lengths)
    marked = np.where(flat != pad_id, offsets, -1)
    found = np.full(len(lengths), -1, dtype=np.int64)
    np.maximum.at(found, np.repeat(np.arange(len(lengths)), lengths), marked)
    return starts + np.maximum(found, 0)


@dataclass
class PaddedBatch:
    """host: one int64 buffer (one host-to-device copy) holding
    input_ids, attention_mask, token_type_ids: (n, width) each, right-padded (pad ids, 0, 0);
    pool_index: (n,) the row-major token index each head reads (see pool_index).

    Only the first `rows` rows are pairs of the call (default: all); the rest fill the batch up to a
    shape a graph was recorded for, and their logits are dropped."""

    host: torch.Tensor
    n: int
    width: int
    rows: int | None = None

    @classmethod
    def build(cls, flat: np.ndarray, lengths: np.ndarray, *, width: int, pad_id: int, rows: int | None = None,
              pin: bool = False, types: np.ndarray | None = None, pool: str = "first") -> PaddedBatch:
        """flat: (tokens,) ids of the sequences back to back, lengths: (n,), types: (tokens,) token types
        or None (all 0) -> a batch exactly `width` tokens wide (>= the longest), whose first `rows` rows
        (default n) are real. pin: build it in pinned memory, so the copy to a GPU is one transfer."""
        n = len(lengths)
        batch = cls(torch.empty(3 * n * width + n, dtype=torch.int64, pin_memory=pin), n, width, rows)
        ids, mask, tt, index = (v.numpy() for v in batch.views())
        np.less(np.arange(width)[None, :], lengths[:, None], out=mask)
        real = mask.astype(bool)
        ids.fill(pad_id)
        ids[real] = flat
        tt.fill(0)
        if types is not None:
            tt[real] = types
        index[:] = pool_index(flat, lengths, np.arange(n) * width, pool, pad_id)
        return batch

    def views(self, host: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask, token_type_ids, pool_index) as views of `host` (default: this one)."""
        b, m = self.host if host is None else host, self.n * self.width
        return (*b[: 3 * m].view(3, self.n, self.width), b[3 * m :])

    @property
    def num_seqs(self) -> int:
        return self.n if self.rows is None else self.rows

    @property
    def shape_key(self) -> tuple:
        """What a static graph or a CUDA graph is specialized on."""
        return ("padded", self.n, self.width)

    @property
    def real_tokens(self) -> int:
        return int(self.views()[1][: self.num_seqs].sum())

    @property
    def padded_tokens(self) -> int:
        return self.n * self.width

    def device_args(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """-> (input_ids, attention_mask, token_type_ids) each (n, width), pool index (n,), on `device`."""
        return self.views(_host_to_device(self.host, device))

    def split(self, pad_id: int) -> tuple[PaddedBatch, PaddedBatch] | None:
        """Two halves, in order, or None for a single pair."""
        count = self.num_seqs
        if count <= 1:
            return None
        ids, mask, tt, index = self.views()
        halves = []
        for a, b in ((0, count // 2), (count // 2, count)):
            rows = b - a  # row-major indices shift with the rows before them
            host = torch.cat([ids[a:b].flatten(), mask[a:b].flatten(), tt[a:b].flatten(), index[a:b] - a * self.width])
            halves.append(PaddedBatch(host, rows, self.width))
        return tuple(halves)


@dataclass
class PackedBatch:
    """One packed batch, all int32 in a single buffer (one host-to-device copy).

    input_ids:  (tokens,)       real tokens of every sequence back to back, then pad ids up to the bucket
    positions:  (tokens,)       offset, offset + 1, ... restarting at each sequence (RoBERTa: padding_idx + 1)
    token_types:(tokens,)       the tokenizer's token types (0 where it makes none)
    seq_ids:    (tokens,)       sequence of each token; the pad tail and nothing else is max_seqs
    slots:      (tokens,)       cell of each token in a (max_seqs, width) padded grid (CPU attention):
                                sequence * width + position; the pad tail takes cells no sequence uses
    cu_seqlens: (max_seqs + 2,) the max_seqs sequence slots (unused ones empty), then the end of the pad
                                tail: one extra sequence, last, so the shape only depends on max_seqs
    pool_index: (max_seqs,)     row each head reads (first / last / last non-pad token; 0 in unused slots)
    cells:      (max_seqs * width,) the token at each grid cell (0 where none is): the grid is gathered
                                from the packed rows (gathers vectorize; a scatter into zeros does not)
    width: the grid's width: the longest sequence (max_seqlen where set), and at least tokens / max_seqs
        (so the pad tail fits in the cells no sequence uses), rounded up to BUCKET_MULTIPLE.
    max_seqlen: what the varlen kernels size their grid by (seqlen_bound), 0 where no kernel reads it.
    """

    buffer: torch.Tensor
    tokens: int
    max_seqs: int
    num_seqs: int
    real_tokens: int
    width: int
    position_offset: int = 0
    pool: str = "first"
    max_seqlen: int = 0

    @property
    def padded_tokens(self) -> int:
        return self.tokens

    @property
    def shape_key(self) -> tuple:
        return ("packed", self.tokens, self.max_seqs, self.max_seqlen)

    def views(self, buffer: torch.Tensor | None = None):
        """(input_ids, positions, token_types, seq_ids, slots, cu_seqlens, pool_index, cells) as views
        of `buffer` (default: the host one)."""
        t, s = self.tokens, self.max_seqs
        b = self.buffer if buffer is None else buffer
        return (*b[: 5 * t].view(5, t), b[5 * t : 5 * t + s + 2], b[5 * t + s + 2 : 5 * t + 2 * s + 2],
                b[5 * t + 2 * s + 2 :])

    def device_args(self, device: torch.device) -> tuple:
        """The views on `device`, then max_seqlen (an int: a symbolic one in a dynamic graph)."""
        return (*self.views(_host_to_device(self.buffer, device)), self.max_seqlen)

    def split(self, pad_id: int) -> list[PackedBatch] | None:
        """Two halves, in order, repacked, or None for a single pair."""
        n = self.num_seqs
        if n <= 1:
            return None
        ids, _, types, _, _, cu, _, _ = (v.numpy() for v in self.views())
        starts = cu[: n + 1].astype(np.int64)
        lengths, h = np.diff(starts), n // 2
        pin = self.buffer.is_pinned()
        return [pack_batch(ids[starts[a] : starts[b]], lengths[a:b], max_seqs=self.max_seqs, pad_id=pad_id, pin=pin,
                           types=types[starts[a] : starts[b]], position_offset=self.position_offset, pool=self.pool,
                           sized_grid=self.max_seqlen > 0)
                for a, b in ((0, h), (h, n))]


def pack_batch(flat: np.ndarray, lengths: np.ndarray, *, max_seqs: int, pad_id: int, pin: bool,
               tokens: int | None = None, types: np.ndarray | None = None, position_offset: int | None = None,
               pool: str = "first", sized_grid: bool = False) -> PackedBatch:
    """Pack sequences into one flat batch.

    flat: (real tokens,) ids of the sequences back to back, lengths: (batch,), types: (real tokens,) or
    None -> PackedBatch with `tokens` rows (default: the real token count rounded up to TOKEN_MULTIPLE).
    position_offset: first position id of each sequence (default pad_id + 1, XLM-R's). sized_grid: the
    attention kernel reads max_seqlen (GRID_BACKENDS). Array operations only, no per-token Python loop.
    """
    n = len(lengths)
    real = int(lengths.sum())
    tokens = bucket_length(real, TOKEN_MULTIPLE) if tokens is None else tokens
    if n > max_seqs or real > tokens:
        raise ValueError(f"batch of {n} sequences / {real} tokens does not fit {max_seqs} / {tokens}")
    offset = pad_id + 1 if position_offset is None else position_offset
    longest = int(lengths.max()) if n else 1
    bound = seqlen_bound(longest, tokens - real) if sized_grid else 0
    # a kernel that reads max_seqlen reads no grid: its width follows the bound, not a shape of its own
    width = bucket_length(max(bound or longest, -(-tokens // max_seqs)), BUCKET_MULTIPLE)
    buf = torch.empty(5 * tokens + 2 * max_seqs + 2 + max_seqs * width, dtype=torch.int32, pin_memory=pin)
    batch = PackedBatch(buf, tokens, max_seqs, n, real, width, offset, pool, bound)
    flat_ids, pos, tt, seq, slots, cu, index, cells = (v.numpy() for v in batch.views())
    flat_ids[:real], flat_ids[real:] = flat, pad_id
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    within = ragged_arange(lengths)
    pos[:real] = within + offset
    # pads get the pad position of RoBERTa-style models (padding_idx), else 0; no real token sees them
    pos[real:] = pad_id if offset == pad_id + 1 else 0
    tt[:real] = 0 if types is None else types
    tt[real:] = 0
    seq[:real] = np.repeat(np.arange(n), lengths)
    seq[real:] = max_seqs
    slots[:real] = seq[:real].astype(np.int64) * width + within
    # the pad tail fills cells past the sequences' ends: keys there are masked, their rows never read
    free = np.ones(max_seqs * width, dtype=bool)
    free[slots[:real]] = False
    slots[real:] = np.flatnonzero(free)[: tokens - real]
    cells[:] = 0
    cells[slots] = np.arange(tokens)
    cu[: n + 1] = starts
    cu[n + 1 : -1] = real  # unused slots are empty
    cu[-1] = tokens  # the pad tail [real, tokens) is its own sequence, the last
    index[:n] = pool_index(flat, lengths, starts[:-1], pool, pad_id)
    index[n:] = 0
    return batch


# ---- variable-length attention ----------------------------------------------------------------
# (q, k, v) (tokens, heads, head_dim), cu_seqlens (seqs + 1,) -> (tokens, heads, head_dim).
# Each sequence attends only to itself; `causal`: to itself up to the query; `window` w: to keys
# within distance w (ModernBERT's local layers). k and v have as many heads as q (see _expand_kv).


def _attn_flash(q, k, v, cu, max_seqlen, scale, *, causal=False, window=None, slots=None, cells=None):
    w = (-1, -1) if window is None else (window, 0 if causal else window)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal,
                                  window_size=w)


_VARLEN_PARAMS: dict = {}  # varlen_attn -> the names it takes (a dict lookup compiles; lru_cache warns)


def _varlen_params(fn) -> frozenset:
    """torch 2.10's varlen_attn takes `is_causal` and has neither `scale` nor `window_size`; 2.11+ take
    those two keyword-only ((-1, 0) is causal) and no `is_causal`. Read off the signature once."""
    if fn not in _VARLEN_PARAMS:
        _VARLEN_PARAMS[fn] = frozenset(inspect.signature(fn).parameters)
    return _VARLEN_PARAMS[fn]


def _attn_varlen(q, k, v, cu, max_seqlen, scale, *, causal=False, window=None, slots=None, cells=None):
    # The kernels' default scale is head_dim ** -0.5: passed only when it differs, the window only when set.
    takes, kw = _varlen_params(varlen_attn), {}
    if abs(scale * q.shape[-1] ** 0.5 - 1.0) >= 1e-6:
        if "scale" not in takes:
            raise TypeError(f"this torch's varlen_attn takes no scale (torch 2.10) and the model's attention scale is "
                            f"{scale:.4g}, not head_dim ** -0.5: use torch >= 2.11 or attention_backend='sdpa_nested'")
        kw["scale"] = scale
    if window is not None and "window_size" not in takes:
        raise TypeError("this torch's varlen_attn takes no window_size (torch 2.10): sliding-window models need "
                        "torch >= 2.11 or attention_backend='sdpa_padded'")
    if "window_size" in takes and (causal or window is not None):
        kw["window_size"] = (-1 if window is None else window, 0 if causal else window)
    elif causal:
        kw["is_causal"] = True
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw)


def varlen_takes_window() -> bool:
    return varlen_attn is not None and "window_size" in _varlen_params(varlen_attn)


def _attn_nested(q, k, v, cu, max_seqlen, scale, *, causal=False, window=None, slots=None, cells=None):
    if window is not None:
        raise ValueError("sdpa_nested has no sliding window; use sdpa_padded")
    # Nested tensors built with their length bounds and no empty sequence: without the bounds SDPA
    # computes them with .item() (a host sync per layer eager, a graph break compiled), and an empty
    # sequence sends it to the math kernel on CUDA (torch/nested/_internal/sdpa.py).
    offsets, rows, back = _nonempty_layout(cu, q.shape[0])
    slots = cu.shape[0] - 1
    bound = torch.sym_max(max_seqlen, slots + 1)  # the last sequence holds up to slots + 1 zero rows
    nt = [torch.nested.nested_tensor_from_jagged(torch.cat([x, x.new_zeros(1, *x.shape[1:])])[rows], offsets,
                                                 min_seqlen=1, max_seqlen=bound).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*nt, scale=scale, is_causal=causal).transpose(1, 2).values()[back]


def _nonempty_layout(cu: torch.Tensor, tokens: int):
    """A layout of the same tokens in which no sequence is empty, with shapes fixed by the input's.

    cu: (slots + 1,) from 0 to tokens -> offsets (slots + 2,) int64, rows (tokens + slots + 1,) and
    back (tokens,). Each empty slot gets one zero row; one last sequence takes the zero rows left over
    (at least one). rows: the row of [x; zero row] at each layout row (tokens = the zero row); back:
    the layout row of each token. A zero row attends to zero rows only, so the tokens' results are
    those of their own sequence.
    """
    cu = cu.to(torch.int64)
    empty_before = F.pad(torch.cumsum(cu[1:] == cu[:-1], 0), (1, 0))  # (slots + 1,)
    token = torch.arange(tokens, device=cu.device)
    back = token + empty_before[torch.searchsorted(cu[1:], token, right=True)]
    total = tokens + cu.shape[0]
    rows = torch.full((total,), tokens, dtype=torch.int64, device=cu.device).index_put((back,), token)
    offsets = torch.cat([cu + empty_before, cu.new_full((1,), total)])
    return offsets, rows, back


def _band(length: int, device, causal: bool, window: int | None) -> torch.Tensor | None:
    """(length, length) bool: key j is visible to query i (None: all are)."""
    if not causal and window is None:
        return None
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]  # query - key
    ok = d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)
    return ok if window is None else ok & (d.abs() <= window)


def _attn_padded(q, k, v, cu, max_seqlen, scale, *, causal=False, window=None, slots=None, cells=None):
    """Attention in a (seqs, width) grid: the grid gathered from the packed rows (`cells`), SDPA with
    a key mask per sequence, each token's row gathered back (`slots`). Memory and work grow with
    seqs x width^2, not tokens^2; the projections and MLPs around it stay packed. The CPU path."""
    tokens, heads, dim = q.shape
    seqs = cu.shape[0] - 2  # the sequence slots; the pad tail (the last sequence) sits in unused cells
    cells = cells.long()
    grid = [x[cells].view(seqs, -1, heads, dim).transpose(1, 2) for x in (q, k, v)]
    width = grid[0].shape[2]
    lengths = cu[1 : seqs + 1] - cu[:seqs]
    mask = torch.arange(width, device=q.device)[None, :] < lengths[:, None]
    mask = mask | (lengths == 0)[:, None]  # empty slots: something to attend to, instead of NaN
    mask = mask[:, None, None, :]
    if (band := _band(width, q.device, causal, window)) is not None:
        mask = mask & band
    out = F.scaled_dot_product_attention(*grid, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(seqs * width, heads, dim)[slots.long()]


def _attn_block_diagonal(q, k, v, cu, max_seqlen, scale, *, causal=False, window=None, slots=None, cells=None):
    # (tokens, tokens) mask: memory grows with tokens^2; a reference for tests, small batches only.
    idx = torch.arange(q.shape[0], device=q.device, dtype=cu.dtype)
    seq_id = torch.searchsorted(cu[1:], idx, right=True)
    mask = seq_id[:, None] == seq_id[None, :]
    if (band := _band(q.shape[0], q.device, causal, window)) is not None:
        mask = mask & band
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


ATTENTION_BACKENDS = {
    "flash_attn": _attn_flash,
    "varlen_attn": _attn_varlen,
    "sdpa_nested": _attn_nested,
    "sdpa_padded": _attn_padded,
    "sdpa_block_diagonal": _attn_block_diagonal,
}


def attention_backends(device_type: str, dtype: torch.dtype, *, window: bool = False) -> list[tuple[str, str]]:
    """(name, why) of every backend usable for `device_type` and `dtype`, fastest first; `window`: the
    model has sliding-window layers (sdpa_nested cannot take them).

    A pure function of its arguments (and of what is installed), so the choice for a CUDA device is
    tested without one."""
    usable = []
    grid = ("sdpa_padded", "per-sequence grid, no tokens x tokens mask")
    reference = ("sdpa_block_diagonal", "tokens x tokens mask: small batches only")
    if device_type == "cuda":
        half = dtype in VARLEN_DTYPES
        if flash_attn_varlen_func is not None and half:
            usable.append(("flash_attn", "flash-attn installed"))
        if varlen_attn is not None and half and (varlen_takes_window() or not window):  # torch 2.10: no window
            usable.append(("varlen_attn", "torch varlen attention" + ("" if flash_attn_available() else "; flash-attn not installed")))
        why = f"{str(dtype).removeprefix('torch.')}: varlen kernels take fp16/bf16 only" if not half else "no varlen kernel"
        nested = [] if window else [("sdpa_nested", why)]
        return usable + nested + [grid, reference]
    # On the CPU the grid keeps attention per sequence (seqs x width^2) and the GEMMs packed.
    return [("sdpa_padded", "CPU: per-sequence grid, GEMMs packed"), reference] + ([] if window else [("sdpa_nested", "CPU")])


def choose_attention_backend(device_type: str, dtype: torch.dtype, requested: str | None = None, *,
                             window: bool = False) -> tuple[str, str]:
    """-> (backend name, the reason it runs); ValueError naming the choices for an unusable request."""
    usable = dict(attention_backends(device_type, dtype, window=window))
    if requested is None:
        name = next(iter(usable))
        return name, usable[name]
    if requested not in usable:
        raise ValueError(f"attention_backend must be one of {list(usable)} on {device_type} with "
                         f"{str(dtype).removeprefix('torch.')}, got {requested!r}")
    return requested, "requested"


# ---- the library's own modeling code on packed inputs ---------------------------------------------


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(tokens, kv_heads, dim) -> (tokens, heads, dim): grouped-query attention shares each kv head."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def library_attention(backend: str):
    """An attention function for transformers' AttentionInterface: the model's own modules compute
    q, k, v (rotary included) for a (1, tokens) packed input and call this with the packing kwargs
    (`cu_seq_lens_q`, `max_length_q`, and this project's `packed_slots`, `packed_cells`)."""
    fn = ATTENTION_BACKENDS[backend]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kw):
        heads = query.shape[1]
        q, k, v = query[0].transpose(0, 1), *(_expand_kv(x[0].transpose(0, 1), heads) for x in (key, value))
        # transformers' sliding windows are flash-style inclusive (+1): keys within sliding_window - 1
        window = None if sliding_window is None else int(sliding_window) - 1
        out = fn(q, k, v, kw["cu_seq_lens_q"], kw["max_length_q"], scaling if scaling is not None else q.shape[-1] ** -0.5,
                 causal=bool(getattr(module, "is_causal", False)), window=window, slots=kw.get("packed_slots"),
                 cells=kw.get("packed_cells"))
        return out[None], None  # (1, tokens, heads, dim), no attention weights

    return attention


@contextlib.contextmanager
def packed_attention_on(config, backend: str, packed: bool = True):
    """Packed calls run the model's code with the registered packed attention; the setting is restored
    after, so CrossEncoder's own predict (prompts, pools) keeps the model's own attention."""
    if not packed:
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = f"fast_rerank_{backend}"
    try:
        yield
    finally:
        config._attn_implementation = before


def register_library_attention() -> None:
    """Adds `fast_rerank_<backend>` to transformers' attention functions (idempotent). Without a mask
    function of the same name, transformers builds no mask for them: the packing kwargs say it all."""
    from transformers import AttentionInterface

    for name in ATTENTION_BACKENDS:
        AttentionInterface.register(f"fast_rerank_{name}", library_attention(name))


def pool(hidden: torch.Tensor, kind: str, index: torch.Tensor, seq_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden: (tokens, hidden) -> (seqs, hidden): the rows at `index`, or for "mean" the mean of each
    sequence's tokens (seq_ids: (tokens,), seqs for tokens of no sequence; lengths: (seqs,)).

    The mean sums in fp32 at least, then casts back to the model's dtype, as sentence-transformers'
    Pooling does: on CUDA index_add_ is an atomic add per token rounded to the sum's dtype, and a bf16
    sum stops growing at ~256x a term (600 ones would average to 0.43)."""
    if kind != "mean":
        return hidden[index.long()]
    seqs, wide = index.shape[0], torch.promote_types(hidden.dtype, torch.float32)
    sums = torch.zeros(seqs + 1, hidden.shape[-1], dtype=wide, device=hidden.device)
    sums.index_add_(0, seq_ids.long(), hidden.to(wide))
    return (sums[:seqs] / lengths.clamp(min=1)[:, None].to(wide)).to(hidden.dtype)
