import json

import pytest

import data
from data import PairsFileError, load_pairs, load_rerank, read_pairs_file, split_sentences


# --- corpus ---------------------------------------------------------------------------


def test_corpus_matches_original_statistics():
    stats = data.corpus_stats()
    assert 1200 <= stats["sentences"] <= 1400
    assert 7.0 <= stats["mean_words"] <= 8.6
    assert 170 <= stats["distinct_words"] <= 200
    assert 45 <= stats["mean_chars"] <= 60
    assert stats["min_words"] >= 2 and stats["max_words"] <= 20


def test_every_sentence_is_well_formed():
    for s in data.SENTENCES:
        assert 2 <= len(s.split()) <= 20, s
        assert s[0].isupper() and s[-1] in ".?!", s
        # No inner terminator: joining sentences and splitting again must round-trip.
        assert not any(c in s[:-1] for c in ".?!"), s


def test_corpus_is_deterministic_and_round_trips():
    assert data._generate_corpus() == data.CORPUS
    assert split_sentences(" ".join(data.SENTENCES)) == data.SENTENCES


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Lorem ipsum. Dolor sit amet?  Elit!\nSed do.",
            ["Lorem ipsum.", "Dolor sit amet?", "Elit!", "Sed do."],
        ),
        ("  One two.\t\tThree four.  ", ["One two.", "Three four."]),
        ("No terminator at the end", ["No terminator at the end"]),
        ("Version 2.5 stays whole. Next.", ["Version 2.5 stays whole.", "Next."]),
        ("", []),
        ("   \n ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


# --- load_pairs -----------------------------------------------------------------------


def test_load_pairs_shape():
    pairs = load_pairs(20)
    assert len(pairs) == 20
    for pair in pairs:
        assert isinstance(pair, list) and len(pair) == 2
        assert all(isinstance(t, str) and t for t in pair)


def test_load_pairs_is_deterministic():
    assert load_pairs(50, seed=7) == load_pairs(50, seed=7)
    assert load_pairs(50, seed=7) != load_pairs(50, seed=8)


@pytest.mark.parametrize("seed", [0, 3, 1000])
def test_load_pairs_seeds_each_pair(seed):
    pairs = load_pairs(10, seed)
    for i, pair in enumerate(pairs):
        assert pair == load_pairs(1, seed + i)[0]


@pytest.mark.parametrize("lo, hi", [(2, 15), (1, 1), (3, 3), (5, 9)])
def test_load_pairs_sentence_count_bounds(lo, hi):
    counts = []
    for pair in load_pairs(200, seed=1, min_sentences=lo, max_sentences=hi):
        for text in pair:
            sentences = split_sentences(text)
            assert all(s in data.SENTENCES for s in sentences)
            counts.append(len(sentences))
    assert min(counts) >= lo and max(counts) <= hi
    if hi - lo >= 3:
        # Both ends of the range are reachable over 400 texts.
        assert min(counts) == lo and max(counts) == hi


def test_load_pairs_zero():
    assert load_pairs(0) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_pairs": -3}, "num_pairs must be >= 0, got -3"),
        ({"num_pairs": 2.5}, "num_pairs must be an integer, got 2.5"),
        ({"num_pairs": True}, "num_pairs must be an integer, got True"),
        ({"num_pairs": 1, "seed": "0"}, "seed must be an integer, got '0'"),
        ({"num_pairs": 1, "min_sentences": 0}, "min_sentences must be >= 1, got 0"),
        (
            {"num_pairs": 1, "min_sentences": 5, "max_sentences": 4},
            "max_sentences must be >= 5, got 4",
        ),
        ({"num_pairs": 1, "max_sentences": 10**6}, "max_sentences must be <= "),
    ],
)
def test_load_pairs_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as e:
        load_pairs(**kwargs)
    assert str(e.value).startswith(message)


# --- load_rerank ----------------------------------------------------------------------


@pytest.mark.parametrize("num_queries, docs_per_query", [(1, 1), (3, 7), (5, 20)])
def test_load_rerank_shape(num_queries, docs_per_query):
    items = load_rerank(num_queries, docs_per_query)
    assert len(items) == num_queries
    for query, docs in items:
        assert isinstance(query, str)
        assert isinstance(docs, list) and len(docs) == docs_per_query
        assert all(isinstance(d, str) for d in docs)


@pytest.mark.parametrize(
    "query_words, doc_words", [((3, 30), (20, 300)), ((1, 1), (5, 5)), ((4, 6), (50, 60))]
)
def test_load_rerank_word_counts(query_words, doc_words):
    vocab = set(data.WORDS)
    for query, docs in load_rerank(10, 30, seed=2, query_words=query_words, doc_words=doc_words):
        assert query_words[0] <= len(query.split()) <= query_words[1]
        assert set(query.split()) <= vocab
        for doc in docs:
            assert doc_words[0] <= len(doc.split()) <= doc_words[1]


def test_load_rerank_is_deterministic():
    assert load_rerank(4, 10, seed=5) == load_rerank(4, 10, seed=5)
    assert load_rerank(4, 10, seed=5) != load_rerank(4, 10, seed=6)
    # Query q depends on (seed, q) only, not on how many queries were asked for.
    assert load_rerank(4, 10, seed=5)[3] == load_rerank(1, 10, seed=8)[0]


def test_load_rerank_documents_are_corpus_text():
    doc = load_rerank(1, 1, doc_words=(300, 300))[0][1][0]
    # A 300-word document spans several corpus sentences; the complete ones are verbatim.
    complete = split_sentences(doc)[:-1]
    assert complete and all(s in data.SENTENCES for s in complete)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_queries": -1}, "num_queries must be >= 0, got -1"),
        ({"docs_per_query": 0}, "docs_per_query must be >= 1, got 0"),
        ({"query_words": (0, 5)}, "query_words[0] must be >= 1, got 0"),
        ({"query_words": (6, 5)}, "query_words must have min <= max, got (6, 5)"),
        ({"doc_words": 20}, "doc_words must be a (min, max) pair, got 20"),
        ({"doc_words": (1, 2, 3)}, "doc_words must be a (min, max) pair, got (1, 2, 3)"),
    ],
)
def test_load_rerank_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as e:
        load_rerank(**kwargs)
    assert str(e.value) == message


# --- read_pairs_file ------------------------------------------------------------------

PAIRS = [
    ["what is lorem", "Lorem ipsum dolor."],
    ["tab-free query", "Ünïcode text, with \"quotes\"."],
]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("keys", [("query", "document"), ("text_a", "text_b")])
@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.ndjson", "pairs.data"])
def test_read_jsonl(tmp_path, keys, name):
    lines = [json.dumps({keys[0]: a, keys[1]: b, "label": 1}) for a, b in PAIRS]
    path = _write(tmp_path, name, "\n".join(lines) + "\n")
    assert read_pairs_file(path) == PAIRS
    assert read_pairs_file(str(path)) == PAIRS


@pytest.mark.parametrize("header", ["", "query\tdocument\n", "text_a\ttext_b\n"])
@pytest.mark.parametrize("name", ["pairs.tsv", "pairs.txt", "pairs"])
def test_read_tsv(tmp_path, header, name):
    body = "".join(f"{a}\t{b}\n" for a, b in PAIRS)
    assert read_pairs_file(_write(tmp_path, name, header + body)) == PAIRS


def test_read_tsv_windows_line_endings(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes("query\tdocument\r\na\tb\r\nc\td\r\n".encode())
    assert read_pairs_file(path) == [["a", "b"], ["c", "d"]]


@pytest.mark.parametrize(
    "name, text",
    [
        (
            "pairs.jsonl",
            '\n{"query": "a", "document": "b"}\n\n   \n{"text_a": "c", "text_b": "d"}\n\n',
        ),
        ("pairs.tsv", "\n\nquery\tdocument\n\na\tb\n  \nc\td\n"),
    ],
)
def test_blank_lines_are_skipped(tmp_path, name, text):
    assert read_pairs_file(_write(tmp_path, name, text)) == [["a", "b"], ["c", "d"]]


def _error(path) -> str:
    with pytest.raises(PairsFileError) as e:
        read_pairs_file(path)
    assert isinstance(e.value, ValueError)
    return str(e.value)


@pytest.mark.parametrize(
    "name, text, lineno, reason",
    [
        ("pairs.jsonl", '{"query": "a", "document": "b"}\n{"query": "a" "document": "b"}\n', 2,
         "invalid JSON (Expecting ',' delimiter)"),
        ("pairs.jsonl", '{"query": "a", "document": "b"}\n\n{"foo": 1}\n', 3,
         "expected keys query/document or text_a/text_b, got ['foo']"),
        ("pairs.jsonl", '\n{"query": "a", "document": "b"}\n\n{"query": "a", "document": 3}\n', 4,
         "'document' must be a string, got int"),
        ("pairs.jsonl", '{"text_a": null, "text_b": "b"}\n', 1,
         "'text_a' must be a string, got NoneType"),
        ("pairs.jsonl", '[{"query": "a", "document": "b"}]\n', 1,
         "expected a JSON object, got list"),
        ("pairs.tsv", "a\tb\na\tb\tc\n", 2, "expected 2 tab-separated columns, got 3"),
        ("pairs.tsv", "query\tdocument\na\tb\n\njust one column\n", 4,
         "expected 2 tab-separated columns, got 1"),
    ],
)
def test_malformed_line_is_named(tmp_path, name, text, lineno, reason):
    path = _write(tmp_path, name, text)
    assert _error(path) == f"{path}:{lineno}: {reason}"


def test_error_carries_location(tmp_path):
    path = _write(tmp_path, "pairs.tsv", "a\tb\nbad\n")
    with pytest.raises(PairsFileError) as e:
        read_pairs_file(path)
    assert (e.value.path, e.value.lineno) == (str(path), 2)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert _error(path) == f"{path}: no such file"


@pytest.mark.parametrize(
    "name, text",
    [
        ("pairs.jsonl", ""),
        ("pairs.tsv", ""),
        ("pairs.tsv", "\n  \n\n"),
        ("pairs.tsv", "query\tdocument\n"),
        ("pairs", ""),
    ],
)
def test_empty_file(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    assert _error(path) == f"{path}: no pairs found"


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"a\tb\nc\t\xff\n")
    assert _error(path) == f"{path}:2: not valid UTF-8 (byte 0xff)"


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes('\ufeff{"query": "a", "document": "b"}\n'.encode())
    assert read_pairs_file(path) == [["a", "b"]]
