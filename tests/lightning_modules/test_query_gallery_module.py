"""``MetricLearningModule`` follows the DataModule's evaluation protocol: a tiny In-Shop run."""

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from datamodules import CUB200DataModule, InShopDataModule
from lightning_modules.metric_learning_module import MetricLearningModule
from lightning_modules.metrics import QueryGalleryRetrievalMetrics, RetrievalMetrics, retrieval_metrics
from losses import ContrastiveLoss
from tests.datamodules.miniature import make_cub, make_inshop

SIZE = 16


class PixelEncoder(nn.Module):
    """A fixed random projection of the pixels: embeddings differ per image, no training needed."""

    def __init__(self) -> None:
        super().__init__()
        self.data_config = {"input_size": (3, SIZE, SIZE), "crop_pct": 1.0, "interpolation": "bilinear"}
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def embed(encoder: nn.Module, dataset) -> tuple[torch.Tensor, np.ndarray]:
    with torch.no_grad():
        x = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        return encoder(x), np.asarray(dataset.labels)


def test_query_gallery_protocol_end_to_end(tmp_path):
    dm = InShopDataModule(**make_inshop(tmp_path), image_size=SIZE, num_workers=0, eval_batch_size=6, augment=False)
    module = MetricLearningModule(PixelEncoder(), ContrastiveLoss())
    logged = trainer().test(module, datamodule=dm, verbose=False)[0]
    assert isinstance(module.test_metrics, QueryGalleryRetrievalMetrics)

    q, q_labels = embed(module.encoder, dm.query_dataset)
    g, g_labels = embed(module.encoder, dm.gallery_dataset)
    expected = retrieval_metrics(q, torch.as_tensor(q_labels), g, torch.as_tensor(g_labels), ks=dm.recall_ks)
    assert set(expected) == {k.removeprefix("test/") for k in logged}
    for key, value in expected.items():
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    # ranking the queries against the gallery is not the same as every image against all others
    both = torch.cat([q, g]), torch.as_tensor(np.concatenate([q_labels, g_labels]))
    assert retrieval_metrics(*both, ks=dm.recall_ks) != expected

    # the same numbers outside the Trainer loops (RetrievalReport uses this path)
    direct = module.evaluate(dm.test_dataloader())
    for key, value in expected.items():
        assert direct[key] == pytest.approx(value, abs=1e-6), key


def test_self_protocol_stays_the_default(tmp_path):
    dm = CUB200DataModule(**make_cub(tmp_path), image_size=SIZE, num_workers=0, augment=False)
    module = MetricLearningModule(PixelEncoder(), ContrastiveLoss())
    logged = trainer().test(module, datamodule=dm, verbose=False)[0]
    assert type(module.test_metrics) is RetrievalMetrics
    emb, labels = embed(module.encoder, dm.test_dataset)
    expected = retrieval_metrics(emb, torch.as_tensor(labels), ks=dm.recall_ks)
    for key, value in expected.items():
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
