"""``HardnessMonitor``: how hard the mined tuples are over training.

For each training batch it measures the cosine similarity of every mined anchor-positive and
anchor-negative pair. Distributions of this kind are how Wu et al., "Sampling Matters in Deep
Embedding Learning" (ICCV 2017, Sec. 3, Fig. 2-3) compare mining strategies: a miner that keeps only
negatives far more similar to the anchor than its positives (very hard) trains differently from one
whose negatives are spread over the whole range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from contracts.mined import Mined
from contracts.relevance import all_pairs
from experiments.atomic import atomic_write_json
from experiments.callbacks.rank_log_dir import rank_log_dir

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def pair_similarities(emb: Tensor, mined: Mined, ref_emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cosine similarities of the mined pairs: ``(s(a, p) [P], s(a, n) [N])``.

    Args:
        emb: ``[B, D]`` anchors' embeddings.
        mined: tuples into ``ref_emb``; triplets count as one ``(a, p)`` and one ``(a, n)`` pair
            (``Mined.as_pairs``). Per-tuple weights are ignored.
        ref_emb: ``[M, D]`` reference embeddings; default ``emb``.
    """
    ref_emb = emb if ref_emb is None else ref_emb
    q = torch.nn.functional.normalize(emb.detach().float(), dim=1)
    r = q if ref_emb is emb else torch.nn.functional.normalize(ref_emb.detach().float(), dim=1)
    a1, p, a2, n = mined.as_pairs()[:4]
    return (q[a1] * r[p]).sum(dim=1), (q[a2] * r[n]).sum(dim=1)


def summarize(values: Tensor) -> dict[str, float] | None:
    """Count, mean and the 5/25/50/75/95 % quantiles of ``values [N]`` (``None`` if empty)."""
    if values.numel() == 0:
        return None
    ordered = values.sort().values
    last = ordered.numel() - 1
    out = {"n": int(ordered.numel()), "mean": float(ordered.mean())}
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = float(ordered[int(round(q * last))])
    return out


class HardnessMonitor(L.Callback):
    """Similarity distributions of the mined anchor-positive and anchor-negative pairs, over training.

    After a training batch it reads the training step's outputs (``outputs``: the dict of
    ``lightning_modules.step.EmbeddingStep``, which ``training_step`` returns): the embeddings the
    miner saw ``emb``, the reference set ``ref_emb`` (None: ``emb`` itself), ``labels`` and ``mined``
    (``None`` means the loss used every valid pair by labels, which is what is measured then),
    computes the cosine similarities of the pairs
    (``pair_similarities``) and keeps, per measured step, their count, mean and quantiles, and per
    epoch, a histogram on ``[-1, 1]``. It logs ``hardness/ap_mean`` and ``hardness/an_mean`` and
    writes everything atomically to ``<log_dir>/hardness.json`` at every epoch end. The history is
    part of the checkpoint, so a resumed run continues it exactly.

    Cosine similarity is used whatever distance the miner uses, so that runs are comparable.

    Args:
        bins: number of histogram bins on ``[-1, 1]``.
        every_n_steps: measure every n-th training batch.
    """

    def __init__(self, bins: int = 40, every_n_steps: int = 1) -> None:
        if bins < 1 or every_n_steps < 1:
            raise ValueError(f"HardnessMonitor: bins ({bins}) and every_n_steps ({every_n_steps}) must be >= 1")
        self.bins = bins
        self.every_n_steps = every_n_steps
        self.steps: list[dict[str, Any]] = []
        self.histograms: dict[int, dict[str, list[int]]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.every_n_steps:
            return
        if not isinstance(outputs, dict) or outputs.get("emb") is None:
            raise TypeError(
                f"HardnessMonitor reads the training step's outputs dict (emb, ref_emb, labels, mined: "
                f"lightning_modules.step.EmbeddingStep); {type(pl_module).__name__}.training_step returned {type(outputs).__name__}"
            )
        emb, ref_emb, mined = outputs["emb"], outputs.get("ref_emb"), outputs.get("mined")
        if mined is None:
            pos, ign, labels = outputs.get("pos_mask"), outputs.get("ignore_mask"), outputs.get("labels")
            if pos is not None:  # a two-view loss (CLIP, InfoNCE over documents) scores every valid pair of its masks
                ign = torch.zeros_like(pos) if ign is None else ign
                mined = Mined.from_masks(pos & ~ign, ~pos & ~ign)
            elif labels is not None:
                mined = all_pairs(labels, labels, same_set=True)
            else:
                return
        ap, an = pair_similarities(emb, mined, ref_emb)
        record = {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch), "ap": summarize(ap), "an": summarize(an)}
        self.steps.append(record)
        hist = self.histograms.setdefault(int(trainer.current_epoch), {"ap": [0] * self.bins, "an": [0] * self.bins})
        for kind, values in (("ap", ap), ("an", an)):
            counts = torch.histc(values.clamp(-1.0, 1.0).cpu(), bins=self.bins, min=-1.0, max=1.0)
            hist[kind] = [int(a + b) for a, b in zip(hist[kind], counts.tolist())]
            if record[kind] is not None:
                pl_module.log(f"hardness/{kind}_mean", record[kind]["mean"], batch_size=len(emb))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)

    def write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        log_dir = rank_log_dir(trainer)  # not trainer.log_dir: a collective, and this runs on rank 0 only
        if log_dir:
            atomic_write_json(Path(log_dir) / "hardness.json", self.history())

    def history(self) -> dict[str, Any]:
        edges = torch.linspace(-1.0, 1.0, self.bins + 1).tolist()
        return {
            "similarity": "cosine",
            "bin_edges": edges,
            "every_n_steps": self.every_n_steps,
            "steps": self.steps,
            "epochs": [{"epoch": e, **h} for e, h in sorted(self.histograms.items())],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "histograms": {str(e): h for e, h in self.histograms.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
        self.histograms = {int(e): h for e, h in state_dict.get("histograms", {}).items()}
