"""``FashionScenesDataModule``: the offline image-text benchmark, Fashion-MNIST scenes read as image-text data.

``datamodules.fashion_scenes`` generates the scenes (two tinted garments side by side, captions from
templates, optional compositional hard negatives) and imports nothing of Lightning; this
DataModule writes them once under ``root`` in ``prepare_data`` and then reads them like any
image-text data (``ImageTextDataModule``): training from the webdataset shards (or the CSV),
evaluation on the held-out scenes, zero-shot on the Fashion-MNIST test images.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.image_text import ImageTextDataModule


class FashionScenesDataModule(ImageTextDataModule):
    """The offline image-text benchmark: Fashion-MNIST scenes (``datamodules.fashion_scenes``) written
    once under ``root`` by ``prepare_data`` (rank 0; every later run and rank reads the files), then
    read like any image-text data: training from the webdataset shards (or the CSV), evaluation on
    the held-out scenes (several captions per image) and zero-shot on the Fashion-MNIST test images.

    Args:
        root: where the scenes are written (reused when its manifest matches the parameters).
        n_train, n_test, scene_seed, shard_size, with_negatives, captions_per_test_image, scene_size:
            ``generate_scenes`` parameters (``scene_seed`` fixes the data, independent of ``seed``).
        train_format: "shards" (webdataset tar files) or "csv".
        zero_shot: "fashion_mnist" (default: the Fashion-MNIST test images, class-name prompts) or None.
        **kwargs: see ``ImageTextDataModule`` (``batch_size``, ``num_batches``, ``image_size`` ...).
    """

    def __init__(
        self,
        root: str = "data/fashion_scenes",
        n_train: int = 10_000,
        n_test: int = 1_000,
        scene_seed: int = 0,
        shard_size: int = 1_000,
        with_negatives: bool = False,
        captions_per_test_image: int = 3,
        scene_size: int = 64,
        train_format: str = "shards",
        zero_shot: str | None = "fashion_mnist",
        **kwargs,
    ) -> None:
        from datamodules.fashion_scenes import shard_pattern

        if train_format not in ("shards", "csv"):
            raise ValueError(f"train_format={train_format!r}; expected 'shards' or 'csv'")
        self.scene_args = dict(n_train=n_train, n_test=n_test, seed=scene_seed, shard_size=shard_size, with_negatives=with_negatives,
                               captions_per_test_image=captions_per_test_image, image_size=scene_size)
        self.root = Path(root)
        count = -(-n_train // shard_size)
        train = shard_pattern(self.root, "train", count) if train_format == "shards" else str(self.root / "train.csv")
        super().__init__(train=train, test=str(self.root / "test.csv"), zero_shot=zero_shot, **kwargs)

    def generate(self):
        from datamodules.fashion_scenes import generate_scenes

        return generate_scenes(self.root, fashion_mnist_root=self.fashion_mnist_root, **self.scene_args)

    def prepare_data(self) -> None:
        self.generate()

    def build_datasets(self) -> None:
        paths = self.generate()  # returns at once when prepare_data wrote them (or `hardneg data check` runs alone)
        if self.train_kind == "shards" and self.train != paths.train_shards:
            raise RuntimeError(f"FashionScenesDataModule: generated shards {paths.train_shards} differ from the expected {self.train}")
        super().build_datasets()
