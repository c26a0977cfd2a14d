"""``NGAMEMemoryBank``: keep the training step's embeddings per train point and hand them to NGAME's sampler.

Dahiya et al., "NGAME: Negative Mining-aware Mini-batching for Extreme Classification" (WSDM 2023):
the clusters that make NGAME's mini-batches can be computed on embeddings the training step
already produced during the previous epochs instead of a fresh encoding of the training set (the
paper's code re-encodes the training points unless it keeps such a ``memory_bank``), so
re-clustering costs no encoder pass, at the price of slightly stale embeddings. ``datamodules.ngame.NGAMEBatchSampler`` builds the batches; this callback fills the
bank and hands it over:

- ``on_train_batch_end`` reads the step's outputs (``lightning_modules.step``): ``outputs["emb"]``,
  the queries the step scored (detached; the global batch under ``gather="global"``, this rank's
  rows otherwise), and the batch's ``query_idx`` (their train rows). Under DDP the rows (and, when
  the step did not gather them, the embeddings) are gathered from every rank, so every rank writes
  the same rows with the same values and the banks stay identical without another exchange.
  A row never embedded keeps ``seen = False`` (the sampler places it at random); a row embedded
  again keeps its latest value.
- ``on_train_epoch_start``: when the sampler's epoch needs embeddings (a re-clustering epoch, or
  the cluster phase without clusters after a resume), ``sampler.set_embeddings(bank, seen)``; the
  sampler is found under ``trainer.train_dataloader.batch_sampler`` (the DataModule wraps it in an
  ``EpochBatchSampler``: the chain of ``batch_sampler`` attributes is followed).

``side="query"`` (default) clusters the train queries on their own embeddings: the training points
of NGAME's siamese stage, clustered on their own (document-side in XC terms) embeddings.
``side="positive"`` stores each query's positive document embedding instead (the rows of
``outputs["ref_emb"]`` that hold the batch's positives: after the memory queue, before the hard
negatives), NGAME's label-side view.

The bank (``[N, D]`` float32 on the CPU) and its ``seen`` mask are saved with the callback's state in
checkpoints, so a resumed run re-clusters from them.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from contracts.gather import all_gather_no_grad, dist_ready

SIDES = ("query", "positive")


def find_batch_sampler(trainer: L.Trainer, method: str = "set_embeddings") -> Any | None:
    """The train batch sampler that has ``method``, following ``batch_sampler`` attributes from
    ``trainer.train_dataloader`` (a DataLoader or a collection of them); None when there is none."""
    loaders = getattr(trainer, "train_dataloader", None)
    if loaders is None:
        return None
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    for loader in loaders:
        obj, visited = getattr(loader, "batch_sampler", None), set()
        while obj is not None and id(obj) not in visited:
            if callable(getattr(obj, method, None)):
                return obj
            visited.add(id(obj))
            obj = getattr(obj, "batch_sampler", None)
    return None


class NGAMEMemoryBank(L.Callback):
    """A memory bank of the step's embeddings per train point, handed to ``NGAMEBatchSampler`` (module docstring).

    Args:
        side: ``"query"`` (each train query's own embedding) or ``"positive"`` (its positive document's).
        index_key: the batch field with the train row of each item (``query_idx`` of the query/document contract).
        feed_sampler: hand the bank to the sampler (False: only keep it, e.g. a second bank of the other
            side for analysis; one bank per run feeds the sampler).

    Attributes:
        bank: ``[N, D]`` float32 on the CPU (None before the first batch). seen: ``[N]`` bool.
        sampler: the ``NGAMEBatchSampler`` found at train start (None without one: the bank still fills).
    """

    def __init__(self, side: Literal["query", "positive"] = "query", index_key: str = "query_idx", feed_sampler: bool = True) -> None:
        if side not in SIDES:
            raise ValueError(f"NGAMEMemoryBank: side={side!r}; expected one of {SIDES}")
        self.side, self.index_key, self.feed_sampler = side, index_key, feed_sampler
        self.bank: Tensor | None = None
        self.seen: Tensor | None = None
        self.sampler: Any | None = None

    # ----------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sampler = find_batch_sampler(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = self.sampler if self.sampler is not None else find_batch_sampler(trainer)
        self.sampler = sampler
        if not self.feed_sampler or sampler is None or not sampler.needs_embeddings(trainer.current_epoch):
            return
        if self.bank is None:
            raise RuntimeError(
                f"NGAMEMemoryBank: epoch {trainer.current_epoch} clusters the train points but the memory bank is empty "
                f"(no training batch was seen before it); start clustering after at least one epoch (warmup_epochs >= 1)"
            )
        sampler.set_embeddings(self.bank, self.seen)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        rows, values = self.rows_and_embeddings(pl_module, outputs, batch)
        self.store(rows, values, self._size(trainer))

    # --------------------------------------------------------------------------------- filling
    def rows_and_embeddings(self, pl_module: L.LightningModule, outputs: Any, batch: Any) -> tuple[Tensor, Tensor]:
        """``(rows [n], embeddings [n, D])`` of this step, the same on every rank (gathered under DDP)."""
        if not isinstance(outputs, dict) or "emb" not in outputs:
            raise TypeError(f"NGAMEMemoryBank reads the training step's outputs dict (lightning_modules.step: 'emb', 'ref_emb'); "
                            f"got {type(outputs).__name__}")
        if self.index_key not in batch:
            raise KeyError(f"NGAMEMemoryBank: the train batch has no {self.index_key!r} (the train row of each item); its keys: {sorted(batch)}")
        mode = getattr(getattr(pl_module, "step", None), "gather", "global")
        local_rows = batch[self.index_key].reshape(-1).long()
        device = outputs["emb"].device
        distributed = dist_ready()
        rows = all_gather_no_grad(local_rows.to(device)) if distributed else local_rows
        if self.side == "query":
            values, step_gathered = outputs["emb"], mode == "global"  # "local"/"none": this rank's queries only
        else:
            step_gathered = mode != "none"  # the step gathers the references in "global" and "local" mode
            values = self._positives(outputs, batch, len(rows) if step_gathered else len(local_rows), distributed and step_gathered, device)
        if distributed and not step_gathered:
            values = all_gather_no_grad(values)
        if len(values) != len(rows):
            raise ValueError(
                f"NGAMEMemoryBank: {len(values)} embeddings for {len(rows)} rows of {self.index_key!r} (step gather={mode!r}, "
                f"side={self.side!r}); the step's outputs do not line up with the batch's rows"
            )
        return rows.detach().cpu(), values.detach().float().cpu()

    def _positives(self, outputs: dict, batch: Any, n_pos: int, gathered: bool, device: torch.device) -> Tensor:
        """The batch's positive documents within ``outputs["ref_emb"] = [memory; positives; hard negatives]``."""
        ref = outputs.get("ref_emb")
        if ref is None:
            raise ValueError("NGAMEMemoryBank(side='positive') needs the step's ref_emb (a two-tower batch with the positive documents)")
        n_neg = batch["neg_idx"].numel() if "neg_idx" in batch and "neg_input_ids" in batch else 0
        if gathered:
            n_neg = int(all_gather_no_grad(torch.tensor([n_neg], device=device)).sum())
        end = len(ref) - n_neg
        if end - n_pos < 0:
            raise ValueError(f"NGAMEMemoryBank: ref_emb has {len(ref)} rows, fewer than the {n_pos} positives and {n_neg} negatives of the batch")
        return ref[end - n_pos : end]

    def store(self, rows: Tensor, values: Tensor, size: int) -> None:
        """Write ``values [n, D]`` at ``rows`` of the bank of ``size`` rows (allocated on first use)."""
        if self.bank is None:
            self.bank = torch.zeros(size, values.shape[1], dtype=torch.float32)
            self.seen = torch.zeros(size, dtype=torch.bool)
        if values.shape[1] != self.bank.shape[1]:
            raise ValueError(f"NGAMEMemoryBank: embeddings of width {values.shape[1]}, but the bank holds width {self.bank.shape[1]}")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self.bank)):
            raise ValueError(f"NGAMEMemoryBank: train rows {int(rows.min())}..{int(rows.max())} outside the bank of {len(self.bank)} train points")
        self.bank[rows] = values
        self.seen[rows] = True

    def _size(self, trainer: L.Trainer) -> int:
        if self.bank is not None:
            return len(self.bank)
        if self.sampler is not None and hasattr(self.sampler, "size"):
            return int(self.sampler.size)
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None)
        if dataset is None:
            raise ValueError("NGAMEMemoryBank: cannot tell the number of train points: no NGAMEBatchSampler and no datamodule.train_dataset")
        return len(dataset)

    # ------------------------------------------------------------------------------- checkpoint
    @property
    def state_key(self) -> str:
        return self._generate_state_key(side=self.side, index_key=self.index_key)

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "seen": self.seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bank, self.seen = state_dict.get("bank"), state_dict.get("seen")
