"""Batch layouts and the padding-free forward of DynamicCrossEncoder: pure helpers, no model state.

* bucket math and batch plans (which shapes a compiled graph can meet),
* one type per batch layout: `PaddedBatch` (rows x width, right-padded) and `PackedBatch` (real
  tokens back to back, variable-length attention over cu_seqlens),
* the variable-length attention backends and the rule that picks one for a device and dtype,
* `packed_forward`: an XLM-R sequence classifier run on a packed batch with the model's own weights.

Kept apart from the CrossEncoder glue (as flash-attention keeps `bert_padding.py` apart from its
models) so each piece is tested on its own, on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
PACKED_MODEL_TYPES = ("xlm-roberta", "roberta")
ROBERTA_POSITION_TYPES = ("xlm-roberta", "roberta", "camembert", "xlm-roberta-xl")
# The varlen kernels (flash-attn's and torch's) take half precision only.
VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_available() -> bool:
    """The one probe for the optional flash-attn package."""
    return flash_attn_varlen_func is not None


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def position_limit(config) -> int:
    """Longest sequence the position table holds: RoBERTa-style models start positions at
    padding_idx + 1 (1024 of XLM-R's 1026), BERT-style ones at 0."""
    offset = (config.pad_token_id or 0) + 1 if config.model_type in ROBERTA_POSITION_TYPES else 0
    return config.max_position_embeddings - offset


# ---- bucket math and batch plans --------------------------------------------------------------


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


def chunk_bounds(n: int, batch_size: int, first: int = 256, largest: int = 4096) -> list[tuple[int, int]]:
    """[lo, hi) chunks of a call's n pairs, tokenized one ahead of the one being launched. The first is
    small so the GPU starts early; each next one doubles up to `largest`, which keeps the tokenizer's
    threads busy (a parallel encode of a few dozen pairs leaves cores idle). Sizes are multiples of
    batch_size, so only the call's last batch can be short."""
    size, cap = (-(-x // batch_size) * batch_size for x in (first, largest))
    bounds, lo = [], 0
    while lo < n:
        bounds.append((lo, min(n, lo + size)))
        lo, size = lo + size, min(cap, 2 * size)
    return bounds


# ---- one type per batch layout ----------------------------------------------------------------


def _host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy; from pinned memory and non-blocking on CUDA, so the host goes on packing."""
    if device.type != "cuda":
        return host.to(device)
    return (host if host.is_pinned() else host.pin_memory()).to(device, non_blocking=True)


@dataclass
class PaddedBatch:
    """buffer: (2, rows, width) int64 = input_ids right-padded with pad ids, attention_mask.

    Only the first `rows` rows are pairs of the call (default: all); the rest fill the batch up to a
    shape a graph was recorded for, and their logits are dropped."""

    buffer: torch.Tensor
    rows: int | None = None

    @classmethod
    def build(cls, flat: np.ndarray, lengths: np.ndarray, *, width: int, pad_id: int, rows: int | None = None,
              pin: bool = False) -> PaddedBatch:
        """flat: (tokens,) ids of the sequences back to back, lengths: (n,) -> a batch exactly `width`
        tokens wide (>= the longest), whose first `rows` rows (default n) are real. pin: build it in
        pinned memory, so the copy to a GPU is one asynchronous transfer."""
        buffer = torch.empty((2, len(lengths), width), dtype=torch.int64, pin_memory=pin)
        ids, mask = buffer.numpy()
        np.less(np.arange(width)[None, :], lengths[:, None], out=mask)
        ids.fill(pad_id)
        ids[mask.astype(bool)] = flat
        return cls(buffer, rows)

    @property
    def num_seqs(self) -> int:
        return self.buffer.shape[1] if self.rows is None else self.rows

    @property
    def shape_key(self) -> tuple:
        """What a static graph or a CUDA graph is specialized on."""
        return ("padded", *self.buffer.shape[1:])

    @property
    def real_tokens(self) -> int:
        return int(self.buffer[1, : self.num_seqs].sum())

    @property
    def padded_tokens(self) -> int:
        return self.buffer[1].numel()

    def device_args(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """-> (input_ids, attention_mask), each (rows, width), on `device`."""
        dev = _host_to_device(self.buffer, device)
        return dev[0], dev[1]

    def split(self, pad_id: int) -> tuple[PaddedBatch, PaddedBatch] | None:
        """Two halves, in order, or None for a single pair."""
        n = self.num_seqs
        if n <= 1:
            return None
        return PaddedBatch(self.buffer[:, : n // 2]), PaddedBatch(self.buffer[:, n // 2 : n])


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

    @property
    def padded_tokens(self) -> int:
        return self.tokens

    @property
    def shape_key(self) -> tuple:
        return ("packed", self.tokens, self.max_seqs)

    def views(self, buffer: torch.Tensor | None = None):
        """(input_ids, positions, cu_seqlens, cls_index) as views of `buffer` (default: the host one)."""
        t, s = self.tokens, self.max_seqs
        b = self.buffer if buffer is None else buffer
        return b[:t], b[t : 2 * t], b[2 * t : 2 * t + s + 2], b[2 * t + s + 2 :]

    def device_args(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return self.views(_host_to_device(self.buffer, device))

    def split(self, pad_id: int) -> list[PackedBatch] | None:
        """Two halves, in order, repacked, or None for a single pair."""
        n = self.num_seqs
        if n <= 1:
            return None
        ids, _, cu, _ = (v.numpy() for v in self.views())
        starts = cu[: n + 1].astype(np.int64)
        lengths, h = np.diff(starts), n // 2
        pin = self.buffer.is_pinned()
        return [pack_batch(ids[starts[a] : starts[b]], lengths[a:b], max_seqs=self.max_seqs, pad_id=pad_id, pin=pin)
                for a, b in ((0, h), (h, n))]


def pack_batch(flat: np.ndarray, lengths: np.ndarray, *, max_seqs: int, pad_id: int, pin: bool,
               tokens: int | None = None) -> PackedBatch:
    """Pack sequences into one flat batch.

    flat: (real tokens,) ids of the sequences back to back, lengths: (batch,) -> PackedBatch with
    `tokens` rows (default: the real token count rounded up to TOKEN_MULTIPLE). Array operations
    only, no per-token Python loop.
    """
    n = len(lengths)
    real = int(lengths.sum())
    tokens = bucket_length(real, TOKEN_MULTIPLE) if tokens is None else tokens
    if n > max_seqs or real > tokens:
        raise ValueError(f"batch of {n} sequences / {real} tokens does not fit {max_seqs} / {tokens}")
    buf = torch.empty(2 * tokens + 2 * max_seqs + 2, dtype=torch.int32, pin_memory=pin)
    batch = PackedBatch(buf, tokens, max_seqs, n, real)
    flat_ids, pos, cu, cls = (v.numpy() for v in batch.views())
    flat_ids[:real] = flat
    flat_ids[real:] = pad_id
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # XLM-R positions: real tokens count from padding_idx + 1; pads sit at padding_idx.
    pos[:real] = ragged_arange(lengths) + pad_id + 1
    pos[real:] = pad_id
    cu[: n + 1] = starts
    cu[n + 1 :] = tokens  # pad tail [real, tokens) is its own sequence; the rest are empty
    cls[:n] = starts[:-1]
    cls[n:] = 0
    return batch


# ---- variable-length attention ----------------------------------------------------------------
# (q, k, v) (tokens, heads, head_dim), cu_seqlens (seqs + 1,) -> (tokens, heads, head_dim).
# Each sequence attends only to itself.


def _attn_flash(q, k, v, cu, max_seqlen, scale):
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)


def _attn_varlen(q, k, v, cu, max_seqlen, scale):
    # torch 2.10's varlen_attn has no `scale`; 2.11+ take it keyword-only. The kernels' default is
    # head_dim ** -0.5, which is XLM-R's, so it is passed only when it differs.
    if abs(scale * q.shape[-1] ** 0.5 - 1.0) < 1e-6:
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)


def _attn_nested(q, k, v, cu, max_seqlen, scale):
    # Nested tensors built with their length bounds and no empty sequence: without the bounds SDPA
    # computes them with .item() (a host sync per layer eager, a graph break compiled), and an empty
    # sequence sends it to the math kernel on CUDA (torch/nested/_internal/sdpa.py).
    offsets, rows, back = _nonempty_layout(cu, q.shape[0])
    slots = cu.shape[0] - 1
    bound = torch.sym_max(max_seqlen, slots + 1)  # the last sequence holds up to slots + 1 zero rows
    nt = [torch.nested.nested_tensor_from_jagged(torch.cat([x, x.new_zeros(1, *x.shape[1:])])[rows], offsets,
                                                 min_seqlen=1, max_seqlen=bound).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*nt, scale=scale).transpose(1, 2).values()[back]


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


def attention_backends(device_type: str, dtype: torch.dtype) -> list[tuple[str, str]]:
    """(name, why) of every backend usable for `device_type` and `dtype`, fastest first.

    A pure function of its arguments (and of what is installed), so the choice for a CUDA device is
    tested without one."""
    usable = []
    if device_type == "cuda":
        half = dtype in VARLEN_DTYPES
        if flash_attn_varlen_func is not None and half:
            usable.append(("flash_attn", "flash-attn installed"))
        if varlen_attn is not None and half:
            usable.append(("varlen_attn", "torch varlen attention" + ("" if flash_attn_available() else "; flash-attn not installed")))
        if not half:  # fp32: the varlen kernels refuse it; nested tensors keep memory linear in tokens
            usable.append(("sdpa_nested", f"{str(dtype).removeprefix('torch.')}: varlen kernels take fp16/bf16 only"))
            return usable + [("sdpa_block_diagonal", "tokens x tokens mask: small batches only")]
        return usable + [("sdpa_nested", "no varlen kernel"), ("sdpa_block_diagonal", "tokens x tokens mask: small batches only")]
    # On the CPU the block-diagonal mask beats nested tensors by ~10x at the small token budgets
    # used there; its (tokens, tokens) mask is why the CPU budget defaults to 2048.
    return [("sdpa_block_diagonal", "CPU: fastest at small token budgets"), ("sdpa_nested", "CPU")]


def choose_attention_backend(device_type: str, dtype: torch.dtype, requested: str | None = None) -> tuple[str, str]:
    """-> (backend name, the reason it runs); ValueError naming the choices for an unusable request."""
    usable = dict(attention_backends(device_type, dtype))
    if requested is None:
        name = next(iter(usable))
        return name, usable[name]
    if requested not in usable:
        raise ValueError(f"attention_backend must be one of {list(usable)} on {device_type} with "
                         f"{str(dtype).removeprefix('torch.')}, got {requested!r}")
    return requested, "requested"


# ---- the packed forward -----------------------------------------------------------------------


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
    return model.classifier(x[cls_index].unsqueeze(1)).float()
