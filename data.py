"""Workloads for the benchmarks: a lorem-ipsum corpus, cross-encoder pairs, a rerank
workload (one query x N documents), and reading a user's own pairs file.

The corpus is generated here from a fixed seed, so every machine gets the same text
without downloads. Its shape follows the corpus the original benchmark used: about 1285
sentences of 2-20 words (mean ~7.8 words, ~52 characters), ~186 distinct words.
"""

import json
import os
import random
import re

__all__ = [
    "CORPUS",
    "SENTENCES",
    "WORDS",
    "PairsFileError",
    "corpus_stats",
    "load_pairs",
    "load_rerank",
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
_KEY_STYLES = (("query", "document"), ("text_a", "text_b"))


def read_pairs_file(path) -> list[list[str]]:
    """Read [text_a, text_b] pairs from JSON Lines or a two-column TSV.

    JSONL: one object per line with string values under query/document or text_a/text_b
    (other keys are ignored). TSV: two tab-separated columns; a first line that reads
    "query<TAB>document" or "text_a<TAB>text_b" is a header. The format comes from the
    extension (.jsonl/.json/.ndjson, .tsv/.txt), else from the first non-blank line
    ("{" means JSONL). Blank lines are skipped; line numbers in errors are 1-based.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PairsFileError(path, "no such file") from None
    except IsADirectoryError:
        raise PairsFileError(path, "is a directory, expected a file") from None
    except OSError as e:
        raise PairsFileError(path, f"cannot read ({e.strerror})") from None
    try:
        # utf-8-sig: a byte-order mark from an editor should not end up in the first text.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise PairsFileError(path, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", lineno) from None

    # split("\n") rather than splitlines(): the latter also breaks at characters such as
    # \x1c or \u2028 inside a text and would shift the line numbers.
    lines = [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), 1)]
    lines = [(i, line) for i, line in lines if line.strip()]

    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in _JSONL_EXT:
        is_jsonl = True
    elif ext in _TSV_EXT:
        is_jsonl = False
    else:
        is_jsonl = bool(lines) and lines[0][1].lstrip().startswith("{")

    pairs = _parse_jsonl(path, lines) if is_jsonl else _parse_tsv(path, lines)
    if not pairs:
        raise PairsFileError(path, "no pairs found")
    return pairs


def _parse_jsonl(path, lines: list[tuple[int, str]]) -> list[list[str]]:
    pairs = []
    for lineno, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairsFileError(path, f"invalid JSON ({e.msg})", lineno) from None
        if not isinstance(obj, dict):
            raise PairsFileError(
                path, f"expected a JSON object, got {type(obj).__name__}", lineno
            )
        keys = next((k for k in _KEY_STYLES if k[0] in obj and k[1] in obj), None)
        if keys is None:
            raise PairsFileError(
                path,
                f"expected keys query/document or text_a/text_b, got {sorted(obj)}",
                lineno,
            )
        for key in keys:
            if not isinstance(obj[key], str):
                raise PairsFileError(
                    path, f"{key!r} must be a string, got {type(obj[key]).__name__}", lineno
                )
        pairs.append([obj[keys[0]], obj[keys[1]]])
    return pairs


def _parse_tsv(path, lines: list[tuple[int, str]]) -> list[list[str]]:
    pairs = []
    for n, (lineno, line) in enumerate(lines):
        cols = line.split("\t")
        if len(cols) != 2:
            raise PairsFileError(
                path, f"expected 2 tab-separated columns, got {len(cols)}", lineno
            )
        if n == 0 and tuple(c.strip() for c in cols) in _KEY_STYLES:
            continue
        pairs.append(cols)
    return pairs
