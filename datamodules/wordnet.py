"""The WordNet gloss benchmark: retrieve a noun synset's lemmas from its definition.

A small, offline text-retrieval benchmark built from WordNet 3.0 (Miller, "WordNet: A Lexical
Database for English", CACM 1995; Debian package ``wordnet-base``). Every noun synset gives one
query, its definition (the gloss up to its first quoted example: ``"a member of the genus Canis
(probably descended from the common wolf) that has been domesticated by man since prehistoric
times; occurs in many breeds"``), and one document, its lemma names joined with ``", "``
(``"dog, domestic dog, Canis familiaris"``). The corpus is the set of distinct documents: 82,115
noun synsets give 76,003 distinct lemma lists (``"bass"``-like homonym groups share one), so a
document may be relevant to several queries. Queries are split by synset (train/val/test disjoint,
deterministic for ``split_seed``); validation and test search the whole corpus.

Hard negatives come for free: the synsets sharing a hypernym with a query's synset (its siblings:
``@`` and ``@i`` pointers; "poodle" beside "corgi" under "dog") are semantically close but wrong,
which is the natural candidate list of a static-negative recipe (``QueryDocDataModule``). They are
listed per train query when first needed (3.7 M sibling pairs in all), hypernyms in pointer order and siblings
in file order, without the query's own document. Siblings may be synsets of any split: their
documents are corpus rows every split shares, as with MS MARCO's mined negatives.

The parser reads ``data.noun`` in the WordNet 3.0 data-file format (``wndb(5WN)``):
``synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] | gloss``
with ``w_cnt`` two hexadecimal digits, ``lex_id`` one, ``p_cnt`` three decimal digits and each
pointer ``symbol offset pos source/target``; the license header lines start with two spaces. It
takes about 0.3 s and caches nothing.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.query_doc import QueryDocDataModule
from datamodules.query_doc_data import QueryDocData, QueryDocSplit

DEBIAN_ROOT = "/usr/share/wordnet"
HYPERNYM_POINTERS = ("@", "@i")
INSTALL_HINT = "install the Debian package wordnet-base (apt-get install wordnet-base; it puts WordNet 3.0 in /usr/share/wordnet)"
_HEX = frozenset("0123456789abcdefABCDEF")
_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # the syntactic marker of adjectives in data.adj, e.g. "long(a)"


@dataclass
class WordNetNouns:
    """The noun synsets of ``data.noun`` in file order: offset, lemma names, hypernym synsets (as rows), definition."""

    offsets: list[str]
    lemmas: list[list[str]]
    hypernyms: list[list[int]]
    definitions: list[str]
    path: Path

    def __len__(self) -> int:
        return len(self.offsets)

    def document(self, row: int) -> str:
        """The lemma names of synset ``row`` joined with ``", "``, underscores as spaces."""
        return ", ".join(lemma.replace("_", " ") for lemma in self.lemmas[row])


def find_data_noun(root: str | Path) -> Path:
    """``data.noun`` in ``root`` or in its ``dict`` folder (the layout of the WordNet-3.0 archive)."""
    root = Path(root)
    for path in (root / "data.noun", root / "dict" / "data.noun"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"WordNet noun data file {root / 'data.noun'} not found; {INSTALL_HINT}, or point root= at a folder with data.noun")


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: the text before the first ``; "`` example, stripped."""
    head, _, _ = gloss.partition('; "')
    return head.strip()


def read_wordnet_nouns(root: str | Path = DEBIAN_ROOT) -> WordNetNouns:
    """Parse WordNet 3.0's ``data.noun`` (format in the module docstring); a malformed line raises a
    ``ValueError`` naming the file, the line number and what was expected."""
    path = find_data_noun(root)
    with paused_gc():
        return _parse_data_noun(path)


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside: building ~10^6 small lists (none of them cyclic) otherwise
    triggers collections over all of them, which doubles the time of the parse."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_data_noun(path: Path) -> WordNetNouns:
    offsets: list[str] = []
    lemmas: list[list[str]] = []
    pointers: list[list[str]] = []
    definitions: list[str] = []
    where: list[int] = []

    def fail(lineno: int, what: str) -> ValueError:
        return ValueError(f"{path}, line {lineno}: {what}; expected a WordNet 3.0 data.noun line "
                          f"('synset_offset lex_filenum n w_cnt word lex_id ... p_cnt ptr ... | gloss'); {INSTALL_HINT}")

    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  "):  # license header
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                raise fail(lineno, "no ' | ' before the gloss")
            tok = head.split()
            try:
                if len(tok) < 6 or len(tok[0]) != 8 or not tok[0].isdigit():
                    raise ValueError("the line does not start with an 8-digit synset offset and 5 more fields")
                if tok[2] != "n":
                    raise ValueError(f"ss_type is {tok[2]!r}, not 'n'")
                n_words = int(tok[3], 16)
                if n_words < 1 or 4 + 2 * n_words >= len(tok):
                    raise ValueError(f"w_cnt {tok[3]} announces {n_words} words but the line has too few fields")
                bad = next((i for i in range(n_words) if len(tok[5 + 2 * i]) != 1 or tok[5 + 2 * i] not in _HEX), None)
                if bad is not None:
                    raise ValueError(f"w_cnt {tok[3]} announces {n_words} words but word {bad + 1} ({tok[4 + 2 * bad]!r}) has lex_id "
                                     f"{tok[5 + 2 * bad]!r}, not one hexadecimal digit")
                p_cnt = tok[4 + 2 * n_words]
                if len(p_cnt) != 3 or not p_cnt.isdigit():
                    raise ValueError(f"p_cnt {p_cnt!r} after the {n_words} words is not three decimal digits")
                n_ptrs = int(p_cnt)
                ptrs = tok[5 + 2 * n_words :]
                if len(ptrs) != 4 * n_ptrs:
                    raise ValueError(f"p_cnt {n_ptrs} announces {4 * n_ptrs} pointer fields but the line has {len(ptrs)}")
            except ValueError as err:
                raise fail(lineno, str(err)) from None
            offsets.append(tok[0])
            lemmas.append([_MARKER.sub("", w) for w in tok[4 : 4 + 2 * n_words : 2]])
            pointers.append([ptrs[i + 1] for i in range(0, len(ptrs), 4) if ptrs[i] in HYPERNYM_POINTERS and ptrs[i + 2] == "n"])
            definitions.append(definition_of(gloss))
            where.append(lineno)
    if not offsets:
        raise ValueError(f"{path} has no synset lines; {INSTALL_HINT}")
    row_of = {offset: row for row, offset in enumerate(offsets)}
    hypernyms = []
    for row, targets in enumerate(pointers):
        try:
            hypernyms.append([row_of[t] for t in targets])
        except KeyError as err:
            raise fail(where[row], f"synset {offsets[row]} points to hypernym {err.args[0]}, which is not a synset of the file") from None
    return WordNetNouns(offsets, lemmas, hypernyms, definitions, path)


class SiblingNegatives(Sequence):
    """Hard-negative candidates of the train queries: the documents of the synsets sharing a hypernym
    with the query's synset (hypernyms in pointer order, siblings in file order), distinct, without
    the query's own document.

    Built on first access, for all queries at once with array operations (3.7 M sibling pairs take
    about 0.5 s), and held as one CSR array pair; ``siblings_as_negatives`` costs nothing until used.

    Args:
        synsets: the synset row of every train query.
        hypernyms: hypernym synset rows of every synset.
        doc_row: the corpus row of every synset's document.
    """

    def __init__(self, synsets: np.ndarray, hypernyms: list[list[int]], doc_row: np.ndarray) -> None:
        self.synsets, self.hypernyms, self.doc_row = np.asarray(synsets, dtype=np.int64), hypernyms, np.asarray(doc_row, dtype=np.int64)
        self._ptr: np.ndarray | None = None
        self._docs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.synsets)

    def _build(self) -> None:
        n = len(self.hypernyms)
        n_parents = np.fromiter((len(h) for h in self.hypernyms), dtype=np.int64, count=n)
        edge_child = np.repeat(np.arange(n), n_parents)
        edge_parent = np.fromiter((p for h in self.hypernyms for p in h), dtype=np.int64, count=int(n_parents.sum()))
        # children of every synset, in file order (CSR by parent)
        children = edge_child[np.argsort(edge_parent, kind="stable")]
        n_children = np.bincount(edge_parent, minlength=n)
        child_ptr = np.concatenate([[0], np.cumsum(n_children)])
        # the query's hypernym edges, in query then pointer order
        edge_ptr = np.concatenate([[0], np.cumsum(n_parents)])
        q_edges = np.repeat(np.arange(len(self.synsets)), n_parents[self.synsets])
        parents = edge_parent[_ranges(edge_ptr[self.synsets], n_parents[self.synsets])]
        # every child of each of those hypernyms
        counts = n_children[parents]
        query = np.repeat(q_edges, counts)
        docs = self.doc_row[children[_ranges(child_ptr[parents], counts)]]
        keep = docs != self.doc_row[self.synsets][query]  # the query's own document (and so the query itself)
        query, docs = query[keep], docs[keep]
        _, first = np.unique(query * (int(self.doc_row.max()) + 1) + docs, return_index=True)
        first.sort()  # distinct (query, document) pairs, in their first order
        self._docs = docs[first]
        self._ptr = np.concatenate([[0], np.cumsum(np.bincount(query[first], minlength=len(self.synsets)))])

    def __getitem__(self, index: int) -> list[int]:
        if self._ptr is None:
            self._build()
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"train query row {index} out of range ({len(self)} queries)")
        index %= len(self)
        return self._docs[self._ptr[index] : self._ptr[index + 1]].tolist()


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + l)`` for every ``(s, l)``."""
    total = int(lengths.sum())
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + np.arange(total) - offsets


class WordNetGlossDataModule(QueryDocDataModule):
    """Definition -> lemmas retrieval over WordNet 3.0's noun synsets (module docstring).

    Args:
        root: folder with ``data.noun`` (default: the Debian package ``wordnet-base``'s folder).
        split_seed: seed of the synset split (independent of the training ``seed``).
        val_fraction, test_fraction: fractions of the synsets held out as validation and test
            queries (0 validation: validate on the test split).
        siblings_as_negatives: give the train queries their sibling synsets' documents as hard-negative
            candidates (needed for ``num_negatives > 0``).
        negatives_file: take the candidates from a hard-negative JSONL instead (what ``hardneg mine``
            writes, sentence-transformers' format ``{"qid", "pos", "neg": {"<system>": [...]}}``):
            ``qid`` a train query id (``"02084071-n"``) or train row, negatives corpus rows; the
            systems' lists are joined in file order. Train queries the file lacks get no candidates.
        **kwargs: see ``QueryDocDataModule`` (``num_negatives``, ``batch_size``, ``query_prefix`` ...).

    After ``prepare_splits()``: ``nouns`` (the parsed synsets), ``doc_row`` (synset -> corpus row) and
    ``split_synsets`` (split -> its synset rows, in query-row order).
    """

    def __init__(
        self,
        root: str = DEBIAN_ROOT,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        siblings_as_negatives: bool = True,
        negatives_file: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if val_fraction < 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError(f"need 0 <= val_fraction, 0 < test_fraction and val_fraction + test_fraction < 1, got {val_fraction}, {test_fraction}")
        self.root, self.split_seed = root, split_seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.siblings_as_negatives = siblings_as_negatives
        self.negatives_file = negatives_file
        self.nouns: WordNetNouns | None = None
        self.doc_row: np.ndarray | None = None
        self.split_synsets: dict[str, np.ndarray] = {}

    def load_query_doc(self) -> QueryDocData:
        with paused_gc():
            return self._load()

    def _load(self) -> QueryDocData:
        nouns = read_wordnet_nouns(self.root)
        row_of_doc: dict[str, int] = {}
        rows = [row_of_doc.setdefault(nouns.document(s), len(row_of_doc)) for s in range(len(nouns))]
        doc_row = np.asarray(rows, dtype=np.int64)
        corpus = list(row_of_doc)
        n = len(nouns)
        n_test, n_val = max(1, round(self.test_fraction * n)), round(self.val_fraction * n)
        perm = np.random.default_rng(self.split_seed).permutation(n)
        parts = {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test : n_test + n_val]), "train": np.sort(perm[n_test + n_val :])}

        def split(synsets: np.ndarray) -> QueryDocSplit:
            synsets = synsets.tolist()
            return QueryDocSplit([nouns.definitions[s] for s in synsets], [[rows[s]] for s in synsets], [f"{nouns.offsets[s]}-n" for s in synsets])

        self.nouns, self.doc_row, self.split_synsets = nouns, doc_row, parts
        train = split(parts["train"])
        if self.negatives_file is not None:
            negatives = read_negatives_jsonl(self.negatives_file, train.query_ids, len(corpus))
        else:
            negatives = SiblingNegatives(parts["train"], nouns.hypernyms, doc_row) if self.siblings_as_negatives else None
        return QueryDocData(corpus, train, split(parts["val"]) if n_val else None, split(parts["test"]), doc_ids=None, negatives=negatives)


def read_negatives_jsonl(path: str, query_ids: list[str], n_docs: int) -> list[list[int]]:
    """Per train query row its candidate corpus rows from a hard-negative JSONL (``.gz`` too):
    ``qid`` is a query id of ``query_ids`` or a row number; every line names its file and line
    number when malformed."""
    import gzip
    import json
    from pathlib import Path

    from datamodules.metadata import DatasetFormatError

    if not Path(path).is_file():
        raise FileNotFoundError(f"hard-negative file {path} not found (write one with `hardneg mine`)")
    row_of = {q: i for i, q in enumerate(query_ids)}
    out: list[list[int]] = [[] for _ in query_ids]
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                qid, neg = record["qid"], record["neg"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetFormatError(f"{path} line {number}: expected {{\"qid\", \"pos\", \"neg\": {{system: [rows]}}}} ({e})") from None
            row = row_of.get(qid) if isinstance(qid, str) else (int(qid) if isinstance(qid, int) and 0 <= qid < len(query_ids) else None)
            if row is None:
                raise DatasetFormatError(f"{path} line {number}: qid {qid!r} is not a train query id or row of this split ({len(query_ids)} queries)")
            lists = neg.values() if isinstance(neg, dict) else [neg]
            seen = dict.fromkeys(int(d) for values in lists for d in values)
            bad = [d for d in seen if not 0 <= d < n_docs]
            if bad:
                raise DatasetFormatError(f"{path} line {number}: negative rows {bad[:5]} are outside the corpus of {n_docs} documents")
            out[row] = list(seen)
    return out
