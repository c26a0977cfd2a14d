"""Thin LightningModules (embed -> the shared ``EmbeddingStep`` -> log) and the retrieval metrics they log.

Submodules are imported where they are used (``from lightning_modules.metrics import
RetrievalMetrics``) so that importing this package stays cheap.
"""

__all__ = ["EmbeddingStep", "EmbeddingModule", "MetricLearningModule", "MoCoModule", "DualEncoderModule", "ADOREModule", "CLIPModule"]


def __getattr__(name: str):
    # Lazy so that ``lightning_modules.metrics`` can be used without importing Lightning.
    if name == "MetricLearningModule":
        from lightning_modules.metric_learning_module import MetricLearningModule

        return MetricLearningModule
    if name == "MoCoModule":
        from lightning_modules.moco_module import MoCoModule

        return MoCoModule
    if name == "EmbeddingModule":
        from lightning_modules.embedding_module import EmbeddingModule

        return EmbeddingModule
    if name == "DualEncoderModule":
        from lightning_modules.dual_encoder_module import DualEncoderModule

        return DualEncoderModule
    if name == "ADOREModule":
        from lightning_modules.adore_module import ADOREModule

        return ADOREModule
    if name == "CLIPModule":
        from lightning_modules.clip_module import CLIPModule

        return CLIPModule
    if name == "EmbeddingStep":
        from lightning_modules.step import EmbeddingStep

        return EmbeddingStep
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
