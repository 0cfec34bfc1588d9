"""torch's varlen_attn as the CUDA path calls it, on the CPU: the emulating kernel (tests/test_gpu_paths.py,
registered for torch_attn::_varlen_attn) sees exactly the keys flash attention's varlen kernel does, and
every family that takes the packed path scores exactly through it, eager and compiled with dynamic shapes:
causal decoders (Qwen3, the yes/no reranker's head), ModernBERT's local windows, grouped-query heads."""

import itertools

import pytest
import torch

import twins

from helpers import IDENTITY, assert_same_logits
from test_families import PADDED_ONLY, hard_pairs
from test_families import reference as family_reference
from test_gpu_paths import load, varlen_on_cpu  # noqa: F401  (a fixture)

VARLEN_FAMILIES = [f for f in twins.FAMILY_TWINS if f not in PADDED_ONLY]
# (left, right) windows the CUDA kernel gets per family (others: (-1, -1), full attention): decoders are
# causal; ModernBERT's global layers see everything, its local ones keys within local_attention / 2.
_HALF = twins.FAMILY_TWINS["modernbert"].tiny["local_attention"] // 2
VARLEN_WINDOWS = {"qwen3-seq-cls": {(-1, 0)}, "qwen3-reranker": {(-1, 0)},
                  "modernbert": {(-1, -1), (_HALF, _HALF)}, "modernbert-cls": {(-1, -1), (_HALF, _HALF)}}


def _seen_keys(q_lengths, k_lengths, *, window=None, causal=False, max_q=None) -> list:
    """The keys (token rows) each query row attends to through torch_attn::_varlen_attn, None for a row left
    unwritten: with q = k = 0 a row spreads its attention evenly over the keys it sees, and one-hot values
    mark them."""
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (q_lengths, k_lengths))
    keys = int(cu_k[-1])
    q, k = torch.zeros(int(cu_q[-1]), 1, keys), torch.zeros(keys, 1, keys)
    v = torch.eye(keys)[:, None, :]
    out, _, _ = torch.ops.torch_attn._varlen_attn(q, k, v, cu_q, cu_k, max_q or max(q_lengths), max(k_lengths), causal,
                                                  None, window)
    return [None if row.isnan().any() else torch.nonzero(row > 0).flatten().tolist() for row in out[:, 0]]


CAUSAL = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [5], [5, 6], [5, 6, 7]]
LOCAL_2_0 = [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [5], [5, 6], [5, 6, 7]]


@pytest.mark.parametrize("window, causal, want", [
    (None, False, [[0, 1, 2, 3, 4]] * 5 + [[5, 6, 7]] * 3),
    ([-1, -1], False, [[0, 1, 2, 3, 4]] * 5 + [[5, 6, 7]] * 3),
    (None, True, CAUSAL),
    ([-1, 0], False, CAUSAL),  # torch 2.13's varlen_attn sends causal this way
    ([1, 1], False, [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4], [5, 6], [5, 6, 7], [6, 7]]),
    ([0, 1], False, [[0, 1], [1, 2], [2, 3], [3, 4], [4], [5, 6], [6, 7], [7]]),
    ([2, 0], False, LOCAL_2_0),
    ([2, 2], True, LOCAL_2_0),  # is_causal makes the right bound 0
    ([-1, 1], False, [[0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [5, 6], [5, 6, 7], [5, 6, 7]]),
])
def test_varlen_emulation_sees_the_keys_flash_attention_does(window, causal, want, varlen_on_cpu):
    """flash-attention's rule, two sequences of 5 and 3 tokens: query i sees keys i - left .. i + right
    of its own sequence."""
    assert _seen_keys([5, 3], [5, 3], window=window, causal=causal) == want


def test_varlen_emulation_rows_past_max_q_and_rows_without_keys(varlen_on_cpu):
    # the grid covers max_q rows of each sequence: the rest stay unwritten
    assert _seen_keys([5, 3], [5, 3], max_q=3) == [[0, 1, 2, 3, 4]] * 3 + [None, None] + [[5, 6, 7]] * 3
    # causal, 3 queries on 1 key, bottom-right aligned: the last query sees the key, the others nothing
    got = _seen_keys([3], [1], causal=True)
    assert got == [[], [], [0]]


def test_varlen_emulation_groups_query_heads_on_key_heads(varlen_on_cpu):
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(7, 4, 8, generator=gen), torch.randn(7, 2, 8, generator=gen), torch.randn(7, 2, 8, generator=gen)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    out, _, _ = torch.ops.torch_attn._varlen_attn(q, k, v, cu, cu, 4, 4, True, None, None)
    for h in range(4):  # query heads 0, 1 read key head 0; 2, 3 read key head 1
        alone, _, _ = torch.ops.torch_attn._varlen_attn(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1],
                                                        cu, cu, 4, 4, True, None, None)
        torch.testing.assert_close(out[:, h : h + 1], alone, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="must divide"):
        torch.ops.torch_attn._varlen_attn(q, k[:, :1].expand(7, 3, 8).contiguous(), v[:, :1].expand(7, 3, 8).contiguous(),
                                          cu, cu, 4, 4, False, None, None)


def _effective_windows(calls) -> set:
    """(left, right) each call asked for, is_causal folded in as the CUDA kernel does (right = 0)."""
    return {(w[0], 0 if causal else w[1]) for causal, w, _, _ in calls}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled-dynamic"])
@pytest.mark.parametrize("family", VARLEN_FAMILIES)
def test_packed_path_through_the_real_varlen_attn(family, compile, varlen_on_cpu):
    """Every family the packed path takes, through torch's varlen_attn op as the CUDA path calls it: causal
    decoders (Qwen3, the yes/no reranker's head), ModernBERT's local windows, grouped-query heads."""
    pairs = hard_pairs()
    path, _, ref = family_reference(family, pairs)
    model = load(path, compile=compile, packed=True, max_tokens_per_batch=512)
    assert model.packed, "every family here takes the packed path"
    model.attention_backend = "varlen_attn"  # the registered fast_rerank_varlen_attn runs the packed calls
    assert_same_logits(model.predict(pairs, activation_fn=IDENTITY, batch_size=8), ref)
    assert _effective_windows(varlen_on_cpu) == VARLEN_WINDOWS.get(family, {(-1, -1)})
    if compile:
        assert model.compiles >= 1
