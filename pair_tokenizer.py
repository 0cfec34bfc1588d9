"""Pairs -> token ids at the tokenizer's own speed, identical to what CrossEncoder feeds the model.

CrossEncoder tokenizes with the transformers tokenizer call: `longest_first` truncation at
max_length, padding, attention masks and tensors built in Python, 1.7-4x the time the `tokenizers`
backend takes for the same ids. Here each distinct text is encoded once by the backend's parallel
`encode_batch_fast` (without special tokens), and the pair template (`<s> A </s></s> B </s>` for
XLM-R) and `longest_first` truncation are applied to whole arrays with numpy. A rerank call (one
query, many documents) thus tokenizes its query once. Tokenizers without a backend, or whose pair
template or truncation side this does not reproduce, fall back to the transformers call, and
`describe()` says why.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


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


def ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """(n,) segment lengths -> (lengths.sum(),) position of each element within its segment."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


@dataclass
class Ragged:
    """Token ids of n sequences back to back. flat: (tokens,) int32; lengths: (n,) int64;
    types: (tokens,) int32 token types, or None where the tokenizer makes none."""

    flat: np.ndarray
    lengths: np.ndarray
    types: np.ndarray | None = None

    @property
    def starts(self) -> np.ndarray:
        """(n + 1,) offsets of each sequence in `flat`, then the end."""
        return np.concatenate([[0], np.cumsum(self.lengths)])

    def take(self, rows: np.ndarray) -> Ragged:
        """The sequences `rows`, in that order."""
        lengths = self.lengths[rows]
        at = np.repeat(self.starts[rows], lengths) + ragged_arange(lengths)
        return Ragged(self.flat[at], lengths, None if self.types is None else self.types[at])

    @classmethod
    def concat(cls, parts: list[Ragged]) -> Ragged:
        """The sequences of each part, in order."""
        types = None if parts[0].types is None else np.concatenate([p.types for p in parts])
        return cls(np.concatenate([p.flat for p in parts]), np.concatenate([p.lengths for p in parts]), types)

    @classmethod
    def from_padded(cls, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None = None) -> Ragged:
        """(n, width) ids, attention mask (either padding side) and token types -> the real tokens."""
        real = np.asarray(mask).astype(bool)
        return cls(np.asarray(ids)[real].astype(np.int32), real.sum(1).astype(np.int64),
                   None if types is None else np.asarray(types)[real].astype(np.int32))


@dataclass
class EncodedPairs:
    """Pairs tokenized ahead of the model call, on the caller's thread (a server's request handler):
    ids as the model sees them (truncated at max_length), and each pair's token count before
    truncation. Rows slice (`encoded[lo:hi]`) and join (`EncodedPairs.concat`) without re-encoding."""

    ids: Ragged
    untruncated: np.ndarray  # (n,) int64
    max_length: int

    def __len__(self) -> int:
        return len(self.ids.lengths)

    def __getitem__(self, rows: slice) -> EncodedPairs:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"EncodedPairs takes a contiguous slice of rows, got {rows!r}")
        lo, hi, _ = rows.indices(len(self))
        return EncodedPairs(self.ids.take(np.arange(lo, max(lo, hi))), self.untruncated[rows], self.max_length)

    @classmethod
    def concat(cls, parts: list[EncodedPairs]) -> EncodedPairs:
        if len({p.max_length for p in parts}) != 1:
            raise ValueError(f"parts encoded at different max_length: {sorted({p.max_length for p in parts})}")
        return cls(Ragged.concat([p.ids for p in parts]), np.concatenate([p.untruncated for p in parts]),
                   parts[0].max_length)


def longest_first(n1: np.ndarray, n2: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens each text keeps under the `tokenizers` LongestFirst strategy (utils/truncation.rs):
    with s <= l the shorter and longer length, the longer is cut to max(s, budget - s); if that
    still does not fit, the shorter keeps budget // 2 and the longer the rest. `budget` is
    max_length less the template's special tokens."""
    swap = n1 > n2
    short = np.where(swap, n2, n1)
    keep_long = np.where(short > budget, short, np.maximum(short, budget - short))
    both = short + keep_long > budget
    keep_short = np.where(both, budget // 2, short)
    keep_long = np.where(both, budget // 2 + budget % 2, keep_long)
    return np.minimum(n1, np.where(swap, keep_long, keep_short)), np.minimum(n2, np.where(swap, keep_short, keep_long))


def _distinct(texts) -> tuple[list[str], np.ndarray]:
    """-> (each distinct text once, in first-seen order; (n,) index of each text in that list)."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
    return list(index), inverse


# Pairs the fast path must tokenize exactly as the reference does before it is trusted: empty texts,
# both truncation branches of longest_first, non-Latin text.
PROBE_PAIRS = [("", ""), ("lorem ipsum", ""), ("", "dolor"), ("Καλημέρα κόσμε", "こんにちは世界 Привет"),
               ("lorem ipsum dolor " * 400, "sit amet"), ("sit amet", "lorem ipsum dolor " * 400),
               ("consectetur adipiscing " * 300, "elit sed do " * 500)]


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


class PairTokenizer:
    """encode(pairs) -> Ragged token ids (and token types where the model takes them), as
    `tokenizer(a, b, truncation="longest_first", max_length=max_length)` gives them, or as `reference`
    (pairs -> dict of (n, width) input_ids, attention_mask[, token_type_ids]) gives them when set:
    DynamicCrossEncoder passes CrossEncoder's own preprocess, so prompt templates apply exactly.

    The fast path is used only after it matched the reference on PROBE_PAIRS; otherwise every call
    goes to the reference, and `describe()` says why."""

    def __init__(self, tokenizer, max_length: int, *, token_types: bool = False, reference=None):
        self.tokenizer, self.max_length, self.token_types = tokenizer, max_length, token_types
        # the transformers call sets truncation and padding on the shared backend: one call at a time
        # (a server encodes on several threads; its private backend copy below needs no lock)
        self._reference_lock = threading.Lock()
        self.reference = reference or self._transformers_call
        self.fallback_reason = self._unsupported(tokenizer)
        if self.fallback_reason is None:
            from tokenizers import Tokenizer

            # a private copy: no padding or truncation state shared with the transformers tokenizer
            self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self.backend.no_padding()
            self.backend.no_truncation()
            try:
                self.prefix, self.middle, self.suffix = self._template()
            except ValueError as e:
                self.fallback_reason = str(e)
        if self.fallback_reason is None:
            self.budget = max(0, max_length - sum(len(part[0]) for part in (self.prefix, self.middle, self.suffix)))
            self.fallback_reason = self._probe()

    @staticmethod
    def _unsupported(tokenizer) -> str | None:
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            return f"{type(tokenizer).__name__} has no `tokenizers` backend"
        if getattr(tokenizer, "truncation_side", "right") != "right":
            return f"truncation_side={tokenizer.truncation_side!r}"
        return None

    def _template(self):
        """Special tokens (ids, types) before, between and after the two texts, and the types of the
        texts' own tokens, read off one encoded pair."""
        enc = self.backend.encode("a", "b")
        seq = [-1 if s is None else s for s in enc.sequence_ids]
        ids, types = np.asarray(enc.ids, dtype=np.int32), np.asarray(enc.type_ids, dtype=np.int32)
        first, second = [i for i, s in enumerate(seq) if s == 0], [i for i, s in enumerate(seq) if s == 1]
        if not first or not second:
            raise ValueError(f"pair template {enc.tokens} does not contain both texts")
        cuts = (slice(0, first[0]), slice(first[-1] + 1, second[0]), slice(second[-1] + 1, len(ids)))
        if sum(c.stop - c.start for c in cuts) != len(ids) - len(first) - len(second):
            raise ValueError(f"unexpected pair template {enc.tokens}")
        self.text_types = int(types[first[0]]), int(types[second[0]])
        return [(ids[c], types[c]) for c in cuts]

    def _probe(self) -> str | None:
        pairs, want = self._probe_reference()
        if not pairs:
            return "CrossEncoder's tokenization refused every probe pair"
        got = self._encode_fast(pairs).ids
        if not (np.array_equal(got.lengths, want.lengths) and np.array_equal(got.flat, want.flat)):
            return "the fast path's ids differ from CrossEncoder's on probe pairs (e.g. a prompt template)"
        if self.token_types and (want.types is None or not np.array_equal(got.types, want.types)):
            return "the fast path's token types differ from CrossEncoder's on probe pairs"
        return None

    def _probe_reference(self) -> tuple[list, Ragged | None]:
        """(the probe pairs the reference encodes, their ids). A pair it refuses is left out, so the probe
        never makes a model unusable: a generative reranker without a prompt template encodes ("", "")
        as no tokens, and sentence-transformers 6 refuses it (causal models need a last real token)."""
        try:
            return PROBE_PAIRS, self._encode_reference(PROBE_PAIRS)
        except Exception:  # whatever the reference raises: find the pairs it takes, one by one
            kept, parts = [], []
            for pair in PROBE_PAIRS:
                try:
                    parts.append(self._encode_reference([pair]))
                    kept.append(pair)
                except Exception:
                    continue
            return kept, Ragged.concat(parts) if parts else None

    def describe(self) -> str:
        if self.fallback_reason:
            return f"CrossEncoder's tokenization ({self.fallback_reason})"
        return "tokenizers backend, each distinct text once" + (", token types" if self.token_types else "")

    def encode(self, pairs) -> Ragged:
        return self.encode_pairs(pairs).ids

    def encode_pairs(self, pairs) -> EncodedPairs:
        """The ids, and each pair's tokens before truncation: the texts' own tokens and the template's.
        A pair of no tokens is refused (EmptyPairError, naming its index)."""
        if self.fallback_reason:
            encoded = EncodedPairs(self._reference_or_refuse(pairs), self._count_reference(pairs), self.max_length)
        else:
            encoded = self._encode_fast(pairs)
        if len(empty := np.flatnonzero(encoded.ids.lengths == 0)):
            raise EmptyPairError(int(empty[0]), pairs[empty[0]])
        return encoded

    def _reference_or_refuse(self, pairs) -> Ragged:
        """The reference's ids; where it refuses the call, a pair of no tokens (CrossEncoder refuses
        those) is named in a ValueError, anything else is raised as it came."""
        try:
            return self._encode_reference(pairs)
        except Exception:
            for i in np.flatnonzero(self._count_reference(pairs) == 0):  # no text tokens, no special tokens
                try:
                    empty = len(self._encode_reference([pairs[i]]).flat) == 0
                except Exception:
                    empty = True
                if empty:
                    raise EmptyPairError(int(i), pairs[i]) from None
            raise

    def _encode_fast(self, pairs) -> EncodedPairs:
        (firsts, i1), (seconds, i2) = _distinct([a for a, _ in pairs]), _distinct([b for _, b in pairs])
        # one parallel encode for both sides: a call's threads are started once
        a = b = self._encode_texts(firsts + seconds)
        i2 = i2 + len(firsts)
        keep1, keep2 = longest_first(a.lengths[i1], b.lengths[i2], self.budget)
        (pre, pre_t), (mid, mid_t), (suf, suf_t) = self.prefix, self.middle, self.suffix
        p, m, s = len(pre), len(mid), len(suf)
        untruncated = a.lengths[i1] + b.lengths[i2] + (p + m + s)
        total = int((keep1 + keep2).sum()) + len(pairs) * (p + m + s)
        out = Ragged(np.empty(total, dtype=np.int32), keep1 + keep2 + (p + m + s),
                     np.empty(total, dtype=np.int32) if self.token_types else None)
        starts = out.starts[:-1]
        at_a, at_b = starts + p, starts + p + keep1 + m
        for ids, types, at in ((pre, pre_t, starts), (mid, mid_t, at_a + keep1), (suf, suf_t, at_b + keep2)):
            for j, token in enumerate(ids):  # a handful of special tokens, each written for every pair at once
                out.flat[at + j] = token
                if out.types is not None:
                    out.types[at + j] = types[j]
        _copy_prefixes(out.flat, at_a, a, i1, keep1)
        _copy_prefixes(out.flat, at_b, b, i2, keep2)
        if out.types is not None:
            for at, keep, value in ((at_a, keep1, self.text_types[0]), (at_b, keep2, self.text_types[1])):
                out.types[np.repeat(at, keep) + ragged_arange(keep)] = value
        return EncodedPairs(out, untruncated.astype(np.int64), self.max_length)

    def encode_chunks(self, pairs, bounds):
        """Yields (row indices into pairs, Ragged ids, seconds spent encoding them) for each [lo, hi) of
        `bounds`; chunk i + 1 is encoded in a worker thread (the tokenizer releases the GIL) while the
        caller packs and launches chunk i."""
        def encode(lo, hi):
            t = time.perf_counter()
            try:
                return self.encode(pairs[lo:hi]), time.perf_counter() - t
            except EmptyPairError as e:  # its index in the call, not in the chunk
                raise EmptyPairError(lo + e.index, e.pair) from None

        if len(bounds) == 1:  # nothing to overlap: no thread to start and hand over to
            yield (np.arange(*bounds[0]), *encode(*bounds[0]))
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(encode, *bounds[0])
            for i, (lo, hi) in enumerate(bounds):
                ragged, seconds = pending.result()
                if i + 1 < len(bounds):
                    pending = pool.submit(encode, *bounds[i + 1])
                yield np.arange(lo, hi), ragged, seconds

    def _encode_texts(self, texts: list[str]) -> Ragged:
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum()))
        return Ragged(flat, lengths)

    def _transformers_call(self, pairs) -> dict:
        return self.tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first",
                              max_length=self.max_length, padding=True, return_tensors="np",
                              return_token_type_ids=self.token_types)

    def _count_reference(self, pairs) -> np.ndarray:
        """Tokens of each pair before truncation where the fast path is off: each distinct text's own
        tokens (the tokenizer call, no special tokens), plus the pair template's special tokens."""
        texts, inverse = _distinct([t for pair in pairs for t in pair])
        with self._reference_lock:
            own = np.array([len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
                           if texts else [], dtype=np.int64)
        both = own[inverse].reshape(-1, 2).sum(1) if len(pairs) else np.zeros(0, dtype=np.int64)
        return both + self.tokenizer.num_special_tokens_to_add(pair=True)

    def _encode_reference(self, pairs) -> Ragged:
        with self._reference_lock:
            enc = self.reference(list(pairs))
        arrays = {k: (v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v)) for k, v in enc.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        types = arrays.get("token_type_ids") if self.token_types else None
        return Ragged.from_padded(arrays["input_ids"], arrays["attention_mask"], types)


class EmptyPairError(ValueError):
    """inputs[index] tokenizes to no tokens: there is nothing to score."""

    def __init__(self, index: int, pair):
        super().__init__(f"inputs[{index}] ({list(pair)!r}) has no tokens: the tokenizer adds neither special tokens "
                         "nor a prompt template to it, and CrossEncoder cannot score it either")
        self.index, self.pair = index, pair


def _copy_prefixes(dst: np.ndarray, dst_starts: np.ndarray, src: Ragged, rows: np.ndarray, keep: np.ndarray):
    """dst[dst_starts[i] : dst_starts[i] + keep[i]] = first keep[i] ids of src sequence rows[i], for all i at once."""
    offsets = ragged_arange(keep)
    dst[np.repeat(dst_starts, keep) + offsets] = src.flat[np.repeat(src.starts[:-1][rows], keep) + offsets]
