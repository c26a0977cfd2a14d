"""``EmbeddingStep``: the one training step every regime shares.

embed (the module) -> **gather across ranks** -> **memory** -> **mine** -> **loss** -> outputs.

A LightningModule embeds its batch (one or more views: anchor/reference, query/document,
image/text) and hands the per-rank embeddings and their relevance to this step; the step owns
everything after the encoders, so a regime is its encoders plus a configuration of this step.
It lives in ``lightning_modules/`` because it is the body of every ``training_step`` and uses
miners, losses and memory together (which ``contracts`` may not import); it is an ``nn.Module`` so
the loss, miner and memory it holds are the module's parameters and buffers (checkpointed, moved
to the device, optimised).

Gather modes (``gather``), both equal to one process on the global batch in loss and gradients:

- ``"global"``: every rank gathers all ranks' queries and references **with gradient** and computes
  the same loss on the global batch. ``contracts.gather.all_gather_with_grad`` sums the gathered
  tensor's gradient over ranks in backward, so each rank's slice receives ``W`` times its true
  gradient and DDP's averaging over the ``W`` ranks cancels that factor.
- ``"local"``: open_clip's ``local_loss``: this rank's queries against the global reference set,
  ``O(B_local x B_global)`` per rank. This rank's own rows sit at offset ``sum(B_r, r < rank)`` of the
  gathered references; for a single view (queries are the references) those self-pairs are ignored.
  The per-rank loss ``L_r`` (a mean over this rank's rows) is scaled by ``W * B_local / B_global``:
  the mean over ranks of the scaled losses is then the global mean over rows, and since the gather's
  backward sums every rank's gradient into the slice that produced it, DDP's average of the
  parameter gradients equals the gradient of the global loss. Exact for losses that are a mean of
  per-row terms with the same number of terms per row (InfoNCE / NT-Xent / CLIP with P x K or paired
  batches); a reducer that averages over a data-dependent count (non-zero triplets) is exact in
  ``"global"`` mode only. The returned loss *value* is the global one (all-reduced, detached),
  its gradient that of the scaled local loss.
- ``"none"``: per-rank loss on per-rank rows (MoCo's per-GPU keys; DDP averages).

Relevance: ``labels`` (same label = positive; the shorthand), or ``pos_mask`` / ``ignore_mask``
(bool ``[B, B_ref]`` against this rank's own references; pairs across ranks are negatives, or follow
the labels when both are given), or ids (``pos_ids`` with ``ref_ids``/``neg_ids``). The row itself
(single view) is always ignored. ``lightning_modules.step_relevance.StepRelevance`` turns them into
the masks of the rows the step scores. ``in_batch_negatives=False`` keeps only the memory's entries
as negatives (MoCo: the other keys of the batch are neither positives nor negatives).

Memory (``miners.memory.CrossBatchMemory`` used as a queue): its filled part is prepended to the
reference set, ``R = [memory; batch references]``; entries sharing a query's label are positives
(``memory_same_label="positive"``, XBM) or ignored (``"ignore"``, supervised MoCo); without labels
every entry is a negative. After the loss the references of all ranks are enqueued (detached).

Mixers (``mixer``): one with ``mix_spec(q, memory, labels, memory_labels)`` (``miners.MoCHi``) adds
synthetic negatives from the memory to the mined tuples; one with ``embed``/``forward``
(``losses.Metrix``) adds ``mixer(encoder, mix_state, emb, labels, loss)`` on this rank's rows.

Mixed precision: the encoders may run under autocast (bf16/fp16); the step casts the embeddings to
float32 and disables autocast, so distance matrices, logits and losses are computed in float32.

The returned dict is what ``training_step`` returns and what callbacks read in
``on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)``:

- ``loss``: scalar, with graph;
- ``emb [Q, D]``: the queries the miner saw (detached, float32; global batch in ``"global"`` mode);
- ``labels [Q]`` or None;
- ``ref_emb [M, D]`` / ``ref_labels [M]``: the reference set (None: the queries themselves);
- ``pos_mask`` / ``ignore_mask`` ``[Q, M]``: the relevance used (None on the labels-only path);
- ``mined``: the ``Mined`` the loss got (without distance matrices; None: all pairs by labels);
- ``mix_loss``: the mixer's added loss (Metrix) or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from contracts.dtypes import work_dtype
from contracts.gather import all_gather_no_grad, all_gather_with_grad, dist_ready, rank_sizes, rank_world
from contracts.mined import Mined
from lightning_modules.step_relevance import StepRelevance

GATHER_MODES = ("global", "local", "none")
MEMORY_SAME_LABEL = ("positive", "ignore")


class EmbeddingStep(nn.Module):
    """Gather -> memory -> mine -> loss on per-rank embeddings; returns the outputs dict (module docstring).

    Args:
        loss: ``loss(emb, labels, mined, ref_emb, ref_labels)`` (with ``pos_mask=``/``ignore_mask=``
            keywords when it takes them).
        miner: ``miner(emb, labels, ref_emb, ref_labels)`` -> ``Mined``; None: every valid pair.
        memory: a ``CrossBatchMemory`` used as a queue of references (``enqueue``/``filled``).
        mixer: MoCHi-like (``mix_spec``) or Metrix-like (``embed`` + ``forward``); see the module docstring.
        gather: "global", "local" or "none".
        in_batch_negatives: False: only memory entries are negatives (MoCo).
        memory_same_label: "positive" (XBM) or "ignore" (supervised MoCo) for memory entries sharing a label.
    """

    def __init__(
        self,
        loss: nn.Module,
        miner: nn.Module | None = None,
        memory: nn.Module | None = None,
        mixer: nn.Module | None = None,
        gather: str = "global",
        in_batch_negatives: bool = True,
        memory_same_label: str = "positive",
    ) -> None:
        super().__init__()
        if gather not in GATHER_MODES:
            raise ValueError(f"EmbeddingStep: gather={gather!r}; expected one of {GATHER_MODES}")
        if memory_same_label not in MEMORY_SAME_LABEL:
            raise ValueError(f"EmbeddingStep: memory_same_label={memory_same_label!r}; expected one of {MEMORY_SAME_LABEL}")
        if mixer is not None and hasattr(mixer, "mix_spec") and memory is None:
            raise ValueError(f"EmbeddingStep: {type(mixer).__name__} mixes from a memory (mix_spec); give the step a memory (MoCoModule)")
        self.loss, self.miner, self.memory, self.mixer = loss, miner, memory, mixer
        self.gather, self.in_batch_negatives, self.memory_same_label = gather, in_batch_negatives, memory_same_label

    # ------------------------------------------------------------------------------------ step
    def forward(
        self,
        emb: Tensor,
        ref_emb: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        ref_labels: Tensor | None = None,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
        neg_emb: Tensor | None = None,
        pos_ids: Tensor | None = None,
        ref_ids: Tensor | None = None,
        neg_ids: Tensor | None = None,
        loss_kwargs: dict[str, Any] | None = None,
        extra_ignore: Callable[[slice | None, Tensor, Tensor], Tensor] | None = None,
        encoder: nn.Module | None = None,
        mix_state: Any = None,
    ) -> dict[str, Any]:
        """``emb: [B, D]`` this rank's queries; ``ref_emb: [B_ref, D]`` its references (None: ``emb`` itself);
        ``neg_emb: [B_neg, D]`` extra references (hard negatives), gathered like ``ref_emb``.

        Relevance, one form: ``labels [B]`` / ``ref_labels [B_ref]``; and/or ``pos_mask`` /
        ``ignore_mask`` bool ``[B, B_ref]``; or ids: ``pos_ids [B, P]`` (each query's relevant
        document ids, ``-1`` padded) with ``ref_ids [B_ref]`` and ``neg_ids [B_neg]`` (``-1``: an
        empty slot, ignored), which decide relevance across ranks and against the memory too.
        ``loss_kwargs`` go to the loss (a two-view loss's ``logit_scale``/``logit_bias``);
        ``extra_ignore(q_rows, pos, ignore) -> [Q, R]`` bool adds pairs to ignore once the step knows
        which rows it scores (``q_rows``: this rank's slice of the gathered queries, None for all of
        them): a guide model's false negatives (``miners.GuidedFilter``);
        ``encoder`` and ``mix_state`` to a Metrix-like mixer. Returns the outputs dict."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self._step(
                emb, ref_emb, labels, ref_labels, pos_mask, ignore_mask, neg_emb, pos_ids, ref_ids, neg_ids, loss_kwargs or {}, extra_ignore, encoder,
                mix_state,
            )

    @property
    def two_view(self) -> bool:
        """The loss is a two-view loss (``losses.CLIPLoss``...): the step calls its ``directional``."""
        return bool(getattr(self.loss, "two_view", False))

    def _step(self, emb, ref_emb, labels, ref_labels, pos_mask, ignore_mask, neg_emb, pos_ids, ref_ids, neg_ids, loss_kwargs, extra_ignore, encoder, mix_state):
        # float32 distances, logits and losses whatever the encoders' autocast dtype (float64 stays)
        emb = emb.to(work_dtype(emb.dtype))
        ref_emb = None if ref_emb is None else ref_emb.to(work_dtype(ref_emb.dtype))
        neg_emb = None if neg_emb is None else neg_emb.to(work_dtype(neg_emb.dtype))
        self._check(emb, ref_emb, labels, ref_labels, pos_mask, ignore_mask, neg_emb, pos_ids, ref_ids, neg_ids)
        if ref_emb is None and ref_labels is None:
            ref_labels = labels
        local_emb, local_labels = emb, labels
        simple = (
            ref_emb is None and pos_mask is None and ignore_mask is None and self.memory is None and self.gather != "local" and not self.two_view
            and extra_ignore is None
        )
        if simple:
            out = self._labels_step(emb, labels)
        else:
            rel = StepRelevance(labels, ref_labels, pos_mask, ignore_mask, pos_ids, ref_ids, neg_ids)
            out = self._masks_step(emb, ref_emb, neg_emb, rel, loss_kwargs, extra_ignore)
        loss = out["loss"]
        out["mix_loss"] = None
        if self.mixer is not None and not hasattr(self.mixer, "mix_spec"):
            mix_loss = self.mixer(encoder, mix_state, local_emb, local_labels, self.loss)
            out["mix_loss"], loss = mix_loss.detach(), loss + mix_loss
        if self.gather == "local":
            loss = self._local_scale(loss, len(local_emb))
        out["loss"] = loss
        if self.memory is not None:
            refs = local_emb if ref_emb is None else ref_emb
            if ref_ids is not None:
                ref_l = ref_ids
            else:
                ref_l = ref_labels if ref_labels is not None else torch.zeros(len(refs), dtype=torch.long, device=refs.device)
            self.memory.enqueue(all_gather_no_grad(refs.detach()), all_gather_no_grad(ref_l.to(refs.device)))
        return out

    # ----------------------------------------------------------------------------- two paths
    def _labels_step(self, emb: Tensor, labels: Tensor) -> dict[str, Any]:
        """One view, labels, no memory: the loss on the (gathered) batch against itself."""
        if self.gather == "global":
            emb, labels = all_gather_with_grad(emb), all_gather_no_grad(labels)
        mined = self.miner(emb, labels) if self.miner is not None else None
        loss = self.loss(emb, labels, mined)
        return self._outputs(loss, emb, labels, None, None, None, None, mined)

    def _masks_step(self, emb, ref_emb, neg_emb, rel: StepRelevance, loss_kwargs, extra_ignore=None) -> dict[str, Any]:
        """Queries against ``[memory; references; negatives]`` with relevance as masks."""
        device = emb.device
        same = ref_emb is None
        refs = emb if same else ref_emb
        rank, _ = rank_world()
        mode = self.gather
        sizes = (lambda n: rank_sizes(n, device)) if mode != "none" else (lambda n: [n])
        q_sizes = sizes(len(emb))
        r_sizes = q_sizes if same else sizes(len(refs))
        n_sizes = None if neg_emb is None else sizes(len(neg_emb))
        gather = all_gather_with_grad if mode != "none" else (lambda x: x)
        batch_refs = gather(refs)
        queries = (batch_refs if same else gather(emb)) if mode == "global" else emb
        negs = None if neg_emb is None else gather(neg_emb)
        # this rank's query rows within the gathered queries ("global": all of them)
        q_rows = None if mode == "global" else slice(sum(q_sizes[:rank]), sum(q_sizes[: rank + 1])) if mode == "local" else slice(0, len(emb))
        r_own = slice(sum(r_sizes[:rank]), sum(r_sizes[: rank + 1])) if mode != "none" else slice(0, len(refs))
        pos, ign = rel.forward_masks(self, q_sizes, r_sizes, n_sizes, q_rows, r_own, same, device)
        if extra_ignore is not None:
            extra = extra_ignore(q_rows, pos, ign)
            if tuple(extra.shape) != tuple(pos.shape):
                raise ValueError(f"EmbeddingStep: extra_ignore gave {tuple(extra.shape)}; expected {tuple(pos.shape)} (scored queries x [references; negatives])")
            ign = ign | extra.to(ign.device).bool()
        if not self.in_batch_negatives:
            ign = ign | ~pos
        q_labels = rel.gathered_labels(self, "q", q_rows) if rel.labels is not None else None
        r_labels = rel.gathered_labels(self, "r", None) if rel.ref_labels is not None else None

        ref_all, ref_labels_all = batch_refs if negs is None else torch.cat([batch_refs, negs]), r_labels
        if r_labels is not None and negs is not None:
            ref_labels_all = torch.cat([r_labels, torch.full((len(negs),), -1, dtype=r_labels.dtype, device=device)])
        mem_emb = mem_labels = None
        if self.memory is not None and len(self.memory) > 0:
            mem_emb, mem_labels = self.memory.filled()
            # the buffer is overwritten in place by the next enqueue: keep a copy
            mem_emb, mem_labels = mem_emb.detach().clone().to(queries.dtype), mem_labels.clone().to(device)
            mem_pos, mem_ign = rel.memory_masks(self, q_rows, mem_labels, len(queries), device)
            pos, ign = torch.cat([mem_pos, pos], 1), torch.cat([mem_ign, ign], 1)
            ref_all = torch.cat([mem_emb, ref_all])
            mem_l = mem_labels if q_labels is not None else torch.full((len(mem_emb),), -1, dtype=torch.long, device=device)
            ref_labels_all = None if ref_labels_all is None else torch.cat([mem_l, ref_labels_all.to(device)])

        if self.two_view:
            loss = self.loss.directional(queries, ref_all, **loss_kwargs, pos_mask=pos, ignore_mask=ign)
            if getattr(self.loss, "symmetric", False):
                # the other direction: the paired references (not negatives, not the memory) against the queries
                back_q = batch_refs if mode == "global" else refs
                back_r = queries if mode == "global" else gather(emb)
                back_pos, back_ign = rel.backward_masks(self, q_sizes, r_sizes, r_own if mode != "global" else None, same, device)
                back = self.loss.directional(back_q, back_r, **loss_kwargs, pos_mask=back_pos, ignore_mask=back_ign)
                loss = 0.5 * (loss + back)
            mined = None
        else:
            mined = self._mine(queries, ref_all, pos, ign)
            if self.mixer is not None and hasattr(self.mixer, "mix_spec") and mem_emb is not None:
                use_labels = q_labels is not None and self.memory_same_label == "ignore"
                # a query mixes only its negatives among the memory's columns (they come first in pos/ign): by ids, the
                # hardest entries of a queue of documents include the query's own positives
                mem_cols = slice(0, len(mem_emb))
                candidates = ~pos[:, mem_cols] & ~ign[:, mem_cols]
                spec = self.mixer.mix_spec(queries, mem_emb, q_labels if use_labels else None, mem_labels if use_labels else None,
                                           candidates=candidates)
                if len(spec):
                    mined = dataclasses.replace(_listed_pairs(mined), mix=spec)
            loss = self.loss(queries, None, mined, ref_all, None, pos_mask=pos, ignore_mask=ign, **loss_kwargs)
        return self._outputs(loss, queries, q_labels, ref_all, ref_labels_all, pos, ign, mined)

    def _mine(self, queries, refs, pos, ign) -> Mined:
        """The miner's tuples (every valid pair without a miner); relevance reaches it as masks, the
        contract every miner follows (``miners.BaseMiner``)."""
        if self.miner is None:
            return Mined.from_masks(pos & ~ign, ~pos & ~ign)
        return self.miner(queries, None, refs, None, pos_mask=pos, ignore_mask=ign)

    # ---------------------------------------------------------------------------------- misc
    @staticmethod
    def _local_scale(loss: Tensor, n_local: int) -> Tensor:
        """Scale this rank's loss by ``W * B_local / B_global``; its value becomes the global loss."""
        if not dist_ready():
            return loss
        sizes = rank_sizes(n_local, loss.device)
        scaled = loss * (len(sizes) * n_local / sum(sizes))
        total = scaled.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return scaled + (total / len(sizes) - scaled.detach())

    @staticmethod
    def _outputs(loss, emb, labels, ref_emb, ref_labels, pos, ign, mined) -> dict[str, Any]:
        return {
            "loss": loss,
            "emb": emb.detach(),
            "labels": None if labels is None else labels.detach(),
            "ref_emb": None if ref_emb is None else ref_emb.detach(),
            "ref_labels": None if ref_labels is None else ref_labels.detach(),
            "pos_mask": pos,
            "ignore_mask": ign,
            # without the miner's distance matrices: they hold the graph-free [B, M] matrices
            "mined": None if mined is None else mined.without_matrices(),
        }

    def _check(self, emb, ref_emb, labels, ref_labels, pos_mask, ignore_mask, neg_emb, pos_ids, ref_ids, neg_ids) -> None:
        if emb.dim() != 2:
            raise ValueError(f"EmbeddingStep: emb has shape {tuple(emb.shape)}; expected [B, D]")
        for name, x in (("ref_emb", ref_emb), ("neg_emb", neg_emb)):
            if x is not None and (x.dim() != 2 or x.shape[1] != emb.shape[1]):
                raise ValueError(f"EmbeddingStep: {name} has shape {tuple(x.shape)}; expected [N, {emb.shape[1]}]")
        n_ref = len(emb) if ref_emb is None else len(ref_emb)
        for name, mask in (("pos_mask", pos_mask), ("ignore_mask", ignore_mask)):
            if mask is not None and tuple(mask.shape) != (len(emb), n_ref):
                raise ValueError(f"EmbeddingStep: {name} has shape {tuple(mask.shape)}; expected [{len(emb)}, {n_ref}] (queries x this rank's references)")
        if labels is not None and len(labels) != len(emb):
            raise ValueError(f"EmbeddingStep: {len(labels)} labels for {len(emb)} embeddings")
        if ref_labels is not None and len(ref_labels) != n_ref:
            raise ValueError(f"EmbeddingStep: {len(ref_labels)} ref_labels for {n_ref} references")
        if neg_emb is not None and ref_emb is None:
            raise ValueError("EmbeddingStep: neg_emb (extra negatives) needs ref_emb (the queries' paired references)")
        if pos_ids is not None:
            if labels is not None or pos_mask is not None or ignore_mask is not None:
                raise ValueError("EmbeddingStep: give relevance in one form: ids (pos_ids/ref_ids/neg_ids), or labels and/or masks")
            if ref_emb is None or ref_ids is None:
                raise ValueError("EmbeddingStep: pos_ids needs ref_emb and ref_ids (the id of each reference)")
            if pos_ids.dim() != 2 or len(pos_ids) != len(emb):
                raise ValueError(f"EmbeddingStep: pos_ids has shape {tuple(pos_ids.shape)}; expected [{len(emb)}, P] (-1 padded)")
            if tuple(ref_ids.shape) != (n_ref,):
                raise ValueError(f"EmbeddingStep: ref_ids has shape {tuple(ref_ids.shape)}; expected [{n_ref}]")
            if neg_emb is not None and (neg_ids is None or tuple(neg_ids.shape) != (len(neg_emb),)):
                raise ValueError(f"EmbeddingStep: neg_emb needs neg_ids of shape [{len(neg_emb)}] (-1: an empty slot)")
        elif ref_ids is not None or neg_ids is not None:
            raise ValueError("EmbeddingStep: ref_ids/neg_ids need pos_ids (each query's relevant ids)")
        elif labels is None and pos_mask is None:
            raise ValueError("EmbeddingStep: no relevance: give labels or a pos_mask (or pos_ids with ref_ids)")
        if self.two_view and self.miner is not None:
            raise ValueError(f"EmbeddingStep: {type(self.loss).__name__} is a two-view loss (it scores every pair itself); it takes no miner")
        if self.two_view and self.mixer is not None and hasattr(self.mixer, "mix_spec"):
            raise ValueError(f"EmbeddingStep: {type(self.mixer).__name__} adds synthetic negatives to mined tuples, which the two-view loss "
                             f"{type(self.loss).__name__} does not take; use a loss that reads Mined.mix (accepts_mix, e.g. NTXentLoss) or drop the mixer")


def _listed_pairs(mined: Mined) -> Mined:
    """Pairs as index lists (what a ``MixSpec`` is appended to)."""
    if not mined.has_masks:
        return mined
    a1, p, a2, n, pw, nw = mined.as_pairs()
    return Mined.from_pairs(a1, p, a2, n, pw, nw)
