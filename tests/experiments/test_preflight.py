"""Pre-flight: a configuration that cannot train fails when the run is built, naming the option.

Each fit below must stop in ``HardnegCLI.before_fit``: ``Trainer.fit`` (data loading, the
RetrievalReport baseline, the first step) is replaced by a function that fails the test.
"""

from pathlib import Path

import lightning as L
import pytest
import yaml

from experiments.cli import main
from tests.datamodules.miniature import make_cub

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests/configs/digits_tiny.yaml"
D = 16  # tests.helpers.TinyEncoder's embed_dim


@pytest.fixture
def no_training(monkeypatch):
    def fit(*args, **kwargs):
        raise AssertionError("Trainer.fit was called: the configuration error was not caught before training")

    monkeypatch.setattr(L.Trainer, "fit", fit)


def fit_error(tmp_path, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(TINY), f"--trainer.default_root_dir={tmp_path / 'run'}", *args])
    message = str(info.value.code)
    assert "Traceback" not in message and len(message.splitlines()) < 10
    return message


def loss_arg(spec: dict) -> str:
    return f"--model.init_args.loss={yaml.safe_dump(spec, default_flow_style=True).strip()}"


def memory(loss: dict, embedding_size: int = D, **init_args) -> dict:
    return {"class_path": "miners.CrossBatchMemory", "init_args": {"loss": loss, "embedding_size": embedding_size, **init_args}}


PROXY = {"class_path": "losses.ProxyAnchorLoss", "init_args": {"num_classes": 5, "embedding_size": D}}
NTXENT = {"class_path": "losses.NTXentLoss"}


def test_mochi_with_triplet_loss(tmp_path, no_training):
    message = fit_error(tmp_path, "--model.init_args.miner=miners.MoCHiMiner")
    assert "model.init_args.loss: TripletMarginLoss does not use the synthetic negatives that model.init_args.miner (MoCHiMiner)" in message
    assert "NTXentLoss" in message  # what would be right


def test_proxy_anchor_inside_memory(tmp_path, no_training):
    message = fit_error(tmp_path, "--model.init_args.miner=null", loss_arg(memory(PROXY)))
    assert "model.init_args.loss.init_args.loss: ProxyAnchorLoss cannot compare with a reference set" in message
    assert "CrossBatchMemory" in message


def test_memory_embedding_size_differs_from_the_encoder(tmp_path, no_training):
    message = fit_error(tmp_path, "--model.init_args.miner=null", loss_arg(memory(NTXENT, embedding_size=128)))
    assert "model.init_args.loss.init_args.embedding_size: CrossBatchMemory has embedding_size=128" in message
    assert f"outputs {D}-d embeddings; set embedding_size: {D}" in message


def test_memory_smaller_than_the_batch(tmp_path, no_training):
    message = fit_error(tmp_path, "--model.init_args.miner=null", loss_arg(memory(NTXENT, memory_size=8)))
    assert "model.init_args.loss.init_args.memory_size" in message and "global batch of 20" in message


def test_num_classes_smaller_than_the_data(tmp_path, no_training):
    proxy = {**PROXY, "init_args": {**PROXY["init_args"], "num_classes": 3}}
    message = fit_error(tmp_path, "--model.init_args.miner=null", loss_arg(proxy))
    assert "model.init_args.loss.init_args.num_classes: ProxyAnchorLoss has num_classes=3" in message
    assert "labels 0..4 (5 classes); set num_classes: 5" in message


def test_mochi_outside_the_memory_points_inside(tmp_path, no_training):
    message = fit_error(tmp_path, "--model.init_args.miner=miners.MoCHiMiner", loss_arg(memory(NTXENT)))
    assert "give the miner to it: model.init_args.loss.init_args.miner" in message


def test_a_compatible_memory_passes(tmp_path):
    run = tmp_path / "run"
    args = ["fit", "--config", str(TINY), f"--trainer.default_root_dir={run}", "--trainer.fast_dev_run=1",
            "--model.init_args.miner=null", loss_arg(memory({**NTXENT, "init_args": {}}, miner={"class_path": "miners.MoCHiMiner"}))]
    assert main(args) == 0


def small_class_cub(tmp_path: Path) -> dict:
    """A miniature CUB whose class 002 has 3 images instead of 4."""
    args = make_cub(tmp_path / "cub", per_class=4)
    folder = tmp_path / "cub" / "CUB_200_2011"
    images = (folder / "images.txt").read_text().splitlines()
    dropped = next(line for line in images if " 002." in line).split()[0]
    for name in ("images.txt", "image_class_labels.txt", "bounding_boxes.txt", "train_test_split.txt"):
        lines = (folder / name).read_text().splitlines()
        (folder / name).write_text("".join(f"{line}\n" for line in lines if line.split()[0] != dropped))
    return args


def test_pxk_names_the_dataset_class_id(tmp_path, no_training):
    args = small_class_cub(tmp_path)
    message = fit_error(
        tmp_path,
        "--data=datamodules.CUB200DataModule",
        *[f"--data.init_args.{k}={v}" for k, v in args.items()],
        "--data.init_args.classes_per_batch=2",
        "--data.init_args.samples_per_class=4",
    )
    assert "data.init_args.samples_per_class: samples_per_class=4" in message
    assert "002.Laysan_Albatross (3 images)" in message and "class 1 " not in message
    assert "repeat_small_classes: true" in message


def test_offline_hub_preset_names_the_weights():
    from models import create_encoder
    from models.timm_encoder import PretrainedWeightsUnavailable

    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_encoder("resnet50-512")
    message = str(info.value)
    assert "timm/resnet50.tv_in1k" in message
    assert "overrides: {pretrained: false, weights: /path/to/model.safetensors}" in message


def test_offline_hub_preset_in_fit_is_one_message(tmp_path, no_training):
    encoder = {"class_path": "models.preset", "init_args": {"name": "resnet50-512"}}
    message = fit_error(tmp_path, f"--model.init_args.encoder={yaml.safe_dump(encoder, default_flow_style=True).strip()}")
    assert message.startswith("hardneg fit: TimmEncoder('resnet50.tv_in1k', pretrained=True)") and "timm/resnet50.tv_in1k" in message


def help_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args])
    assert info.value.code in (0, None)
    return capsys.readouterr().out


def test_model_help_takes_the_short_name(capsys):
    out = help_of(capsys, "--model.help", "MetricLearningModule")
    assert "--model.loss_lr" in out and "--model.encoder" in out
    assert "torch.nn.ReLU" not in out and len(out.splitlines()) < 280  # grows with the zoo: every project class is listed once


def test_model_help_of_a_component_and_data_help(capsys):
    out = help_of(capsys, "--model.help", "BatchHardMiner")
    assert "--distance" in out and "--model.init_args.miner=BatchHardMiner" in out
    out = help_of(capsys, "--data.help", "FashionMNISTDataModule")
    assert "--data.samples_per_class" in out and len(out.splitlines()) < 200
