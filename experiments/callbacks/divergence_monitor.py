"""``DivergenceMonitor``: a diverged run is reported, not hidden.

Two failures otherwise go unnoticed or are reported too late:

- **Embedding collapse.** With a learning rate far too high (Adam at ``lr=1e6`` on the quickstart),
  every image maps to the same direction: the loss sits at the margin, Recall@1 is at chance, and the
  run still exits 0. The monitor measures, on the batch the miner saw, how much room the
  L2-normalised embeddings take on the sphere, and warns once per collapse episode, naming the step.
- **Non-finite loss or gradients.** A NaN loss is stopped *before* the optimizer applies it, with a
  message that names the step and the likely causes; the weights and the last checkpoint are those
  of the last good step.

It is one of the default callbacks of every ``hardneg fit`` run (``HardnegCLI``); configure a
``DivergenceMonitor`` yourself to change its thresholds (``min_spread: 0`` turns the collapse
check off).
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from experiments.callbacks.hardness_monitor import pair_similarities


class DivergenceError(RuntimeError):
    """The training loss or its gradients became non-finite; the optimizer did not apply them."""


class EmbeddingCollapseWarning(UserWarning):
    """The embeddings of a training batch collapsed onto (almost) one point of the sphere."""


def embedding_spread(emb: Tensor) -> tuple[Tensor, Tensor]:
    """How much of the unit sphere a batch of embeddings occupies: ``(spread, effective_rank)``.

    ``spread = 1 - ||mean_i q_i||^2`` for the L2-normalised rows ``q_i`` of ``emb [B, D]``: the mean
    squared distance of the ``q_i`` to their centroid (the trace of their covariance). It is 0 when
    all rows point the same way, and equals ``(B - 1) / B * (1 - mean pairwise cosine)``.

    ``effective_rank`` is Roy & Vetterli's effective rank ("The effective rank: a measure of effective
    dimensionality", EUSIPCO 2007), ``exp(H(p))`` with ``p_k = sigma_k / sum sigma`` the normalised
    singular values of the centred ``q``: how many directions the spread is shared among, 1 to
    ``min(B - 1, D)``. It is scale-free, so it describes the shape of the spread, not its size.
    """
    q = torch.nn.functional.normalize(emb.detach().float(), dim=1)
    mean = q.mean(dim=0)
    spread = (1.0 - mean.pow(2).sum()).clamp_min(0.0)
    centred = (q - mean).double()
    # Eigenvalues of the smaller Gram matrix are the squared singular values, at a fraction of the
    # cost of an SVD; float64 and the relative floor keep round-off out of the entropy.
    gram = centred.T @ centred if centred.shape[0] > centred.shape[1] else centred @ centred.T
    eig = torch.linalg.eigvalsh(gram)
    sigma = torch.where(eig > eig.max() * 1e-12, eig, torch.zeros_like(eig)).sqrt()
    total = sigma.sum()
    if total <= 0:
        return spread, torch.ones((), dtype=spread.dtype, device=spread.device)
    p = sigma / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return spread, entropy.exp().to(spread.dtype)


# Below this spread the directions differ by about float32 round-off: no shape is left to measure.
ROUND_OFF_SPREAD = 1e-8


def is_collapsed(spread: float, rank: float, batch: int, dim: int, min_spread: float, max_rank_fraction: float) -> bool:
    """Whether a batch with this ``embedding_spread`` has collapsed: it takes almost no room on the
    sphere (``spread < min_spread``) **and** that little room has lost its shape (effective rank below
    ``max_rank_fraction`` of the largest possible, ``min(B - 1, D)``), or is pure round-off.

    Both are needed: a run can shrink its embeddings into a small cap while keeping their structure
    (cosine retrieval does not see the scale): the quickstart does, measured in ``docs/divergence.md``.
    """
    if spread >= min_spread:
        return False
    return spread < ROUND_OFF_SPREAD or rank < max_rank_fraction * max(1, min(batch - 1, dim))


class DivergenceMonitor(L.Callback):
    """Warn when the embeddings collapse; stop before a non-finite loss or gradient is applied.

    **Collapse** (``on_train_batch_end``, every ``every_n_steps`` steps). It reads the batch the
    miner saw from the training step's outputs, ``emb``, ``ref_emb`` and ``mined`` (the dict of
    ``lightning_modules.step.EmbeddingStep``; gathered across ranks in its "global" mode, so every
    rank computes the same numbers and no collective is needed; outputs without ``emb`` are not
    checked), and logs

    - ``train/embedding_spread``: ``1 - ||mean q||^2`` of the L2-normalised embeddings
      (``embedding_spread``);
    - ``train/embedding_rank``: their effective rank (scale-free: the shape of the spread);
    - ``train/mined_ap_similarity``, ``train/mined_an_similarity``: mean cosine similarity of the
      mined anchor-positive and anchor-negative pairs (``hardness_monitor.pair_similarities``),
      for plots and for the warning's text.

    It warns (``EmbeddingCollapseWarning``, on rank zero) when the embeddings collapsed
    (``is_collapsed``): ``spread < min_spread`` and ``rank < max_rank_fraction * min(B - 1, D)``.
    It warns once per episode: after a warning it stays silent until a checked batch is healthy again.

    Thresholds, measured here (``docs/divergence.md``). The collapsed quickstart (EfficientNet-Lite0,
    Adam ``lr=1e6``) has, from its second step on, spread 1.6e-6 to 4.2e-6 and effective rank 4.5
    to 6.5 of 39 (0.11-0.17), with mined similarities 1 - 5e-6 and nearest-neighbour labels at
    chance. Healthy: the quickstart's Lite0 at init, spread 0.58, rank 33.8/39; the digits test run,
    spread 0.19 to 0.63, rank >= 10.4/16 (0.65); the digits MLPs at ``lr=1e6`` (tanh or ReLU, whose
    embeddings do not collapse) rank >= 7.8/16 (0.49). The quickstart itself (lr 3e-4, 60 steps)
    shrinks its embeddings into a small cap, spread 0.58 -> 4.0e-5, mined similarities up to
    1 - 2e-5, yet keeps its shape (rank >= 26.1/39, 0.67) and its test Recall@1: hence the rank
    condition; the mined similarities are logged but do not decide.

    **Non-finite loss** (``on_before_backward``) or **gradients** (``on_before_optimizer_step``,
    skipped when a mixed-precision ``GradScaler`` is in use, which skips such steps itself): every
    rank contributes its own verdict to one all-reduce, so all ranks stop together and none hangs in
    the next collective. It raises ``DivergenceError`` naming the step and the likely causes; the
    optimizer has not applied the step, and Lightning's checkpoint callbacks do not save on an
    exception (``save_on_exception=False``), so ``checkpoints/last.ckpt`` is the last good state.

    Args:
        min_spread: collapse threshold on ``train/embedding_spread``; 0 turns the collapse check off.
        max_rank_fraction: collapse threshold on ``train/embedding_rank / min(B - 1, D)``.
        every_n_steps: check the embeddings every n-th training step (the loss is checked every step).
            One check costs 0.2 ms at B=40, D=128 and 72 ms at B=2048, D=512 (one CPU thread, the
            eigenvalues of the smaller float64 Gram matrix); raise it for large batches on CPU.
        check_gradients: also stop on non-finite gradients of a finite loss.
    """

    def __init__(
        self, min_spread: float = 1e-4, max_rank_fraction: float = 0.3, every_n_steps: int = 1, check_gradients: bool = True
    ) -> None:
        if not 0.0 <= min_spread < 1.0 or not 0.0 <= max_rank_fraction <= 1.0 or every_n_steps < 1:
            raise ValueError(
                f"DivergenceMonitor: min_spread ({min_spread}) must be in [0, 1), max_rank_fraction "
                f"({max_rank_fraction}) in [0, 1] and every_n_steps ({every_n_steps}) >= 1"
            )
        self.min_spread = min_spread
        self.max_rank_fraction = max_rank_fraction
        self.every_n_steps = every_n_steps
        self.check_gradients = check_gradients
        self.collapsed = False
        self.recent_losses: deque[float] = deque(maxlen=5)

    # ------------------------------------------------------------------------------- hooks
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        value = loss.detach().float()
        finite = bool(torch.isfinite(value).all())
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            what = f"the training loss is {self._describe(value)}" if not finite else "the training loss is non-finite on another rank"
            raise DivergenceError(self._message(trainer, what))
        self.recent_losses.append(float(value))
        self._step_to_check = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the step of this batch (global_step has moved on after the optimizer step)
        step = getattr(self, "_step_to_check", trainer.global_step)
        if self.min_spread > 0 and step % self.every_n_steps == 0 and isinstance(outputs, dict):
            self._check_collapse(trainer, pl_module, outputs, step)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not self.check_gradients or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        norms = [p.grad.detach().float().norm() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(norms)).all()) if norms else True
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            what = "the loss is finite but its gradients are not" if not finite else "the gradients are non-finite on another rank"
            raise DivergenceError(self._message(trainer, what))

    # ---------------------------------------------------------------------------- collapse
    def _check_collapse(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict[str, Any], step: int) -> None:
        emb = outputs.get("emb")
        if emb is None or len(emb) < 2 or not bool(torch.isfinite(emb).all()):
            return  # non-finite embeddings make a non-finite loss, which stops the run above
        spread, rank = embedding_spread(emb)
        values = {"train/embedding_spread": spread, "train/embedding_rank": rank}
        mined = outputs.get("mined")
        if mined is not None and len(mined) > 0:
            ap, an = pair_similarities(emb, mined, outputs.get("ref_emb"))
            if ap.numel() and an.numel():
                values["train/mined_ap_similarity"], values["train/mined_an_similarity"] = ap.mean(), an.mean()
        numbers = dict(zip(values, torch.stack([v.float().cpu() for v in values.values()]).tolist()))
        for key, number in numbers.items():
            pl_module.log(key, number, batch_size=len(emb))
        spread, rank = numbers["train/embedding_spread"], numbers["train/embedding_rank"]
        collapsed = is_collapsed(spread, rank, len(emb), emb.shape[1], self.min_spread, self.max_rank_fraction)
        if collapsed and not self.collapsed:
            self._warn_collapse(trainer, numbers, len(emb), emb.shape[1], step)
        self.collapsed = collapsed

    @rank_zero_only
    def _warn_collapse(self, trainer: L.Trainer, numbers: dict[str, float], batch: int, dim: int, step: int) -> None:
        spread = numbers["train/embedding_spread"]
        mean_cos = 1.0 - spread * batch / (batch - 1)
        mined = ""
        if "train/mined_ap_similarity" in numbers:
            mined = (
                f"; mined pairs, mean cosine "
                f"s(a,p) {numbers['train/mined_ap_similarity']:.6f}, s(a,n) {numbers['train/mined_an_similarity']:.6f}"
            )
        warnings.warn(
            f"hardneg: the embeddings collapsed at global_step {step} (epoch {trainer.current_epoch}): "
            f"the batch's {batch} L2-normalised embeddings point almost the same way (train/embedding_spread "
            f"{spread:.2e} < min_spread {self.min_spread:g}, mean pairwise cosine {mean_cos:.6f}) and the little room "
            f"they take has lost its shape (train/embedding_rank {numbers['train/embedding_rank']:.1f} < "
            f"{self.max_rank_fraction * max(1, min(batch - 1, dim)):.1f} = {self.max_rank_fraction:g} x min(B - 1, D)){mined}. The loss "
            f"stays at its margin and retrieval falls to chance. Likely cause: a learning rate far too high "
            f"({self._lr_text(trainer)}); lower it and restart from a checkpoint taken before this step.",
            EmbeddingCollapseWarning,
        )

    # ----------------------------------------------------------------------------- messages
    @staticmethod
    def _describe(value: Tensor) -> str:
        return "nan" if bool(torch.isnan(value).any()) else "inf"

    @staticmethod
    def _lr_text(trainer: L.Trainer) -> str:
        lrs = [group.get("lr") for opt in trainer.optimizers for group in opt.param_groups if isinstance(group.get("lr"), (int, float))]
        return f"largest learning rate now {max(lrs):g}" if lrs else "learning rate unknown"

    def _message(self, trainer: L.Trainer, what: str) -> str:
        recent = ", ".join(f"{v:.4g}" for v in self.recent_losses)
        trend = f" Training loss at the last steps: {recent}." if recent else ""
        precision = str(trainer.precision)
        causes = [
            f"a learning rate too high ({self._lr_text(trainer)}; a loss that grew over the last steps points here)",
            "a loss term dividing by zero or taking log/sqrt of 0 (a zero embedding, an empty set of positives or negatives)",
        ]
        if "16" in precision and "bf16" not in precision:
            causes.insert(0, f"fp16 overflow (precision {precision}; try bf16-mixed or 32-true)")
        callback = trainer.checkpoint_callback
        ckpt = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        kept = ""
        if ckpt:
            step = getattr(callback, "_last_global_step_saved", None)
            at = f" (global_step {step})" if step is not None else ""
            kept = f" The last checkpoint, {ckpt}{at}, was not overwritten; resume from it with --ckpt_path after fixing the cause."
        return (
            f"{what} at global_step {trainer.global_step} (epoch {trainer.current_epoch}); training stopped before the "
            f"optimizer applied it.{trend} Likely causes: " + "; ".join(causes) + "." + kept
        )

    def state_dict(self) -> dict[str, Any]:
        return {"collapsed": self.collapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.collapsed = bool(state_dict.get("collapsed", False))
