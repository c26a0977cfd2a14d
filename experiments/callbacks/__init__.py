"""Lightning callbacks, one per file: ``experiments.callbacks.RetrievalReport`` in a config's ``trainer.callbacks``.

Every ``hardneg fit`` run has ``AtomicModelCheckpoint`` and ``DivergenceMonitor`` (``HardnegCLI``);
a grid adds ``HardnessMonitor`` and ``ProgressFile`` to every cell and ``UntrainedBaseline`` to its
baseline jobs. Rank-0 writers put their files in ``rank_log_dir(trainer)``. ``ResumeLogs`` stays
with the loggers it drives (``experiments.run_logs``).
"""

from experiments.callbacks.ann_refresh import ANNRefresh
from experiments.callbacks.atomic_model_checkpoint import AtomicModelCheckpoint
from experiments.callbacks.compositional_report import CompositionalReport
from experiments.callbacks.divergence_monitor import DivergenceError, DivergenceMonitor, EmbeddingCollapseWarning
from experiments.callbacks.hardness_monitor import HardnessMonitor
from experiments.callbacks.head_warmup import HeadWarmup
from experiments.callbacks.ngame import NGAMEMemoryBank
from experiments.callbacks.progress_file import ProgressFile
from experiments.callbacks.rank_log_dir import rank_log_dir
from experiments.callbacks.retrieval_report import RetrievalReport
from experiments.callbacks.set_epoch import SetEpoch
from experiments.callbacks.untrained_baseline import UntrainedBaseline

__all__ = [
    "rank_log_dir", "AtomicModelCheckpoint", "RetrievalReport", "HardnessMonitor", "DivergenceMonitor",
    "DivergenceError", "EmbeddingCollapseWarning", "HeadWarmup", "SetEpoch", "ProgressFile", "UntrainedBaseline",
    "ANNRefresh", "NGAMEMemoryBank", "CompositionalReport",
]
