"""Teachers that score a query's candidates: the soft labels of knowledge distillation.

A scorer answers one question for a batch of queries: how relevant is each of the query's
candidates, ``[positive, negative_1 .. negative_k]``? ``score(queries, candidates) -> [B, 1 + k]``,
positive first, without gradient (a frozen teacher). The distillation losses
(``losses.distillation``) align the student's scores of the same pairs with these.

Two input forms, declared by the scorer's ``inputs`` attribute:

- ``"text"`` (``CrossEncoderScorer``, ``BiEncoderScorer``): ``queries: list[str] [B]`` and
  ``candidates: list[list[str]]`` (``B`` lists of ``1 + k`` texts);
- ``"ids"`` (``FileScorer``): ``queries: Tensor [B]`` and ``candidates: Tensor [B, 1 + k]`` of ids
  (``-1``: an empty slot, scored NaN), looked up in precomputed scores.

``DualEncoderModule(teacher=...)`` builds either form from its batch (raw texts from
``TextInputs(keep_text=True)``, or the ids ``query_idx``/``doc_idx``/``neg_idx``). A NaN score marks a
candidate without a teacher score; the losses leave it out.

The teachers of the papers: a cross-encoder (Hofstätter et al., "Improving Efficient Neural
Ranking Models with Cross-Architecture Knowledge Distillation", 2020: an ensemble of BERT
cross-encoders; RocketQAv2, Ren et al. 2021: a cross-encoder re-ranker) or a stronger bi-encoder;
sentence-transformers publishes the MS MARCO cross-encoder scores as ``{qid: {pid: score}}``
(``msmarco-hard-negatives/cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz``), which ``FileScorer`` reads.
"""

from __future__ import annotations

import gzip
import json
import math
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_candidates(queries: Sequence[str], candidates: Sequence[Sequence[str]], who: str) -> int:
    """Validate the text form and return ``1 + k`` (every query has the same number of candidates)."""
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise TypeError(f"{who}.score: queries must be a list of str, got {type(queries).__name__}")
    if len(candidates) != len(queries):
        raise ValueError(f"{who}.score: {len(candidates)} candidate lists for {len(queries)} queries; expected one list per query")
    widths = {len(c) for c in candidates}
    if len(widths) > 1:
        raise ValueError(f"{who}.score: candidate lists of lengths {sorted(widths)}; expected 1 + k texts for every query")
    width = widths.pop() if widths else 1
    if width < 1:
        raise ValueError(f"{who}.score: empty candidate lists; expected [positive, negatives...] per query")
    return width


class CandidateScorer(nn.Module):
    """Base of the teachers: frozen, no gradient, ``score(queries, candidates) -> [B, 1 + k]`` float32 on the CPU."""

    inputs = "text"

    def score(self, queries: Any, candidates: Any) -> Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True) -> CandidateScorer:
        # a teacher stays in eval mode (no dropout) whatever the LightningModule does
        return super().train(False)


class CrossEncoderScorer(CandidateScorer):
    """A cross-encoder reads ``(query, candidate)`` together and outputs a relevance logit.

    Any ``transformers`` ``AutoModelForSequenceClassification`` with one output (the MS MARCO
    cross-encoders of sentence-transformers: ``cross-encoder/ms-marco-MiniLM-L-6-v2``), from a hub
    name or a local folder; or a ready ``model`` and ``tokenizer``. With several labels, ``label``
    picks the logit used as the score.

    Args:
        model_name_or_path: hub name or local folder (ignored when ``model`` is given).
        max_length: tokens per (query, candidate) pair.
        batch_size: pairs per forward pass.
        activation: ``None`` (raw logits, as Hofstätter et al.'s Margin-MSE uses) or ``"sigmoid"``.
        model, tokenizer: a built model and its tokenizer (tests build a tiny random BERT).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        max_length: int = 256,
        batch_size: int = 64,
        activation: str | None = None,
        label: int = 0,
        model: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if activation not in (None, "sigmoid"):
            raise ValueError(f"CrossEncoderScorer: activation={activation!r}; expected None or 'sigmoid'")
        if model is None:
            if model_name_or_path is None:
                raise ValueError("CrossEncoderScorer: give model_name_or_path (hub name or local folder) or a model")
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(str(model_name_or_path))
        if tokenizer is None:
            from transformers import AutoTokenizer

            source = model_name_or_path if model_name_or_path is not None else getattr(model, "name_or_path", None)
            if not source:
                raise ValueError("CrossEncoderScorer: a given model needs its tokenizer (tokenizer=...)")
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size, self.activation, self.label = max_length, batch_size, activation, label
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def score(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> Tensor:
        width = check_candidates(queries, candidates, "CrossEncoderScorer")
        pairs = [(q, c) for q, cands in zip(queries, candidates) for c in cands]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            enc = self.tokenizer(
                [q for q, _ in chunk], [c for _, c in chunk], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits.float()
            logits = logits[:, self.label] if logits.dim() == 2 else logits
            out.append(torch.sigmoid(logits) if self.activation == "sigmoid" else logits)
        scores = torch.cat(out) if out else torch.empty(0)
        return scores.cpu().view(len(queries), width)


class BiEncoderScorer(CandidateScorer):
    """A (stronger) bi-encoder as teacher: cosine (or dot) similarity of its embeddings.

    Args:
        encoder: any module with ``encode(texts) -> [N, D]`` (``models.HFTextEncoder``; the packaged
            MiniLM: ``models.create_encoder("minilm-l6")``), frozen here.
        similarity: ``"cosine"`` or ``"dot"``.
        batch_size: texts per ``encode`` call.
    """

    def __init__(self, encoder: nn.Module, similarity: str = "cosine", batch_size: int = 64) -> None:
        super().__init__()
        if not hasattr(encoder, "encode"):
            raise TypeError(f"BiEncoderScorer: encoder {type(encoder).__name__} has no encode(texts); expected e.g. models.HFTextEncoder")
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"BiEncoderScorer: similarity={similarity!r}; expected 'cosine' or 'dot'")
        self.encoder, self.similarity, self.batch_size = encoder, similarity, batch_size
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    @torch.no_grad()
    def score(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> Tensor:
        width = check_candidates(queries, candidates, "BiEncoderScorer")
        q = self.encoder.encode(list(queries), batch_size=self.batch_size).float()
        c = self.encoder.encode([t for cands in candidates for t in cands], batch_size=self.batch_size).float()
        if self.similarity == "cosine":
            q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
        return (q.unsqueeze(1) * c.view(len(queries), width, -1)).sum(-1).cpu()


class FileScorer(CandidateScorer):
    """Precomputed teacher scores read from a file.

    Formats (by suffix, ``.gz`` optional):

    - ``.pkl`` / ``.pickle``: a pickled ``{qid: {pid: score}}`` (sentence-transformers' MS MARCO
      cross-encoder scores, ``cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz``);
    - ``.json``: the same mapping as JSON (keys become strings; ids are compared as strings);
    - ``.tsv`` / ``.txt``: one ``qid<TAB>pid<TAB>score`` line per pair (whitespace-separated also accepted).

    Ids are compared as strings, so ``1185869`` and ``"1185869"`` match. The batch carries row
    indices (``query_idx`` = the query's row in the train split, ``doc_idx``/``neg_idx`` = corpus
    rows); ``query_ids``/``doc_ids`` map rows to the file's ids (the DataModule's
    ``train.query_ids`` and ``doc_ids``; ``DualEncoderModule`` hands them over at setup through
    ``bind_ids``); without them the rows are the ids.

    Args:
        path: the score file.
        missing: a pair absent from the file: ``"error"`` (a clear error naming it) or ``"ignore"``
            (NaN: the distillation losses leave the candidate out).
    """

    inputs = "ids"

    def __init__(self, path: str | Path, missing: str = "error") -> None:
        super().__init__()
        if missing not in ("error", "ignore"):
            raise ValueError(f"FileScorer: missing={missing!r}; expected 'error' or 'ignore'")
        self.path, self.missing = Path(path), missing
        self.scores = read_scores(self.path)
        self.query_ids: Sequence[Any] | None = None
        self.doc_ids: Sequence[Any] | None = None

    def bind_ids(self, query_ids: Sequence[Any] | None, doc_ids: Sequence[Any] | None) -> None:
        """Map batch rows to the file's ids: ``query_ids[row]``, ``doc_ids[corpus row]``."""
        self.query_ids, self.doc_ids = query_ids, doc_ids

    @torch.no_grad()
    def score(self, queries: Tensor, candidates: Tensor) -> Tensor:
        queries, candidates = torch.as_tensor(queries), torch.as_tensor(candidates)
        if queries.dim() != 1 or candidates.dim() != 2 or len(candidates) != len(queries):
            raise ValueError(
                f"FileScorer.score: queries {tuple(queries.shape)} and candidates {tuple(candidates.shape)}; "
                f"expected ids [B] and [B, 1 + k]"
            )
        out = torch.full(candidates.shape, math.nan, dtype=torch.float32)
        for i, (q, row) in enumerate(zip(queries.tolist(), candidates.tolist())):
            qid = str(self.query_ids[q]) if self.query_ids is not None else str(q)
            table = self.scores.get(qid)
            for j, c in enumerate(row):
                if c < 0:
                    continue
                pid = str(self.doc_ids[c]) if self.doc_ids is not None else str(c)
                value = None if table is None else table.get(pid)
                if value is None:
                    if self.missing == "error":
                        raise KeyError(
                            f"FileScorer: {self.path} has no score for query {qid!r} and document {pid!r}; "
                            f"check that its ids are the DataModule's (query_ids/doc_ids), or pass missing='ignore'"
                        )
                    continue
                out[i, j] = value
        return out

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, queries={len(self.scores)}, missing={self.missing!r}"


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_scores(path: Path) -> dict[str, dict[str, float]]:
    """``{qid: {pid: score}}`` with string ids, from a pickle, JSON or TSV file (optionally gzipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"FileScorer: no score file at {path}; expected a {{qid: {{pid: score}}}} .pkl/.json(.gz) or a qid/pid/score .tsv")
    suffix = path.with_suffix("").suffix if path.suffix == ".gz" else path.suffix
    if suffix in (".pkl", ".pickle", ".json"):
        with _open(path, "rb") as f:
            raw = pickle.load(f) if suffix != ".json" else json.loads(f.read().decode("utf-8"))
        if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
            raise ValueError(f"FileScorer: {path} holds a {type(raw).__name__}; expected a mapping {{qid: {{pid: score}}}}")
        return {str(q): {str(p): float(s) for p, s in row.items()} for q, row in raw.items()}
    if suffix in (".tsv", ".txt"):
        out: dict[str, dict[str, float]] = {}
        with _open(path, "rt") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    if len(parts) != 3:
                        raise ValueError
                    out.setdefault(parts[0], {})[parts[1]] = float(parts[2])
                except ValueError:
                    raise ValueError(f"FileScorer: {path} line {number} is {line.rstrip()!r}; expected 'qid<TAB>pid<TAB>score'") from None
        return out
    raise ValueError(f"FileScorer: {path} has suffix {suffix!r}; expected .pkl, .pickle, .json or .tsv/.txt (optionally .gz)")
