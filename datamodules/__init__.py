"""DataModules for retrieval benchmarks (images; query/document text builds on the same base), their datasets, input pipelines and samplers."""

from datamodules.base import MetricLearningDataModule, RetrievalDataModule
from datamodules.candidate_store import CandidateStore
from datamodules.cars196 import Cars196DataModule
from datamodules.cub200 import CUB200DataModule
from datamodules.datasets import ArrayImageDataset, ImageFileDataset, Indexed, LabelledDataset, QueryGalleryDataset, TextDataset
from datamodules.digits import DigitsDataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.fashion_scenes import generate_scenes
from datamodules.fashion_scenes_datamodule import FashionScenesDataModule
from datamodules.image_text import ImageTextDataModule
from datamodules.image_text_inputs import ImageTextInputs
from datamodules.inputs import ImageInputs, InputPipeline, TextInputs
from datamodules.inshop import InShopDataModule
from datamodules.metadata import DatasetFormatError
from datamodules.msmarco import MSMARCOPassageDataModule
from datamodules.ngame import NGAMEBatchSampler, balanced_kmeans
from datamodules.query_doc import QueryDocDataModule
from datamodules.query_doc_data import QueryDocData, QueryDocSplit
from datamodules.query_doc_train import QueryDocTrainDataset
from datamodules.samplers import ClassBalancedBatchSampler, RandomBatchSampler
from datamodules.shard_stream import ShardStream
from datamodules.sop import SOPDataModule
from datamodules.text_collection import LazyTextCollection
from datamodules.wordnet import WordNetGlossDataModule

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
    "RandomBatchSampler",
    "NGAMEBatchSampler",
    "balanced_kmeans",
    "QueryDocData",
    "CandidateStore",
    "QueryDocSplit",
    "QueryDocDataModule",
    "QueryDocTrainDataset",
    "WordNetGlossDataModule",
    "MSMARCOPassageDataModule",
    "LazyTextCollection",
    "ImageTextDataModule",
    "FashionScenesDataModule",
    "ImageTextInputs",
    "ShardStream",
    "generate_scenes",
]
