"""The versioned candidate lists that replace a query/document DataModule's hard negatives during training (ANCE).

``QueryDocDataModule.set_candidates`` is called by ``experiments.callbacks.ANNRefresh`` with the
top-C of every train query under the current model. Design: the candidate lists live in a
``CandidateStore``, one folder per rank holding one sub-folder per *version* (``v000001/rows.npy``,
``scores.npy``, ``pos_scores.npy``), each written to a temporary folder and renamed into place
(atomic: a reader never sees half a version). Version 0 is the static ``data.negatives``. The main
process owns the version counter; the epoch-tagging batch sampler (``EpochBatchSampler``,
``datamodules.query_doc_train``) reads it *per batch, in the main process*, and puts it in every
index: ``(query_row, epoch, version)``. A DataLoader worker (persistent or not, forked or spawned,
any count) therefore needs no shared state: it opens (memory-maps) the version its index names, and
keeps the last one it opened. So a new store is used from the first batch the sampler yields after
``set_candidates``: at an epoch boundary (``ANNRefresh`` at ``on_train_epoch_start`` or
``on_fit_start``, before Lightning creates the epoch's iterator), every batch of the epoch;
mid-epoch (``every_n_steps``), the batches not yet prefetched (with ``W`` workers,
``prefetch_factor * W`` batches after the call: reproducible for a given loader setting). The draw
is still seeded by ``(seed, epoch, query_row)``, identical on every rank (each rank writes the same
candidates into its own folder) and for any number of workers. The last two versions are kept
(in-flight batches of a mid-epoch refresh still name the previous one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from typing import Any

import numpy as np


def _remove_tree(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked DataLoader worker that drops its copy must not delete the owner's folder
        shutil.rmtree(path, ignore_errors=True)


class CandidateStore:
    """Versioned candidate lists on disk that a training run replaces (design: module docstring).

    ``write(rows, scores, pos_scores)`` (main process) stores version ``v = version + 1`` in
    ``directory/v{v:06d}/`` (``rows.npy [Q, C] int64`` with ``-1`` for an empty slot, optional
    ``scores.npy [Q, C] float32`` and ``pos_scores.npy [Q] float32``, NaN where unknown), written to a
    temporary folder and renamed into place, then bumps ``version``; ``load(v)`` (any process) memory-
    maps a version, caching the last one. Version 0 is the static candidates and is never on disk.
    ``directory=None``: a temporary folder, created on first use and removed when the store is (by the
    process that created it). A given directory is emptied of older versions on first use (a new run).
    """

    def __init__(self, directory: str | os.PathLike | None = None, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"CandidateStore: keep must be >= 1 (versions kept on disk), got {keep}")
        self.directory = None if directory is None else os.fspath(directory)
        self.keep = keep
        self.version = 0
        self._ready = False
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None

    def current_version(self) -> int:
        """The newest version (read by the epoch-tagging batch sampler for every batch)."""
        return self.version

    def ensure_directory(self) -> str:
        """Create (or empty) the store's folder; call in the main process before DataLoader workers start."""
        if self._ready:
            return self.directory
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="hardneg-candidates-")
            weakref.finalize(self, _remove_tree, self.directory, os.getpid())
        else:
            os.makedirs(self.directory, exist_ok=True)
            for name in os.listdir(self.directory):
                if (name.startswith("v") and name[1:].isdigit()) or name.startswith("tmp-"):  # versions of an earlier run
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._ready = True
        return self.directory

    def path(self, version: int) -> str:
        return os.path.join(self.directory, f"v{version:06d}")

    def write(self, rows: np.ndarray, scores: np.ndarray | None = None, pos_scores: np.ndarray | None = None) -> int:
        """Store a new version (arrays already validated by ``QueryDocDataModule.set_candidates``); returns its number."""
        self.ensure_directory()
        version = self.version + 1
        tmp = os.path.join(self.directory, f"tmp-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        arrays = {"rows": rows, "scores": scores, "pos_scores": pos_scores}
        for name, value in arrays.items():
            if value is not None:
                np.save(os.path.join(tmp, f"{name}.npy"), value)
        os.replace(tmp, self.path(version))
        self.version = version
        for old in range(version - self.keep, 0, -1):
            if not os.path.isdir(self.path(old)):
                break
            shutil.rmtree(self.path(old), ignore_errors=True)
        return version

    def load(self, version: int) -> dict[str, np.ndarray]:
        """``{"rows", "scores"?, "pos_scores"?}`` of ``version`` (memory-mapped; the last one is cached)."""
        if self._cache is not None and self._cache[0] == version:
            return self._cache[1]
        if self.directory is None:
            raise RuntimeError(f"CandidateStore: asked for candidate version {version} but no version was ever written "
                               f"(QueryDocDataModule.set_candidates was not called in this run)")
        folder = self.path(version)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"CandidateStore: candidate version {version} is not in {self.directory} (kept: the last {self.keep}); "
                                    f"a batch index named a version that was already removed or never written")
        out = {}
        for name in ("rows", "scores", "pos_scores"):
            file = os.path.join(folder, f"{name}.npy")
            if os.path.exists(file):
                out[name] = np.load(file, mmap_mode="r")
        self._cache = (version, out)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # workers open what they need
        return state
