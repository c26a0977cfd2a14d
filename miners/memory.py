"""``CrossBatchMemory``: a FIFO of past embeddings and labels used as the reference set (XBM, MoCo queue)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from contracts.gather import all_gather_no_grad, dist_ready
from contracts.mined import Mined, TripletMask
from contracts.relevance import all_pairs


class CrossBatchMemory(nn.Module):
    """Wrap a loss (and optionally a miner) so that its reference set is a queue of past embeddings.

    Wang, Zhang, Huang, Scott, "Cross-Batch Memory for Embedding Learning" (CVPR 2020), Sec. 3: the
    XBM-augmented pair loss compares each anchor of the batch with a memory of the last ``M``
    embeddings (valid because embeddings drift slowly), i.e. the pair loss with the batch x memory
    similarity matrix in place of batch x batch. The same first-in first-out queue is MoCo's
    dictionary (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
    CVPR 2020, Sec. 3.2, "Dictionary as a queue").

    ``memory(emb, labels)`` writes the batch into the queue (detached, so the memory never carries
    gradient), then computes ``loss(emb, labels, mined, ref_emb=E_mem, ref_labels=L_mem)`` against
    the filled part of the queue, with ``mined`` from ``miner(emb, labels, E_mem, L_mem)`` or all
    pairs. Every pair or triplet that pairs a row with its own copy in the queue is removed. Relevance
    is by labels only (the queue stores labels; ``pos_mask``/``ignore_mask`` are refused, see ``forward``). It
    equals pytorch-metric-learning's ``CrossBatchMemory.forward(embeddings, labels, indices_tuple,
    enqueue_mask)``, memory indices included (buffer order, not age order):

    - ``enqueue_mask: [B]`` bool: only those rows are written to the queue and only the other rows
      are queries (MoCo: keys are enqueued, queries are compared); no self-comparison removal.
    - ``indices_tuple``: extra tuples (a ``Mined`` or a pytorch-metric-learning tuple) appended to the
      mined ones, converted to their form. As in pytorch-metric-learning, their non-anchor indices are
      read as indices into the memory.

    Under DDP every rank enqueues the batch gathered from all ranks (in rank order), so all ranks
    hold the same memory; each rank's queries are its own rows. The gathered batch must fit the
    memory (``memory_size`` at least the global batch). When the caller already passes the global
    batch on every rank (``MetricLearningModule(gather=True)`` gathers before the loss), set
    ``gather=False``: the rows are then enqueued as they are, or they would be enqueued once per rank.

    Buffers ``embedding_memory: [memory_size, embedding_size]`` and ``label_memory: [memory_size]``
    are the queue; ``filled()`` returns the part written so far, for use as ``ref_emb`` elsewhere
    (MoCHi). The write position travels with ``state_dict`` (extra state).

    Args:
        loss: any loss with the ``(emb, labels, mined, ref_emb, ref_labels)`` signature.
        embedding_size: ``D``.
        memory_size: number of past embeddings kept.
        miner: optional miner called against the memory.
        gather: under DDP, gather the batch from all ranks before enqueueing (see above).
    """

    supplies_ref_emb = True  # read by the pre-flight check (experiments.preflight): loss.supports_ref_emb

    def __init__(
        self,
        loss: nn.Module,
        embedding_size: int,
        memory_size: int = 1024,
        miner: Optional[nn.Module] = None,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if embedding_size < 1 or memory_size < 1:
            raise ValueError(f"CrossBatchMemory: embedding_size={embedding_size}, memory_size={memory_size}; both must be >= 1")
        self.loss = loss
        self.miner = miner
        self.embedding_size = int(embedding_size)
        self.memory_size = int(memory_size)
        self.gather = gather
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.queue_idx = 0
        self.has_been_filled = False

    # ------------------------------------------------------------------------------------ queue
    def reset_queue(self) -> None:
        """Empty the memory."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx = 0
        self.has_been_filled = False

    def __len__(self) -> int:
        """Number of rows filled so far."""
        return self.memory_size if self.has_been_filled else self.queue_idx

    def filled(self) -> tuple[Tensor, Tensor]:
        """``(embeddings [n, D], labels [n])``: the written part of the queue, in buffer order, detached."""
        n = len(self)
        return self.embedding_memory[:n], self.label_memory[:n]

    @torch.no_grad()
    def enqueue(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Write ``emb: [n, D]``, ``labels: [n]`` at the write position; return their slots ``[n]``."""
        n = len(emb)
        if n > self.memory_size:
            raise ValueError(
                f"CrossBatchMemory: {n} rows to enqueue (the batch gathered from every rank) but memory_size is "
                f"{self.memory_size}; expected memory_size >= the global batch"
            )
        slots = (torch.arange(n, device=emb.device) + self.queue_idx) % self.memory_size
        self.embedding_memory[slots] = emb.detach().to(self.embedding_memory.dtype)
        self.label_memory[slots] = labels.to(self.label_memory.dtype)
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + n) % self.memory_size
        if n and self.queue_idx <= previous:
            self.has_been_filled = True
        return slots

    def get_extra_state(self) -> dict[str, Any]:
        return {"queue_idx": self.queue_idx, "has_been_filled": self.has_been_filled}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.queue_idx = int(state["queue_idx"])
        self.has_been_filled = bool(state["has_been_filled"])

    # ---------------------------------------------------------------------------------- forward
    def forward(
        self,
        emb: Tensor,
        labels: Tensor,
        indices_tuple: Mined | tuple | None = None,
        enqueue_mask: Optional[Tensor] = None,
        *,
        pos_mask: Optional[Tensor] = None,
        ignore_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``emb: [B, D]``, ``labels: [B]``; optional ``enqueue_mask: [B]`` bool. Returns the scalar loss.

        Relevance is by labels only: the queue stores labels, and a ``pos_mask`` / ``ignore_mask`` of
        this batch says nothing about the rows of past batches, so both are refused.
        """
        if pos_mask is not None or ignore_mask is not None:
            raise ValueError(
                "CrossBatchMemory: relevance is by labels only (the queue stores each row's label; a pos_mask/ignore_mask "
                "of this batch cannot say which past rows are relevant). Pass labels, or call miner and loss with "
                "ref_emb=memory.filled()[0] and a pos_mask over those rows yourself"
            )
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("CrossBatchMemory: indices_tuple and enqueue_mask are mutually exclusive")
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size:
            raise ValueError(f"CrossBatchMemory: embeddings have shape {tuple(emb.shape)}; expected [B, {self.embedding_size}]")
        if labels.dim() != 1 or len(labels) != len(emb):
            raise ValueError(f"CrossBatchMemory: labels have shape {tuple(labels.shape)}; expected [{len(emb)}]")
        labels = labels.to(emb.device)
        if self.embedding_memory.dtype != emb.dtype or self.embedding_memory.device != emb.device:
            self.embedding_memory = self.embedding_memory.to(device=emb.device, dtype=emb.dtype)
            self.label_memory = self.label_memory.to(device=emb.device)

        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device=emb.device, dtype=torch.bool)
            if enqueue_mask.shape != labels.shape:
                raise ValueError(f"CrossBatchMemory: enqueue_mask has shape {tuple(enqueue_mask.shape)}; expected [{len(emb)}]")
            to_queue, queue_labels = emb[enqueue_mask], labels[enqueue_mask]
            emb, labels = emb[~enqueue_mask], labels[~enqueue_mask]
        else:
            to_queue, queue_labels = emb, labels

        if self.gather:
            offset = self._rank_offset(len(to_queue))
            slots = self.enqueue(all_gather_no_grad(to_queue.detach()), all_gather_no_grad(queue_labels))
        else:
            offset, slots = 0, self.enqueue(to_queue.detach(), queue_labels)
        own_slots = slots[offset : offset + len(to_queue)]
        ref_emb, ref_labels = self.filled()

        if self.miner is not None:
            mined = self.miner(emb, labels, ref_emb, ref_labels)
            if not isinstance(mined, Mined):
                mined = Mined.from_tuple(tuple(mined))
        else:
            mined = all_pairs(labels, ref_labels, same_set=False)
        if enqueue_mask is None:
            mined = _drop_self_pairs(mined, own_slots)
        if indices_tuple is not None:
            mined = _concatenate(mined, indices_tuple)
        return self.loss(emb, labels, mined, ref_emb, ref_labels)

    @staticmethod
    def _rank_offset(n: int) -> int:
        """Where this rank's rows start in the batch gathered from all ranks (0 on one process)."""
        if not dist_ready():
            return 0
        sizes = all_gather_no_grad(torch.tensor([n], device=_comm_device()))
        return int(sizes[: dist.get_rank()].sum())


def _comm_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _drop_self_pairs(mined: Mined, own_slots: Tensor) -> Mined:
    """Remove positive pairs and triplets ``(a, p)`` whose ``p`` is the queue slot of anchor ``a`` itself."""
    changes: dict[str, Any] = {}
    if mined.pos_pairs is not None:
        a, p = mined.pos_pairs
        keep = p != own_slots[a]
        changes["pos_pairs"] = (a[keep], p[keep])
        if mined.pos_weights is not None:
            changes["pos_weights"] = mined.pos_weights[keep]
    if mined.pos_mask is not None:
        mask = mined.pos_mask.clone()
        mask[torch.arange(len(mask), device=mask.device), own_slots.to(mask.device)] = 0
        changes["pos_mask"] = mask
    if mined.triplet_mask is not None:
        positives, mask = mined.triplet_mask
        own = positives == own_slots.to(positives.device).unsqueeze(1)  # [B, K]: slots that hold the anchor itself
        changes["triplet_mask"] = TripletMask(positives, mask * ~own.unsqueeze(2) if own.any() else mask)
    if mined.triplets is not None:
        a, p, n = mined.triplets
        keep = p != own_slots[a]
        changes["triplets"] = (a[keep], p[keep], n[keep])
        if mined.triplet_weights is not None:
            changes["triplet_weights"] = mined.triplet_weights[keep]
    return dataclasses.replace(mined, **changes) if changes else mined


def _concatenate(mined: Mined, extra: Mined | tuple) -> Mined:
    """Append ``extra`` to ``mined`` in ``mined``'s form (pairs or triplets), as pytorch-metric-learning does.

    Pairs given as masks are listed first (the appended tuples may repeat mined pairs, which a mask cannot hold).
    """
    extra = extra if isinstance(extra, Mined) else Mined.from_tuple(tuple(extra))
    if mined.has_triplets:
        a, p, n, w = mined.as_triplets()
        xa, xp, xn, xw = extra.as_triplets()
        weights = _cat_weights(w, xw, len(a), len(xa), a)
        return dataclasses.replace(
            mined,
            triplets=(torch.cat([a, xa.to(a.device)]), torch.cat([p, xp.to(a.device)]), torch.cat([n, xn.to(a.device)])),
            triplet_weights=weights,
            triplet_mask=None,
        )
    a1, p, a2, n, pw, nw = mined.as_pairs()
    xa1, xp, xa2, xn, xpw, xnw = extra.as_pairs()
    return dataclasses.replace(
        mined,
        pos_pairs=(torch.cat([a1, xa1.to(a1.device)]), torch.cat([p, xp.to(a1.device)])),
        neg_pairs=(torch.cat([a2, xa2.to(a2.device)]), torch.cat([n, xn.to(a2.device)])),
        pos_weights=_cat_weights(pw, xpw, len(a1), len(xa1), a1),
        neg_weights=_cat_weights(nw, xnw, len(a2), len(xa2), a2),
        pos_mask=None,
        neg_mask=None,
    )


def _cat_weights(w: Optional[Tensor], xw: Optional[Tensor], n: int, xn: int, like: Tensor) -> Optional[Tensor]:
    if w is None and xw is None:
        return None
    w = torch.ones(n, device=like.device) if w is None else w
    xw = torch.ones(xn, device=like.device, dtype=w.dtype) if xw is None else xw.to(w.device)
    return torch.cat([w, xw.to(w.dtype)])
