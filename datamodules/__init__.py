"""DataModules for labelled-image retrieval benchmarks, their datasets, transforms and samplers."""

from datamodules.base import MetricLearningDataModule
from datamodules.datasets import ArrayImageDataset, ImageFileDataset, Indexed, LabelledDataset, QueryGalleryDataset
from datamodules.digits import DigitsDataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.cub200 import CUB200DataModule
from datamodules.cars196 import Cars196DataModule
from datamodules.sop import SOPDataModule
from datamodules.inshop import InShopDataModule
from datamodules.metadata import DatasetFormatError
from datamodules.samplers import ClassBalancedBatchSampler

__all__ = [
    "MetricLearningDataModule",
    "ArrayImageDataset",
    "ImageFileDataset",
    "Indexed",
    "LabelledDataset",
    "QueryGalleryDataset",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "CUB200DataModule",
    "Cars196DataModule",
    "SOPDataModule",
    "InShopDataModule",
    "DatasetFormatError",
    "ClassBalancedBatchSampler",
]
