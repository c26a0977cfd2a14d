"""``StepRelevance``: the positive and ignore masks of the rows the shared training step scores.

``EmbeddingStep`` (``lightning_modules.step``) takes this rank's relevance in one of three forms and
needs it as bool masks ``[Q, R]`` over the rows it actually scores, which depend on the gather mode:

- labels (same label = positive; the shorthand): compared across ranks too;
- ``pos_mask`` / ``ignore_mask`` (bool ``[B, B_ref]`` against this rank's own references): in
  ``"global"`` mode every rank's block is gathered onto the diagonal of the global mask; pairs across
  ranks are negatives, or follow the labels when both are given;
- ids (``pos_ids [B, P]`` against ``ref_ids [B_ref]`` / ``neg_ids [B_neg]``, ``contracts.relevance.id_masks``):
  gathered, so a document relevant to queries on two ranks, or a known positive drawn as another
  query's hard negative, is a positive of each such query; memory entries carry their ids too.

The row itself (single view) is always ignored. In ``"local"`` mode this rank's own rows sit at offset
``sum(B_r, r < rank)`` of the gathered references. Memory entries (``miners.memory.CrossBatchMemory``
used as a queue) sharing a query's label are positives (``memory_same_label="positive"``, XBM) or
ignored (``"ignore"``, supervised MoCo); without labels every entry is a negative. For a symmetric
two-view loss ``backward_masks`` gives the other direction (the paired references against the queries).

A separate module from the step because it is one concept (relevance -> masks, in every gather mode)
that the step's control flow (gather -> memory -> mine -> loss) only calls; the labels/masks
conversion that miners and losses share stays in ``contracts.relevance``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from contracts.gather import all_gather_no_grad, dist_ready, rank_sizes, rank_world
from contracts.relevance import id_masks

if TYPE_CHECKING:
    from lightning_modules.step import EmbeddingStep


def _cross(q_labels, r_labels, n, m, device) -> Tensor:
    """Pairs across ranks: positives by labels when both sides have them, else none (negatives)."""
    if q_labels is None or r_labels is None:
        return torch.zeros(n, m, dtype=torch.bool, device=device)
    return q_labels.to(device).unsqueeze(1) == r_labels.to(device).unsqueeze(0)


class StepRelevance:
    """This rank's relevance inputs, and the masks they give for the rows the step scores.

    Three forms: labels (equality, across ranks too), this rank's ``pos_mask``/``ignore_mask``
    blocks (pairs across ranks follow the labels when both sides have them, else negatives), and ids
    (``pos_ids`` against ``ref_ids``/``neg_ids``, across ranks and against the memory). Gathers are
    done once and cached (every rank calls the same gathers in the same order)."""

    def __init__(self, labels, ref_labels, pos_mask, ignore_mask, pos_ids, ref_ids, neg_ids) -> None:
        self.labels, self.ref_labels, self.pos_mask, self.ignore_mask = labels, ref_labels, pos_mask, ignore_mask
        self.pos_ids, self.ref_ids, self.neg_ids = pos_ids, ref_ids, neg_ids
        self._cache: dict[str, Tensor] = {}

    def _gathered(self, step: EmbeddingStep, name: str) -> Tensor:
        if name not in self._cache:
            x = getattr(self, name)
            if step.gather == "none" or not dist_ready():
                self._cache[name] = x
            elif name == "pos_ids":  # pad the columns to one width first
                width = max(rank_sizes(x.shape[1], x.device))
                self._cache[name] = all_gather_no_grad(torch.nn.functional.pad(x, (0, width - x.shape[1]), value=-1))
            else:
                self._cache[name] = all_gather_no_grad(x)
        return self._cache[name]

    def gathered_labels(self, step: EmbeddingStep, side: str, rows: slice | None) -> Tensor:
        labels = self._gathered(step, "labels" if side == "q" else "ref_labels")
        return labels if rows is None else labels[rows]

    def _query_pos_ids(self, step, q_rows):
        ids = self._gathered(step, "pos_ids")
        return ids if q_rows is None else ids[q_rows]

    def forward_masks(self, step, q_sizes, r_sizes, n_sizes, q_rows, r_own, same, device) -> tuple[Tensor, Tensor]:
        """``[Q, R (+ N)]`` positives and pairs to ignore of the scored queries against the batch's
        references (and negatives)."""
        if self.pos_ids is not None:
            ref_ids = self._gathered(step, "ref_ids")
            if self.neg_ids is not None:
                ref_ids = torch.cat([ref_ids, self._gathered(step, "neg_ids")])
            return id_masks(self._query_pos_ids(step, q_rows), ref_ids)
        pos_b = self._local_pos(len(self.labels) if self.labels is not None else len(self.pos_mask), device, same)
        ign_b = torch.zeros_like(pos_b) if self.ignore_mask is None else self.ignore_mask.to(device).bool()
        if same:
            ign_b = ign_b | torch.eye(len(pos_b), dtype=torch.bool, device=device)
        if step.gather == "global":
            q_labels = self._gathered(step, "labels") if self.labels is not None else None
            r_labels = self._gathered(step, "ref_labels") if self.ref_labels is not None else None
            pos = _block_diag(pos_b, q_sizes, r_sizes, labels_q=q_labels, labels_r=r_labels)
            ign = _block_diag(ign_b, q_sizes, r_sizes)
        else:
            r_labels = self._gathered(step, "ref_labels") if self.ref_labels is not None else None
            pos = _cross(self.labels, r_labels, len(pos_b), sum(r_sizes), device)
            pos[:, r_own] = pos_b
            ign = torch.zeros_like(pos)
            ign[:, r_own] = ign_b
        if n_sizes is not None:  # extra negatives: negatives of every query
            pos = torch.cat([pos, pos.new_zeros(len(pos), sum(n_sizes))], 1)
            ign = torch.cat([ign, ign.new_zeros(len(ign), sum(n_sizes))], 1)
        return pos, ign

    def backward_masks(self, step, q_sizes, r_sizes, r_own, same, device) -> tuple[Tensor, Tensor]:
        """``[R, Q]`` masks of the paired references (this rank's, or all in "global" mode) against
        the queries of every rank: the other direction of a symmetric two-view loss."""
        if self.pos_ids is not None:
            ref_ids = self._gathered(step, "ref_ids")
            ref_ids = ref_ids if r_own is None else self.ref_ids
            pos, _ = id_masks(self._gathered(step, "pos_ids"), ref_ids)
            return pos.T.contiguous(), torch.zeros_like(pos.T)
        if step.gather == "global":
            pos, ign = self.forward_masks(step, q_sizes, r_sizes, None, None, None, same, device)
            return pos.T.contiguous(), ign.T.contiguous()
        pos_b = self._local_pos(len(self.labels) if self.labels is not None else len(self.pos_mask), device, same).T
        ign_b = torch.zeros_like(pos_b) if self.ignore_mask is None else self.ignore_mask.to(device).bool().T
        if same:
            ign_b = ign_b | torch.eye(len(pos_b), dtype=torch.bool, device=device)
        q_labels = self._gathered(step, "labels") if self.labels is not None else None
        rank, _ = rank_world()
        q_own = slice(sum(q_sizes[:rank]), sum(q_sizes[: rank + 1])) if step.gather != "none" else slice(0, pos_b.shape[1])
        pos = _cross(self.ref_labels, q_labels, len(pos_b), sum(q_sizes), device)
        pos[:, q_own] = pos_b
        ign = torch.zeros_like(pos)
        ign[:, q_own] = ign_b
        return pos, ign

    def memory_masks(self, step, q_rows, mem_labels, n_queries, device) -> tuple[Tensor, Tensor]:
        """``[Q, M]`` masks against the memory's entries (their labels, or ids when relevance is by ids)."""
        if self.pos_ids is not None:
            return id_masks(self._query_pos_ids(step, q_rows), mem_labels)
        mem_pos = torch.zeros(n_queries, len(mem_labels), dtype=torch.bool, device=device)
        mem_ign = torch.zeros_like(mem_pos)
        if self.labels is not None:
            q_labels = self.gathered_labels(step, "q", q_rows)
            same_label = q_labels.to(device).unsqueeze(1) == mem_labels.unsqueeze(0)
            if step.memory_same_label == "positive":
                mem_pos = same_label
            else:
                mem_ign = same_label
        return mem_pos, mem_ign

    def _local_pos(self, n, device, same) -> Tensor:
        if self.pos_mask is not None:
            return self.pos_mask.to(device).bool()
        if self.labels is None or self.ref_labels is None:
            raise ValueError("EmbeddingStep: give labels (and ref_labels for a second view) or a pos_mask")
        return self.labels.to(device).unsqueeze(1) == self.ref_labels.to(device).unsqueeze(0)


def _block_diag(block: Tensor, q_sizes, r_sizes, labels_q=None, labels_r=None) -> Tensor:
    """The global ``[sum Q, sum R]`` mask from every rank's ``[Q_r, R_r]`` block; off the blocks:
    positives by labels (``labels_q``/``labels_r``), else False."""
    nq, nr = sum(q_sizes), sum(r_sizes)
    out = _cross(labels_q, labels_r, nq, nr, block.device)
    if len(q_sizes) == 1:
        return block.clone()
    padded = torch.zeros(len(block), max(r_sizes), dtype=torch.bool, device=block.device)
    padded[:, : block.shape[1]] = block
    rows = all_gather_no_grad(padded)  # [sum Q, max R]
    q0 = r0 = 0
    for qs, rs in zip(q_sizes, r_sizes):
        out[q0 : q0 + qs, r0 : r0 + rs] = rows[q0 : q0 + qs, :rs]
        q0, r0 = q0 + qs, r0 + rs
    return out
