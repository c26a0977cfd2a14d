"""One distance per run: ``MetricLearningModule(distance=...)`` reaches miner, loss, mixer and memory;
a miner/loss disagreement that changes what is mined is an error (or a warning when allowed)."""

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from contracts.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from lightning_modules import MetricLearningModule
from losses import (
    CircleLoss,
    ContrastiveLoss,
    DistanceMismatchWarning,
    Metrix,
    MultiSimilarityLoss,
    NTXentLoss,
    TripletMarginLoss,
)
from losses.shared_distance import same_order
from miners import (
    BatchEasyHardMiner,
    BatchHardMiner,
    CrossBatchMemory,
    DistanceWeightedMiner,
    HardNegativeTopKMiner,
    MultiSimilarityMiner,
    PairMarginMiner,
    TripletMarginMiner,
)
from tests.helpers import TinyEncoder

ROOT = Path(__file__).resolve().parents[2]


def module(**kwargs):
    return MetricLearningModule(encoder=TinyEncoder(), **kwargs)


def test_quickstart_mismatch_is_silent_only_because_batch_hard_ranks():
    """BatchHard (L2) + MultiSimilarityLoss (cosine), the quickstart grid's cell: same tuples, no report."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(miner=BatchHardMiner(), loss=MultiSimilarityLoss())
    emb, labels = torch.randn(32, 8), torch.arange(32) % 4
    l2 = BatchHardMiner()(emb, labels)
    cos = BatchHardMiner(distance=CosineSimilarity())(emb, labels)
    assert all(torch.equal(x, y) for x, y in zip(l2, cos))


@pytest.mark.parametrize(
    "miner, loss",
    [
        (MultiSimilarityMiner(), TripletMarginLoss()),  # epsilon in cosine units, margin in L2 units
        (TripletMarginMiner(margin=0.2), MultiSimilarityLoss()),
        (PairMarginMiner(), NTXentLoss()),
        (DistanceWeightedMiner(), CircleLoss()),
        (HardNegativeTopKMiner(k=3, margin=0.1), MultiSimilarityLoss()),  # a value filter: not ranking-only
        (BatchHardMiner(distance=LpDistance(normalize_embeddings=False)), MultiSimilarityLoss()),  # other order
    ],
)
def test_mismatch_that_changes_mining_raises_naming_both(miner, loss):
    with pytest.raises(ValueError) as info:
        module(miner=miner, loss=loss)
    message = str(info.value)
    assert type(miner).__name__ in message and type(loss).__name__ in message
    assert type(miner.distance).__name__ in message and type(loss.distance).__name__ in message
    assert "--model.init_args.distance" in message


def test_allowed_mismatch_warns():
    with pytest.warns(DistanceMismatchWarning, match="MultiSimilarityMiner mines with CosineSimilarity"):
        module(miner=MultiSimilarityMiner(), loss=TripletMarginLoss(), allow_distance_mismatch=True)


@pytest.mark.parametrize("distance", [CosineSimilarity(), LpDistance()])
def test_shared_distance_reaches_miner_loss_mixer_and_memory(distance):
    miner, loss, mixer = MultiSimilarityMiner(), TripletMarginLoss(), Metrix(mode="embedding", miner=BatchHardMiner())
    module(miner=miner, loss=loss, mixer=mixer, distance=distance)
    assert miner.distance is distance and loss.distance is distance
    assert mixer.distance is distance and mixer.miner.distance is distance
    inner_loss, inner_miner = ContrastiveLoss(), BatchHardMiner()
    memory = CrossBatchMemory(inner_loss, embedding_size=8, memory_size=64, miner=inner_miner)
    module(loss=memory, distance=distance)
    assert inner_loss.distance is distance and inner_miner.distance is distance


def test_shared_distance_conflicting_with_an_explicit_one_raises():
    with pytest.raises(ValueError, match="two distances configured"):
        module(miner=BatchHardMiner(distance=LpDistance()), loss=TripletMarginLoss(), distance=CosineSimilarity())
    module(miner=BatchHardMiner(distance=CosineSimilarity()), loss=TripletMarginLoss(), distance=CosineSimilarity())


def test_shared_distance_a_component_cannot_use_raises_its_own_error():
    with pytest.raises(ValueError, match="DistanceWeightedMiner needs LpDistance"):
        module(miner=DistanceWeightedMiner(), loss=MultiSimilarityLoss(), distance=CosineSimilarity())
    with pytest.raises(ValueError, match="CircleLoss needs distance=CosineSimilarity"):
        module(loss=CircleLoss(), distance=LpDistance())


def test_shared_distance_lets_the_loss_reuse_the_miners_matrix():
    distance = CosineSimilarity()
    miner, loss = BatchHardMiner(), MultiSimilarityLoss()
    module(miner=miner, loss=loss, distance=distance)
    emb, labels = torch.randn(16, 8, requires_grad=True), torch.arange(16) % 4
    mined = miner(emb, labels)
    assert mined.matrices and mined.matrices[0].signature == loss.distance.signature()


def test_same_order_rules():
    assert same_order(LpDistance(), CosineSimilarity())
    assert same_order(LpDistance(power=2), CosineSimilarity())
    assert not same_order(LpDistance(normalize_embeddings=False), CosineSimilarity())
    assert not same_order(DotProductSimilarity(), CosineSimilarity())
    assert not same_order(CosineSimilarity(power=2), LpDistance())
    assert BatchEasyHardMiner().ranking_only and not BatchEasyHardMiner(allowed_neg_range=(0, 1)).ranking_only


def fragment_distance(path: Path):
    model = yaml.safe_load(path.read_text()).get("model") or {}
    return (model.get("distance") or {}).get("class_path")


def test_every_loss_fragment_states_the_run_distance_and_no_miner_fragment_does():
    """Loss fragments set model.distance (their hyper-parameters are in its units); miner fragments
    follow it, so any --config order of one miner and one loss gives one distance."""
    for path in sorted((ROOT / "experiments" / "loss").glob("*.yaml")):
        assert fragment_distance(path), f"{path.name} does not set model.distance"
    for path in sorted((ROOT / "experiments" / "miner").glob("*.yaml")):
        assert fragment_distance(path) is None, f"{path.name} sets model.distance; the loss fragment owns it"


def build_model(*configs: Path):
    """The model LightningCLI builds from ``configs`` on the digits base (no fit: ``run=False``)."""
    import lightning as L

    from experiments.cli_help import HardnegArgumentParser
    from experiments.lightning_cli import HardnegCLI

    args = []
    for c in (ROOT / "tests" / "configs" / "digits_tiny.yaml", *configs):
        args += ["--config", str(c)]
    cli = HardnegCLI(
        parser_class=HardnegArgumentParser, model_class=L.LightningModule, datamodule_class=L.LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False, run=False, args=args,
    )
    return cli.model


@pytest.mark.parametrize("order", ["miner_first", "loss_first"])
@pytest.mark.parametrize("miner_yaml", ["batch_hard", "multi_similarity"])
@pytest.mark.parametrize("loss_yaml", ["triplet_margin", "multi_similarity"])
def test_quickstart_grid_fragments_compose_without_warnings(miner_yaml, loss_yaml, order):
    """The quickstart grid's miner x loss cells, built by the CLI in either --config order, share the
    loss fragment's distance and construct without error or distance warning."""
    fragments = [ROOT / "experiments" / "miner" / f"{miner_yaml}.yaml", ROOT / "experiments" / "loss" / f"{loss_yaml}.yaml"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DistanceMismatchWarning)
        model = build_model(*(fragments if order == "miner_first" else fragments[::-1]))
    assert model.miner.distance is model.loss.distance
    assert type(model.loss.distance).__name__ == fragment_distance(fragments[1]).rsplit(".", 1)[-1]
