"""Thin LightningModules (embed -> mine -> loss -> log) and the retrieval metrics they log.

Submodules are imported where they are used (``from lightning_modules.metrics import
RetrievalMetrics``) so that importing this package stays cheap.
"""

__all__ = ["MetricLearningModule"]


def __getattr__(name: str):
    # Lazy so that ``lightning_modules.metrics`` can be used without importing Lightning.
    if name == "MetricLearningModule":
        from lightning_modules.metric_learning_module import MetricLearningModule

        return MetricLearningModule
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
