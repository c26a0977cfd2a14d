"""The DataModule base beyond images: a text DataModule gets its tokenizer from ``data_config``, and the
train batch sampler is an injected factory (P x K by default, any sampler by ``class_path``)."""

import json
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning import LightningDataModule
from torch.utils.data import Sampler

from datamodules import ClassBalancedBatchSampler, DigitsDataModule, RetrievalDataModule, TextDataset, TextInputs

WORDS = ["cat", "dog", "owl", "eel", "ant", "bee"]  # one class per word, 5 texts each
TEXTS = [f"{w} {'very ' * i}small" for w in WORDS for i in range(5)]
LABELS = [c for c in range(len(WORDS)) for _ in range(5)]


def char_tokenizer(texts, max_length):
    """A trivial tokenizer: character codes, truncated to ``max_length`` and right-padded with 0."""
    length = min(max_length, max(len(t) for t in texts))
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, text in enumerate(texts):
        codes = [ord(ch) for ch in text[:length]]
        ids[row, : len(codes)] = torch.tensor(codes)
        mask[row, : len(codes)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TinyTextDataModule(RetrievalDataModule):
    """Labelled strings on the shared base: the first 4 classes train, the last 2 test."""

    def build_datasets(self) -> None:
        labels = np.asarray(LABELS)
        tr, te = np.flatnonzero(labels < 4), np.flatnonzero(labels >= 4)
        self.train_dataset = TextDataset([TEXTS[i] for i in tr], labels[tr])
        self.test_dataset = TextDataset([TEXTS[i] for i in te], labels[te])


class FirstItemsBatchSampler(Sampler[list[int]]):
    """A custom batch sampler (stands in for NGAME's clusters): consecutive items, this rank's shard."""

    instances: list["FirstItemsBatchSampler"] = []

    def __init__(self, labels: Sequence[int], batch_size: int = 3, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.labels, self.batch_size, self.rank, self.world_size, self.seed = np.asarray(labels), batch_size, rank, world_size, seed
        FirstItemsBatchSampler.instances.append(self)

    def __len__(self) -> int:
        return len(self.labels) // (self.batch_size * self.world_size)

    def __iter__(self):
        for b in range(len(self)):
            start = (b * self.world_size + self.rank) * self.batch_size
            yield list(range(start, start + self.batch_size))


def with_trainer(dm, rank=0, world=1, encoder=None):
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, lightning_module=SimpleNamespace(encoder=encoder))
    return dm


def instantiate(spec: dict) -> LightningDataModule:
    """As LightningCLI and ``hardneg data check`` build ``data:`` (jsonargparse, class_path)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    return parser.instantiate_classes(parser.parse_args(["--data", json.dumps(spec)])).data


def test_text_batches_through_pk_sampler_with_tokenizer_from_data_config():
    dm = TinyTextDataModule(classes_per_batch=2, samples_per_class=3, num_workers=0, eval_batch_size=4,
                            data_config={"tokenizer": char_tokenizer, "max_length": 6})
    dm.setup()
    assert isinstance(dm.input_pipeline(dm.resolved_data_config()), TextInputs)
    batches = list(dm.train_dataloader())
    assert len(batches) == 20 // 6
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "label"}
        assert batch["input_ids"].shape == (6, 6) and batch["attention_mask"].shape == (6, 6)
        assert sorted(np.bincount(batch["label"].numpy()).tolist())[-2:] == [3, 3]  # P x K: 2 classes x 3
    ids = batches[0]["input_ids"][0]
    assert "".join(map(chr, ids.tolist())) == TEXTS[0][:6] or (ids > 0).all()  # truncated to max_length
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "label", "index"} and batch["index"].tolist() == [0, 1, 2, 3]
    assert dm.split_sizes() == {"train": {"items": 20, "classes": 4}, "test": {"items": 10, "classes": 2}}


def test_tokenizer_comes_from_the_encoder_and_max_length_from_inputs():
    encoder = SimpleNamespace(data_config={"tokenizer": char_tokenizer, "max_length": 64})
    dm = with_trainer(TinyTextDataModule(classes_per_batch=2, samples_per_class=2, num_workers=0, inputs=TextInputs(max_length=3)),
                      encoder=encoder)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 3)


def test_hf_style_tokenizer_is_called_with_padding_and_truncation():
    calls = []

    class HFLike:
        model_input_names, pad_token_id = ["input_ids", "attention_mask"], 0

        def __call__(self, texts, **kwargs):
            calls.append(kwargs)
            return char_tokenizer(texts, kwargs["max_length"])

    dm = TinyTextDataModule(classes_per_batch=2, samples_per_class=2, num_workers=0, data_config={"tokenizer": HFLike(), "max_length": 5})
    dm.setup()
    next(iter(dm.train_dataloader()))
    assert calls[0] == {"padding": True, "truncation": True, "max_length": 5, "return_tensors": "pt"}


def test_text_without_tokenizer_names_the_fix():
    dm = TinyTextDataModule(num_workers=0, inputs=TextInputs())
    with pytest.raises(ValueError, match="data_config has no 'tokenizer'"):
        dm.setup()


def test_custom_batch_sampler_by_class_path_gets_labels_rank_world_and_seed():
    FirstItemsBatchSampler.instances.clear()
    dm = instantiate({
        "class_path": "tests.datamodules.test_text_and_sampler.TinyTextDataModule",
        "init_args": {"num_workers": 0, "seed": 11, "data_config": {"max_length": 4},
                      "batch_sampler": {"class_path": "tests.datamodules.test_text_and_sampler.FirstItemsBatchSampler",
                                        "init_args": {"batch_size": 5}}},
    })
    dm.data_config["tokenizer"] = char_tokenizer  # a callable cannot be written in YAML (an HF name can)
    with_trainer(dm, rank=1, world=2).setup()
    batches = list(dm.train_dataloader())
    sampler = FirstItemsBatchSampler.instances[-1]
    assert (sampler.rank, sampler.world_size, sampler.seed, sampler.batch_size) == (1, 2, 11, 5)
    assert sampler.labels.tolist() == LABELS[:20]
    assert [b["label"].tolist() for b in batches] == [LABELS[5:10], LABELS[15:20]]  # rank 1's shard, not P x K
    assert dm.pk_settings() is None  # no P x K declared: the pre-flight P x K checks do not apply


def test_pk_sampler_by_class_path_is_ddp_aware_and_declares_pk():
    dm = instantiate({
        "class_path": "datamodules.DigitsDataModule",
        "init_args": {"num_workers": 0, "image_size": 8, "seed": 3,
                      "batch_sampler": {"class_path": "datamodules.ClassBalancedBatchSampler",
                                        "init_args": {"classes_per_batch": 2, "samples_per_class": 3, "num_batches": 2}}},
    })
    assert dm.pk_settings() == {"classes_per_batch": 2, "samples_per_class": 3, "repeat_small_classes": False}
    seen = []
    for rank in (0, 1):
        with_trainer(dm, rank=rank, world=2).setup()
        sampler = dm.train_sampler()
        assert isinstance(sampler, ClassBalancedBatchSampler) and (sampler.rank, sampler.world_size, sampler.seed) == (rank, 2, 3)
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape == (6, 3, 8, 8)
        seen.append(set(batch["label"].tolist()))
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]  # disjoint class shards


def test_default_sampler_is_pk_from_the_datamodule_arguments():
    dm = DigitsDataModule(classes_per_batch=3, samples_per_class=2, num_batches=4, num_workers=0, image_size=8)
    dm.setup()
    sampler = dm.train_sampler()
    assert isinstance(sampler, ClassBalancedBatchSampler) and (sampler.P, sampler.K, len(sampler)) == (3, 2, 4)
    assert dm.pk_settings() == {"classes_per_batch": 3, "samples_per_class": 2, "repeat_small_classes": False}
    with pytest.raises(TypeError, match="batch_sampler must be a factory"):
        DigitsDataModule(batch_sampler=4)


def test_pk_arguments_beside_an_injected_sampler_warn_that_they_are_ignored():
    factory = lambda labels, rank, world_size, seed: FirstItemsBatchSampler(labels, 2, rank, world_size, seed)  # noqa: E731
    with pytest.warns(UserWarning, match="classes_per_batch=3 configure the default P x K sampler and are ignored"):
        DigitsDataModule(classes_per_batch=3, batch_sampler=factory)
    dm = DigitsDataModule(batch_sampler=factory, num_workers=0, image_size=8)  # a plain callable works too
    dm.setup()
    assert [len(b) for b in dm.train_sampler()][:2] == [2, 2] and dm.pk_settings() is None
