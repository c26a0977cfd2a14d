"""``BaseLoss``: the template every loss follows (validate -> ``compute_loss()`` -> scalar)."""

from __future__ import annotations

from torch import Tensor, nn

from contracts.distances import BaseDistance, LpDistance
from contracts.inputs import Inputs, resolve_inputs
from contracts.mined import Mined
from losses.mixing import append_mix_pairs
from losses.reducers import BaseReducer, LossPart, reduce_parts


class BaseLoss(nn.Module):
    """A loss over embeddings, optionally restricted to mined tuples.

    ``loss(emb, labels, mined=None, ref_emb=None, ref_labels=None, *, pos_mask=None, ignore_mask=None)``
    returns a scalar tensor. Relevance is ``labels`` (the shorthand) or ``pos_mask: [B, M]`` bool in
    their place, with an optional ``ignore_mask: [B, M]`` of pairs that are neither positive nor
    negative (``contracts.inputs.resolve_inputs``); ``compute_loss`` reads the masks through
    ``contracts.relevance`` and so works with both.
    ``mined=None`` means every valid tuple; a ``Mined`` (or a pytorch-metric-learning indices
    tuple) restricts the loss to those tuples and supplies per-tuple weights. Subclasses implement
    ``compute_loss(inputs, mined)`` and convert ``mined`` with ``mined.as_pairs()`` /
    ``mined.as_triplets()``, so any miner feeds any loss. While ``compute_loss`` runs, ``self.distance``
    returns the miner's matrix (``Mined.matrices``) when asked for the same one, so a loss after a
    miner runs the ``B x M`` matmul backward only.

    Class attributes a subclass sets to declare what it can take (checked here, so an
    incompatible pairing fails loudly instead of silently ignoring part of the input):
        supports_ref_emb: False for losses that cannot use a separate reference set (proxies).
        accepts_mix: True for losses that use the synthetic points of ``Mined.mix`` (see ``apply_mix``).
        needs_class_labels: why the loss needs class ids (proxies or parameters per class), or None;
            such a loss refuses ``pos_mask`` without labels with that reason.

    Reduction (``losses.reducers``): ``reducer=None`` reduces as the loss's pytorch-metric-learning
    counterpart does by default, on the loss's own fused path. A reducer (``MeanReducer``,
    ``AvgNonZeroReducer``, ``ThresholdReducer(low, high)``, ``PerAnchorReducer``, ``SumReducer``,
    ``DoNothingReducer``, ``MultipleReducers``) is applied to the per-tuple losses the subclass
    lists in ``tuple_losses`` (PML's ``loss_dict``); a loss that does not implement it refuses a reducer.

    Args:
        distance: shared with the miner; ``default_distance()`` when omitted (``distance_given``
            records which, so that ``MetricLearningModule(distance=...)`` replaces defaults only).
        reducer: how per-tuple losses become a scalar; ``None``: the loss's default (see its docstring).
    """

    supports_ref_emb: bool = True
    accepts_mix: bool = False
    needs_class_labels: str | None = None

    def __init__(self, distance: BaseDistance | None = None, reducer: BaseReducer | None = None) -> None:
        super().__init__()
        self.distance_given = distance is not None
        self.distance = distance if distance is not None else self.default_distance()
        self.check_distance(self.distance)
        if reducer is not None and type(self).tuple_losses is BaseLoss.tuple_losses:
            raise ValueError(
                f"{type(self).__name__} does not take a reducer: its reduction is fixed (see its docstring); "
                f"reducers work with losses that list per-tuple losses (BaseLoss.tuple_losses)"
            )
        self.reducer = reducer

    def check_distance(self, distance: BaseDistance) -> None:
        """Raise ``ValueError`` if this loss cannot work with ``distance`` (default: any distance works)."""

    def default_distance(self) -> BaseDistance:
        return LpDistance(normalize_embeddings=True)

    def forward(
        self,
        emb: Tensor,
        labels: Tensor | None = None,
        mined: Mined | tuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Tensor:
        who = type(self).__name__
        if labels is None and pos_mask is not None and self.needs_class_labels:
            raise ValueError(f"{who} needs class labels, not pos_mask: {self.needs_class_labels}")
        inputs = resolve_inputs(emb, labels, ref_emb, ref_labels, who=who, pos_mask=pos_mask, ignore_mask=ignore_mask)
        if mined is not None and not isinstance(mined, Mined):
            mined = Mined.from_tuple(tuple(mined))
        if not inputs.same_set and not self.supports_ref_emb:
            raise ValueError(f"{type(self).__name__} cannot take ref_emb/ref_labels (a separate reference set or memory)")
        if mined is not None:
            mined.validate(len(inputs.emb), len(inputs.ref_emb))
            if mined.mix is not None:
                if not self.accepts_mix:
                    raise ValueError(
                        f"{type(self).__name__} does not use synthetic points, but the miner returned a Mined.mix spec; "
                        f"pair this miner with a loss that sets accepts_mix = True"
                    )
                inputs, mined = self.apply_mix(inputs, mined)
        compute = self.compute_loss if self.reducer is None else self._reduced_loss
        if mined is not None and mined.matrices:
            with self.distance.reusing(mined.matrices):
                return compute(inputs, mined)
        return compute(inputs, mined)

    def _reduced_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor | dict:
        parts = self.tuple_losses(inputs, mined)
        out = reduce_parts(self.reducer, parts, len(inputs.emb), len(inputs.ref_emb), self.zero_loss(inputs))
        return out if isinstance(out, dict) else out.to(inputs.emb.dtype)

    def tuple_losses(self, inputs: Inputs, mined: Mined | None) -> dict[str, LossPart]:
        """The per-tuple losses a reducer reduces, by part name (PML's sub-loss names: ``"loss"``,
        ``"pos_loss"``/``"neg_loss"``), weights already applied. Only called when a reducer is given."""
        raise NotImplementedError

    def apply_mix(self, inputs: Inputs, mined: Mined) -> tuple[Inputs, Mined]:
        """Hand the synthetic points of ``mined.mix`` to ``compute_loss`` (only for ``accepts_mix`` losses).

        Default: the points join the reference set as a positive pair weighted by their soft label and
        a negative pair weighted by one minus it (``losses.mixing.append_mix_pairs``), which any loss
        that multiplies each pair's term by its weight turns into the Metrix / MoCHi form. A loss that
        takes them another way (over classes: Proxy-Anchor) overrides this and reads ``mined.mix`` itself.
        """
        return append_mix_pairs(inputs, mined)

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def zero_loss(inputs: Inputs) -> Tensor:
        """A zero that keeps the graph, so ``backward()`` gives zero gradients rather than failing."""
        zero = inputs.emb.sum() * 0
        return zero if inputs.same_set else zero + inputs.ref_emb.sum() * 0
