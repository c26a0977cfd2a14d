"""DataModules for retrieval benchmarks (images; text builds on the same base), their datasets, input pipelines and samplers."""

from datamodules.base import MetricLearningDataModule, RetrievalDataModule
from datamodules.datasets import ArrayImageDataset, ImageFileDataset, Indexed, LabelledDataset, QueryGalleryDataset, TextDataset
from datamodules.inputs import ImageInputs, InputPipeline, TextInputs
from datamodules.digits import DigitsDataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.cub200 import CUB200DataModule
from datamodules.cars196 import Cars196DataModule
from datamodules.sop import SOPDataModule
from datamodules.inshop import InShopDataModule
from datamodules.metadata import DatasetFormatError
from datamodules.samplers import ClassBalancedBatchSampler

__all__ = [
    "RetrievalDataModule",
    "MetricLearningDataModule",
    "InputPipeline",
    "ImageInputs",
    "TextInputs",
    "TextDataset",
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
