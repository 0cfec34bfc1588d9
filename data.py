"""Workloads for the benchmarks: a lorem-ipsum corpus, cross-encoder pairs, a rerank
workload (one query x N documents), and reading a user's own pairs files: whole
(`read_pairs_file`) or streamed in chunks with every record checked first (`plan_pairs`,
`read_chunk`), one parser for both.

The corpus is generated here from a fixed seed, so every machine gets the same text
without downloads. Its shape follows the corpus the original benchmark used: about 1285
sentences of 2-20 words (mean ~7.8 words, ~52 characters), ~186 distinct words.
"""

import json
import os
import random
import re
from array import array
from dataclasses import dataclass, field, replace
from typing import Iterator, NamedTuple

__all__ = [
    "CORPUS",
    "SENTENCES",
    "WORDS",
    "Chunk",
    "PairsFileError",
    "PairsPlan",
    "Reject",
    "Row",
    "corpus_stats",
    "iter_rows",
    "load_pairs",
    "load_rerank",
    "pairs_format",
    "plan_pairs",
    "read_chunk",
    "read_pairs_file",
    "split_sentences",
]

WORDS = """
lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut
labore et dolore magna aliqua enim ad minim veniam quis nostrud ullamco laboris nisi aliquip
ex ea commodo consequat duis aute irure in voluptate velit esse cillum fugiat nulla pariatur
excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id
est laborum unde omnis iste natus error voluptatem eaque ipsa quae ab illo veritatis quasi
beatae vitae dicta explicabo nemo ipsam quia voluptas aut odit fugit magni dolores eos ratione
sequi nesciunt neque porro quisquam dolorem adipisci numquam eius modi tempora incidunt magnam
quaerat minima nostrum ullam corporis suscipit aliquid commodi consequatur autem vel eum iure
quam nihil molestiae illum quo at vero accusamus iusto odio ducimus blanditiis voluptatum
deleniti atque corrupti quos quas molestias provident mollitia animi dolorum fuga harum
quidem rerum facilis expedita nam libero tempore cum soluta nobis eligendi optio cumque
impedit minus maxime placeat facere possimus assumenda repellendus quibusdam officiis debitis
saepe eveniet voluptates itaque earum hic tenetur sapiente delectus maiores alias doloribus
repellat a ac ante arcu eget erat leo mi nec nunc
""".split()

_NUM_SENTENCES = 1285
_MIN_WORDS, _MAX_WORDS = 2, 20


def _generate_corpus(seed: int = 1234) -> str:
    """One text of _NUM_SENTENCES sentences, identical on every Python >= 3.2."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(_NUM_SENTENCES):
        # A clipped normal around 7.8 words gives the original's mean and its long tail.
        n = min(_MAX_WORDS, max(_MIN_WORDS, round(rng.gauss(7.6, 3.6))))
        words = [rng.choice(WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        end = rng.choices(".?!", weights=(90, 6, 4))[0]
        sentences.append(" ".join(words) + end)
    return " ".join(sentences)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split at '.', '?' or '!' followed by whitespace; empty pieces are dropped."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


CORPUS: str = _generate_corpus()
SENTENCES: list[str] = split_sentences(CORPUS)


def _words(sentence: str) -> list[str]:
    return sentence.rstrip(".?!").lower().split()


def corpus_stats() -> dict:
    """Shape of SENTENCES: count, words per sentence, distinct words, characters."""
    lengths = [len(_words(s)) for s in SENTENCES]
    return {
        "sentences": len(SENTENCES),
        "mean_words": sum(lengths) / len(lengths),
        "min_words": min(lengths),
        "max_words": max(lengths),
        "distinct_words": len({w for s in SENTENCES for w in _words(s)}),
        "mean_chars": sum(map(len, SENTENCES)) / len(SENTENCES),
    }


def _check_int(name: str, value, minimum: int | None = None) -> None:
    # bool is an int subclass, but load_pairs(True) is a mistake, not a count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_range(name: str, value) -> tuple[int, int]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}") from None
    _check_int(f"{name}[0]", lo, 1)
    _check_int(f"{name}[1]", hi, 1)
    if lo > hi:
        raise ValueError(f"{name} must have min <= max, got {value!r}")
    return lo, hi


def load_pairs(
    num_pairs: int, seed: int = 0, min_sentences: int = 2, max_sentences: int = 15
) -> list[list[str]]:
    """`num_pairs` pairs [text_a, text_b]; each text is k distinct corpus sentences,
    k uniform in [min_sentences, max_sentences].

    Pair i draws from its own random.Random(seed + i), as the original did, so pair i
    of load_pairs(n, s) is pair 0 of load_pairs(1, s + i): a run with seed s + 1 shares
    all but one pair with the run before it, shifted by one.
    """
    _check_int("num_pairs", num_pairs, 0)
    _check_int("seed", seed)
    _check_int("min_sentences", min_sentences, 1)
    _check_int("max_sentences", max_sentences, min_sentences)
    if max_sentences > len(SENTENCES):
        raise ValueError(
            f"max_sentences must be <= {len(SENTENCES)} (corpus size), got {max_sentences}"
        )
    pairs = []
    for i in range(num_pairs):
        rng = random.Random(seed + i)
        pair = []
        for _ in range(2):
            k = rng.randint(min_sentences, max_sentences)
            pair.append(" ".join(rng.sample(SENTENCES, k)))
        pairs.append(pair)
    return pairs


def load_rerank(
    num_queries: int = 100,
    docs_per_query: int = 100,
    seed: int = 0,
    query_words=(3, 30),
    doc_words=(20, 300),
) -> list[tuple[str, list[str]]]:
    """`num_queries` items of (query, documents): a query of corpus words, and
    `docs_per_query` documents of running corpus sentences cut to a drawn word count.

    Query q draws from random.Random(seed + q), so it does not depend on num_queries.
    Word counts are uniform in the inclusive (min, max) ranges.
    """
    _check_int("num_queries", num_queries, 0)
    _check_int("docs_per_query", docs_per_query, 1)
    _check_int("seed", seed)
    q_lo, q_hi = _check_range("query_words", query_words)
    d_lo, d_hi = _check_range("doc_words", doc_words)
    items = []
    for q in range(num_queries):
        rng = random.Random(seed + q)
        query = " ".join(rng.choices(WORDS, k=rng.randint(q_lo, q_hi)))
        docs = []
        for _ in range(docs_per_query):
            n = rng.randint(d_lo, d_hi)
            words: list[str] = []
            while len(words) < n:
                words.extend(rng.choice(SENTENCES).split())
            docs.append(" ".join(words[:n]))
        items.append((query, docs))
    return items


class PairsFileError(ValueError):
    """A pairs file that cannot be read; the message starts with "path:line:"."""

    def __init__(self, path, reason: str, lineno: int | None = None):
        self.path = os.fspath(path)
        self.lineno = lineno
        self.reason = reason
        where = self.path if lineno is None else f"{self.path}:{lineno}"
        super().__init__(f"{where}: {reason}")


_JSONL_EXT = {".jsonl", ".json", ".ndjson"}
_TSV_EXT = {".tsv", ".txt"}
PAIRS_EXTENSIONS = tuple(sorted(_JSONL_EXT | _TSV_EXT | {".parquet"}))
_KEY_STYLES = (("query", "document"), ("text_a", "text_b"))
_ID_HEADERS = tuple(("id",) + keys for keys in _KEY_STYLES)


def read_pairs_file(path) -> list[list[str]]:
    """Read [text_a, text_b] pairs from JSON Lines, a two-column TSV or Parquet.

    JSONL: one object per line with string values under query/document or text_a/text_b (other
    keys are ignored). TSV: two tab-separated columns; a first line "query<TAB>document" or
    "text_a<TAB>text_b" is a header. Parquet: string columns of those names. The format comes from
    the extension (.jsonl/.json/.ndjson, .tsv/.txt, .parquet), else from the first non-blank line
    ("{" means JSONL). Blank lines are skipped; line numbers in errors are 1-based.
    """
    chunk = Chunk(os.fspath(path), pairs_format(path))
    pairs = []
    for row in iter_rows(chunk, ids=False):
        if row.error:
            raise PairsFileError(path, row.error, row.lineno)
        pairs.append([row.text_a, row.text_b])
    if not pairs:
        raise PairsFileError(path, "no pairs found")
    return pairs


# --- pairs files, streamed -------------------------------------------------------------


class Row(NamedTuple):
    """One record of a pairs file: the pair and its id (None without one), or why it is malformed."""

    lineno: int  # 1-based line in the file (Parquet: row)
    offset: int  # byte offset of the line (Parquet: row group): where a reader can start
    id: str | int | None
    text_a: str | None
    text_b: str | None
    error: str | None = None


@dataclass(frozen=True)
class Chunk:
    """Consecutive records of one file, read by one reader."""

    path: str
    fmt: str  # "jsonl" | "tsv" | "parquet"
    offset: int = 0  # byte offset of its first line (Parquet: first row group)
    lineno: int = 1  # line (Parquet: row) at offset, 1-based
    first_row: int = 0  # row number of its first record over all inputs
    rows: int | None = None  # records in it, rejected ones included; None: to the end of the file
    width: int = 2  # TSV columns: 2 (text_a, text_b) or 3 (id, text_a, text_b)
    skip: frozenset = frozenset()  # row numbers of its rejected records


Reject = NamedTuple("Reject", [("path", str), ("lineno", int), ("row", int), ("reason", str)])


@dataclass
class PairsPlan:
    """What plan_pairs found: the chunks to read, the record count and the rejects."""

    files: list[str]
    chunks: list[Chunk] = field(default_factory=list)
    rows: int = 0  # records, rejected ones included
    rejects: list[Reject] = field(default_factory=list)
    id_type: str | None = None  # "int" | "str" when records carry an id; None: ids are row numbers


def _open(path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise PairsFileError(path, "no such file") from None
    except IsADirectoryError:
        raise PairsFileError(path, "is a directory, expected a file") from None
    except OSError as e:
        raise PairsFileError(path, f"cannot read ({e.strerror})") from None


def _lines(path, offset: int = 0, lineno: int = 1) -> Iterator[tuple[int, int, str | None, str | None]]:
    """(lineno, byte offset, text, decode error) per line from `offset`. Lines end at "\\n" only:
    splitlines() also breaks at characters such as \\x1c or \\u2028 inside a text."""
    with _open(path) as f:
        f.seek(offset)
        for raw in f:
            try:
                # utf-8-sig at the start: a byte-order mark from an editor is not part of a text.
                text, error = raw.decode("utf-8-sig" if offset == 0 else "utf-8"), None
                text = (text[:-1] if text.endswith("\n") else text).rstrip("\r")
            except UnicodeDecodeError as e:
                text, error = None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})"
            yield lineno, offset, text, error
            lineno, offset = lineno + 1, offset + len(raw)


def _first_line(path) -> str:
    """The first non-blank line ("" when there is none; an undecodable one reads as "\ufffd")."""
    return next(("\ufffd" if t is None else t for _, _, t, _ in _lines(path) if t is None or t.strip()), "")


def pairs_format(path) -> str:
    """"jsonl", "tsv" or "parquet": from the extension, else from the first non-blank line."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in _JSONL_EXT or ext in _TSV_EXT or ext == ".parquet":
        return "jsonl" if ext in _JSONL_EXT else "tsv" if ext in _TSV_EXT else "parquet"
    return "jsonl" if _first_line(path).lstrip().startswith("{") else "tsv"


def iter_rows(chunk: Chunk, *, ids: bool = True) -> Iterator[Row]:
    """Every record of `chunk`, malformed ones included (Row.error says why); blank lines and a
    TSV header are not records. ids=False ignores ids and allows two TSV columns only."""
    if chunk.fmt == "parquet":
        yield from _parquet_rows(chunk, ids)
        return
    width = chunk.width if ids else 2
    header, count = chunk.offset == 0 and chunk.fmt == "tsv", 0
    for lineno, offset, text, error in _lines(chunk.path, chunk.offset, chunk.lineno):
        if error is None and not text.strip():
            continue
        if chunk.rows is not None and count >= chunk.rows:
            return
        if header:
            header = False
            styles = _KEY_STYLES if width == 2 else _ID_HEADERS
            if error is None and tuple(c.strip() for c in text.split("\t")) in styles:
                continue
        count += 1
        if error is not None:
            yield Row(lineno, offset, None, None, None, error)
        elif chunk.fmt == "jsonl":
            yield _jsonl_row(lineno, offset, text, ids)
        else:
            cols = text.split("\t")
            if len(cols) != width:
                yield Row(lineno, offset, None, None, None, f"expected {width} tab-separated columns, got {len(cols)}")
            else:
                yield Row(lineno, offset, cols[0] if width == 3 else None, cols[-2], cols[-1])


def _jsonl_row(lineno: int, offset: int, text: str, ids: bool) -> Row:
    def bad(reason):
        return Row(lineno, offset, None, None, None, reason)

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return bad(f"invalid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {type(obj).__name__}")
    keys = next((k for k in _KEY_STYLES if k[0] in obj and k[1] in obj), None)
    if keys is None:
        return bad(f"expected keys query/document or text_a/text_b, got {sorted(obj)}")
    for key in keys:
        if not isinstance(obj[key], str):
            return bad(f"{key!r} must be a string, got {type(obj[key]).__name__}")
    rid = obj.get("id") if ids else None
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        return bad(f"'id' must be a string or an integer, got {type(rid).__name__}")
    if isinstance(rid, int) and not -(2**63) <= rid < 2**63:
        return bad(f"'id' {rid} does not fit in 64 bits")
    return Row(lineno, offset, rid, obj[keys[0]], obj[keys[1]])


def _parquet_rows(chunk: Chunk, ids: bool) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(chunk.path)
    except FileNotFoundError:
        raise PairsFileError(chunk.path, "no such file") from None
    except (OSError, pa.ArrowException) as e:
        raise PairsFileError(chunk.path, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    columns = _parquet_columns(chunk.path, f.schema_arrow, ids)
    lineno, left = chunk.lineno, chunk.rows
    for group in range(chunk.offset, f.num_row_groups):
        for batch in f.iter_batches(batch_size=8192, row_groups=[group], columns=columns):
            cols = [batch.column(i).to_pylist() for i in range(len(columns))] + [[None] * batch.num_rows]
            for a, b, rid in zip(*cols[:3]):
                if left is not None and (left := left - 1) < 0:
                    return
                if a is None or b is None:
                    yield Row(lineno, group, None, None, None, f"{columns[0] if a is None else columns[1]!r} is null")
                else:
                    yield Row(lineno, group, rid, a, b)
                lineno += 1


def _parquet_columns(path: str, schema, ids: bool) -> list[str]:
    """The text columns (and "id") to read; a schema without them is an error for the whole file."""
    import pyarrow as pa

    def is_string(name):
        return pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)

    keys = next((k for k in _KEY_STYLES if k[0] in schema.names and k[1] in schema.names), None)
    if keys is None:
        raise PairsFileError(path, f"expected columns query/document or text_a/text_b, got {schema.names}")
    for key in keys:
        if not is_string(key):
            raise PairsFileError(path, f"column {key!r} must be strings, got {schema.field(key).type}")
    if not ids or "id" not in schema.names:
        return list(keys)
    if not (is_string("id") or pa.types.is_integer(schema.field("id").type)):
        raise PairsFileError(path, f"column 'id' must be integers or strings, got {schema.field('id').type}")
    return [*keys, "id"]


def plan_pairs(files, *, chunk_rows: int = 16384, skip_bad: bool = False) -> PairsPlan:
    """One streaming pass over `files` that checks every record before anything is scored.

    Records are numbered from 0 over the files in the given order, rejected ones included (so the
    numbers do not shift when a bad record is fixed), and cut into chunks of about `chunk_rows`
    records (Parquet: whole row groups) where readers can start. A malformed record, a repeated
    id, or an id present where the first record has none (or the other way round) raises
    PairsFileError "path:line: reason", or with skip_bad goes to plan.rejects and read_chunk skips
    it. Memory: the chunk list, the rejects and 8 bytes per id.
    """
    _check_int("chunk_rows", chunk_rows, 1)
    plan, hashes, first = PairsPlan(files=list(files)), array("q"), None
    for path in plan.files:
        fmt = pairs_format(path)
        # TSV: three columns on the first line (header or record) mean id, text_a, text_b.
        base = Chunk(path, fmt, width=3 if fmt == "tsv" and _first_line(path).count("\t") == 2 else 2)
        starts, skips, last = [], [], None  # per chunk: (offset, lineno, first row), rejected rows
        for row in iter_rows(base):
            if not starts or (plan.rows - starts[-1][2] >= chunk_rows and row.offset != last):
                starts.append((row.offset, row.lineno, plan.rows))
                skips.append([])
            last = row.offset
            if row.error is None and first is None:
                first = (f"{path}:{row.lineno}", _id_type(row.id))
                plan.id_type = first[1]
            if reason := row.error or _id_mismatch(row.id, *first):
                _reject(plan, Reject(path, row.lineno, plan.rows, reason), skip_bad)
                skips[-1].append(plan.rows)
            elif plan.id_type is not None:
                hashes.append(hash(row.id))
            plan.rows += 1
        ends = [s[2] for s in starts[1:]] + [plan.rows]
        plan.chunks += [replace(base, offset=o, lineno=n, first_row=r, rows=e - r, skip=frozenset(k))
                        for (o, n, r), e, k in zip(starts, ends, skips)]
    if hashes:
        _reject_duplicate_ids(plan, hashes, skip_bad)
    return plan


def _id_type(rid) -> str | None:
    return None if rid is None else "int" if isinstance(rid, int) else "str"


def _id_mismatch(rid, first_at: str, id_type: str | None) -> str | None:
    kind = _id_type(rid)
    if kind == id_type:
        return None
    if kind is None:
        return f"no 'id', but the first record ({first_at}) has one"
    if id_type is None:
        return f"has an 'id', but the first record ({first_at}) has none"
    return f"'id' is {'an integer' if kind == 'int' else 'a string'}, unlike the first record's ({first_at})"


def _reject(plan: PairsPlan, reject: Reject, skip_bad: bool) -> None:
    if not skip_bad:
        raise PairsFileError(reject.path, reject.reason, reject.lineno)
    plan.rejects.append(reject)


def _reject_duplicate_ids(plan: PairsPlan, hashes: array, skip_bad: bool) -> None:
    """An id seen before makes a reject. Hashes narrow the candidates; a second pass confirms them
    by value, so a hash collision rejects nothing."""
    import numpy as np

    values, counts = np.unique(np.frombuffer(hashes, dtype=np.int64), return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if not suspects:
        return
    seen, found = {}, {}
    for chunk in plan.chunks:
        for number, row in read_chunk(chunk):
            if hash(row.id) not in suspects:
                continue
            if row.id not in seen:
                seen[row.id] = f"{chunk.path}:{row.lineno}"
                continue
            reason = f"duplicate id {row.id!r} (first at {seen[row.id]})"
            _reject(plan, Reject(chunk.path, row.lineno, number, reason), skip_bad)
            found.setdefault(chunk, set()).add(number)
    plan.chunks = [replace(c, skip=c.skip | found[c]) if c in found else c for c in plan.chunks]
    plan.rejects.sort(key=lambda r: r.row)


def read_chunk(chunk: Chunk) -> Iterator[tuple[int, Row]]:
    """(row number, record) for each record of `chunk` that plan_pairs accepted."""
    number = chunk.first_row
    for row in iter_rows(chunk):
        if number not in chunk.skip:
            if row.error:
                raise PairsFileError(chunk.path, f"{row.error} (the file changed after it was checked)", row.lineno)
            yield number, row
        number += 1
    if chunk.rows is not None and (got := number - chunk.first_row) != chunk.rows:
        raise PairsFileError(chunk.path, f"changed after it was checked: {got} records from line {chunk.lineno}, not {chunk.rows}")
