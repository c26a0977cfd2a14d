"""The WordNet gloss benchmark: the parser against the file read line by line here, a known synset, its
siblings as hard negatives (brute force), the synset split, and the errors of a missing or malformed file."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from datamodules import WordNetGlossDataModule
from datamodules.wordnet import DEBIAN_ROOT, SiblingNegatives, definition_of, read_wordnet_nouns
from tests.datamodules.test_query_doc import char_tokenizer, decode

DATA_NOUN = Path(DEBIAN_ROOT) / "data.noun"
needs_wordnet = pytest.mark.skipif(not DATA_NOUN.is_file(), reason="WordNet 3.0 (Debian wordnet-base) not installed")

# A miniature data.noun: a header line, a root, two hypernyms and their children (one a shared lemma list).
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
MINI = [
    "00000001 03 n 01 thing 0 002 ~ 00000002 n 0000 ~ 00000003 n 0000 | a separate object",
    "00000002 03 n 01 animal 0 003 @ 00000001 n 0000 ~ 00000004 n 0000 ~ 00000005 n 0000 | a living organism; \"animals move\"",
    "00000003 03 n 02 tool 0 implement 0 002 @ 00000001 n 0000 ~ 00000006 n 0000 | an instrument used by hand",
    "00000004 05 n 02 big_cat 0 cat 0 001 @ 00000002 n 0000 | a large feline; \"lions are big cats\"; \"tigers too\"",
    "00000005 05 n 01 dog 0 001 @ 00000002 n 0000 | a domestic canine",
    "00000006 06 n 01 hammer(a) 0 001 @i 00000003 n 0000 | a hand tool with a heavy head",
    "00000007 05 n 01 dog 0 001 @ 00000002 n 0000 | a second sense with the same lemma",
    "00000008 05 n 01 eel 0 001 @ 00000002 n 0000 | a snakelike fish",
    "00000009 05 n 01 owl 0 001 @ 00000002 n 0000 | a nocturnal bird",
    "00000010 05 n 01 ant 0 001 @ 00000002 n 0000 | a small insect",
]


def write_mini(tmp_path: Path, lines: list[str] = MINI) -> Path:
    (tmp_path / "data.noun").write_text(HEADER + "".join(line + "  \n" for line in lines), encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="module")
def wordnet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = WordNetGlossDataModule(num_workers=0, num_negatives=2, batch_size=8, data_config={"tokenizer": char_tokenizer, "max_length": 512})
        dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------ parser
@needs_wordnet
def test_every_noun_synset_is_parsed_with_its_lemmas_and_definition(wordnet):
    lines = [line for line in DATA_NOUN.read_text(encoding="utf-8").splitlines() if not line.startswith("  ")]
    nouns = wordnet.nouns
    assert len(lines) == len(nouns) == 82_115
    for i in np.random.default_rng(0).choice(len(lines), 300, replace=False):  # the line read field by field here
        fields, gloss = lines[i].split(" | ", 1)
        tok = fields.split()
        assert nouns.offsets[i] == tok[0]
        assert nouns.lemmas[i] == tok[4 : 4 + 2 * int(tok[3], 16) : 2]
        assert nouns.definitions[i] == gloss.split('; "')[0].strip()
    docs = {", ".join(w.replace("_", " ") for w in lemmas) for lemmas in nouns.lemmas}
    assert len(wordnet.data.corpus) == len(docs) == 76_003


@needs_wordnet
def test_dog_is_a_query_with_its_lemmas_as_the_relevant_document(wordnet):
    s = wordnet.nouns.offsets.index("02084071")
    assert wordnet.nouns.definitions[s].startswith("a member of the genus Canis (probably descended from the common wolf)")
    assert wordnet.data.corpus[wordnet.doc_row[s]] == "dog, domestic dog, Canis familiaris"
    found = 0
    for name in ("train", "val", "test"):
        split = getattr(wordnet.data, name)
        if "02084071-n" in split.query_ids:
            row = list(split.query_ids).index("02084071-n")
            assert split.queries[row] == wordnet.nouns.definitions[s] and split.qrels[row] == [int(wordnet.doc_row[s])]
            found += 1
    assert found == 1  # in exactly one split


@needs_wordnet
def test_siblings_of_dog_are_the_other_children_of_its_hypernyms(wordnet):
    nouns, doc_row, corpus = wordnet.nouns, wordnet.doc_row, wordnet.data.corpus
    s = nouns.offsets.index("02084071")
    assert [corpus[doc_row[h]] for h in nouns.hypernyms[s]] == ["canine, canid", "domestic animal, domesticated animal"]
    siblings = [corpus[d] for d in SiblingNegatives(np.array([s]), nouns.hypernyms, doc_row)[0]]
    assert {"wolf", "fox", "jackal, Canis aureus", "domestic cat, house cat, Felis domesticus, Felis catus"} <= set(siblings)
    assert "dog, domestic dog, Canis familiaris" not in siblings and len(siblings) == len(set(siblings))


@needs_wordnet
def test_train_negatives_equal_a_brute_force_sibling_search(wordnet):
    nouns, doc_row = wordnet.nouns, wordnet.doc_row
    train = wordnet.split_synsets["train"]
    negatives = wordnet.data.negatives
    for q in np.random.default_rng(1).choice(len(train), 5, replace=False):
        s = train[q]
        expected = []
        for h in nouns.hypernyms[s]:
            for c in range(len(nouns)):  # every synset whose hypernyms include h, in file order
                if c != s and h in nouns.hypernyms[c] and doc_row[c] != doc_row[s] and doc_row[c] not in expected:
                    expected.append(int(doc_row[c]))
        assert negatives[q] == expected
    padded = sum(len(negatives[q]) < 2 for q in range(len(train)))
    assert wordnet.num_padded == padded == wordnet.split_sizes()["train"]["fewer_than_k_negatives"]


@needs_wordnet
def test_splits_are_disjoint_deterministic_and_searched_over_the_whole_corpus(wordnet, monkeypatch):
    monkeypatch.setattr("datamodules.wordnet.read_wordnet_nouns", lambda root: wordnet.nouns)  # parse once per test file
    parts = wordnet.split_synsets
    assert sum(len(p) for p in parts.values()) == 82_115 and len(np.unique(np.concatenate(list(parts.values())))) == 82_115
    assert len(parts["test"]) == len(parts["val"]) == round(0.1 * 82_115)
    again = WordNetGlossDataModule(num_workers=0)
    again.prepare_splits()
    assert all(np.array_equal(again.split_synsets[k], parts[k]) for k in parts)
    other = WordNetGlossDataModule(num_workers=0, split_seed=1)
    other.prepare_splits()
    assert not np.array_equal(other.split_synsets["test"], parts["test"])
    queries, corpus = wordnet.test_dataloader()
    assert len(corpus.dataset) == 76_003 and len(queries.dataset) == len(parts["test"])
    assert wordnet.qrels("test") == [[int(wordnet.doc_row[s])] for s in parts["test"]]


@needs_wordnet
def test_a_train_batch_has_sibling_negatives_and_never_the_positive(wordnet):
    batch = next(iter(wordnet.train_dataloader()))
    assert batch["neg_idx"].shape == (8, 2) and batch["neg_input_ids"].shape[0] == 16
    for q, d, negs in zip(batch["query_idx"].tolist(), batch["doc_idx"].tolist(), batch["neg_idx"].tolist()):
        assert d not in negs and wordnet.data.train.qrels[q] == [d]
        assert {n for n in negs if n >= 0} <= set(wordnet.data.negatives[q])
    assert decode(batch["query_input_ids"])[0] == wordnet.data.train.queries[batch["query_idx"][0]]


# ------------------------------------------------------------------------------- miniature files
def test_miniature_file_parses_markers_examples_and_shared_documents(tmp_path):
    nouns = read_wordnet_nouns(write_mini(tmp_path))
    assert len(nouns) == 10 and nouns.lemmas[5] == ["hammer"]  # the (a) marker is dropped
    assert nouns.definitions[3] == "a large feline" and nouns.document(3) == "big cat, cat"
    assert nouns.hypernyms[5] == [2] and nouns.hypernyms[0] == []  # @i counts as a hypernym
    assert definition_of('a thing; "an example"; "another"') == "a thing"
    dm = WordNetGlossDataModule(root=str(tmp_path), num_workers=0, val_fraction=0.0, test_fraction=0.3, batch_size=2, num_negatives=1)
    dm.prepare_splits()
    corpus = dm.data.corpus
    assert len(corpus) == 9 and corpus.count("dog") == 1  # two synsets, one document
    assert dm.doc_row[4] == dm.doc_row[6] and dm.data.val is None and dm.qrels("validate") == dm.qrels("test")
    train = dm.split_synsets["train"].tolist()
    for q, s in enumerate(train):
        expected = [int(dm.doc_row[c]) for c in range(10) if c != s and set(nouns.hypernyms[c]) & set(nouns.hypernyms[s])
                    and dm.doc_row[c] != dm.doc_row[s]]
        assert dm.data.negatives[q] == list(dict.fromkeys(expected))


def test_a_missing_file_says_how_to_install_wordnet(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.noun not found; install the Debian package wordnet-base \(apt-get install wordnet-base"):
        WordNetGlossDataModule(root=str(tmp_path / "nowhere")).prepare_splits()


@pytest.mark.parametrize("line, problem", [
    ("00000011 05 n 03 cat 0 kitty 0 001 @ 00000002 n 0000 | too few words", "w_cnt 03 announces 3 words but word 3 ('001') has lex_id '@'"),
    ("00000011 05 n 01 cat 0 002 @ 00000002 n 0000 | a cat", "p_cnt 2 announces 8 pointer fields but the line has 4"),
    ("00000011 05 v 01 cat 0 000 | a verb", "ss_type is 'v', not 'n'"),
    ("00000011 05 n 01 cat 0 000 no gloss separator", "no ' | ' before the gloss"),
    ("00000011 05 n 01 cat 0 001 @ 99999999 n 0000 | a cat", "points to hypernym 99999999"),
])
def test_a_malformed_line_names_the_file_and_line(tmp_path, line, problem):
    root = write_mini(tmp_path, MINI[:4] + [line] + MINI[4:])
    with pytest.raises(ValueError, match=r"data\.noun, line 6: .*" + problem.replace("(", r"\(").replace(")", r"\)")) as err:
        read_wordnet_nouns(root)
    assert "apt-get install wordnet-base" in str(err.value) and str(root) in str(err.value)


def test_candidates_from_a_hard_negative_file(tmp_path):
    import json

    root = write_mini(tmp_path)
    dm = WordNetGlossDataModule(root=str(root), num_workers=0, val_fraction=0.0, test_fraction=0.3, batch_size=2, num_negatives=1)
    dm.prepare_splits()
    ids = list(dm.data.train.query_ids)
    lines = [{"qid": ids[0], "pos": [], "neg": {"model": [3, 1], "bm25": [1, 2]}}, {"qid": 1, "pos": [], "neg": {"model": [0]}}]
    path = tmp_path / "negatives.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dm2 = WordNetGlossDataModule(root=str(root), num_workers=0, val_fraction=0.0, test_fraction=0.3, batch_size=2, num_negatives=1,
                                 negatives_file=str(path))
    dm2.prepare_splits()
    assert dm2.data.negatives[0] == [3, 1, 2] and dm2.data.negatives[1] == [0] and dm2.data.negatives[2] == []
    path.write_text(json.dumps({"qid": "nope", "neg": {"m": [1]}}) + "\n")
    with pytest.raises(Exception, match="line 1: qid 'nope'"):
        WordNetGlossDataModule(root=str(root), num_workers=0, val_fraction=0.0, test_fraction=0.3, negatives_file=str(path)).prepare_splits()
    path.write_text(json.dumps({"qid": 0, "neg": {"m": [99]}}) + "\n")
    with pytest.raises(Exception, match="outside the corpus"):
        WordNetGlossDataModule(root=str(root), num_workers=0, val_fraction=0.0, test_fraction=0.3, negatives_file=str(path)).prepare_splits()
