"""Gradient caching: an in-batch loss over a batch larger than memory, with the uncached gradients.

Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(RepL4NLP 2021), Sec. 3. For a loss ``L(f(x_1), ..., f(x_B))`` over representations ``s_i = f(x_i)``
the chain rule splits the encoder gradient (their Eq. 5 and 6)::

    dL/dTheta = sum_i  (dL/ds_i)^T  ds_i/dTheta

so the representations can be computed without graph (pass 1), ``u_i = dL/ds_i`` cached from the
loss on the detached representations, and each chunk re-embedded with graph and back-propagated
with ``u`` (pass 2): only one chunk's activations live at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

EncoderInputs = Union[Tensor, Mapping[str, Tensor]]


class GradCache:
    """One cached training step: ``GradCache(chunk_size)(pairs, objective) -> loss``.

    ``pairs`` is a sequence of ``(encoder, inputs)``; ``inputs`` is a tensor ``[B, ...]`` or a dict
    of tensors with the same first dimension (tokenizer output), cut into chunks of ``chunk_size``
    rows (the last one may be shorter) and handed to ``encoder(chunk)``, which returns ``[b, D]``.
    Several pairs may share one encoder (a shared query/document tower). ``objective(*embeddings)``
    gets one full-batch ``[B_k, D]`` tensor per pair and returns a scalar; mining belongs inside it
    (the miner sees the same detached embeddings as in the uncached step).

    The step (Gao et al. 2021, Sec. 3.2):

    1. embed every chunk under ``torch.no_grad()``, in pair order then chunk order, saving the RNG
       state (CPU, and CUDA of the devices involved) before each chunk;
    2. run the objective on the concatenated embeddings as ``requires_grad`` leaves and
       back-propagate it: the objective's own parameters (proxies, a temperature, a learnable
       margin) get their ``.grad`` here, and the leaves' gradients are cached;
    3. re-embed each chunk with its RNG state restored, with graph, and back-propagate its slice of
       the cached gradient (``torch.autograd.backward(emb, grad)``), accumulating into the encoders.

    It returns the loss, detached. Gradients equal the uncached step's: the full batch embedded at
    once for a deterministic encoder; with dropout, the same chunks embedded with graph in the same
    order (same RNG consumption). After the step the global RNG is where the uncached step leaves it.

    Design decisions:

    - RNG: pass 2 runs inside ``torch.random.fork_rng`` with each chunk's saved state, so dropout
      masks replay exactly and the global generator is left as pass 1 left it. Other generators
      (a ``torch.Generator`` owned by the encoder, ``random``, numpy) are not replayed: an encoder
      that draws from them is not supported.
    - Buffers (BatchNorm running statistics, spectral-norm vectors): every buffer of every encoder is
      saved before pass 1 and restored after it, so pass 2 replays pass 1 from the same state; after
      pass 2 the buffers are set to what pass 1 left, which is what the uncached chunked step leaves:
      running statistics are updated once per chunk, not twice, also for a pair that gets no second
      pass (a frozen tower, an embedding the objective ignores).
      In train mode BatchNorm normalises each chunk by the chunk's own statistics, so a BN encoder
      equals the uncached step over the same chunks, not the full batch; for full-batch equality
      freeze BatchNorm (``TimmEncoder(freeze_bn=...)``, eval mode) or use LayerNorm/GroupNorm.
    - DDP: the objective owns the cross-rank part (``contracts.gather.all_gather_with_grad`` inside
      it), so step 2 computes the global loss on every rank. In step 3 an encoder wrapped in
      ``DistributedDataParallel`` runs all its chunks but the last under ``encoder.no_sync()``:
      gradients accumulate locally and are all-reduced once, on the last chunk's backward. Every rank
      must embed the same number of chunks (DDP and buffer broadcasts are collectives). When the
      encoders are plain submodules of a DDP-wrapped LightningModule, DDP's hooks never see the
      encoder calls; the training step that runs this under manual optimisation must then sync
      the gradients itself (one all-reduce after the step, or this class with DDP-wrapped towers).
    - ``backward``: step 2 calls ``backward(loss)`` in place of ``loss.backward()`` when given; a
      LightningModule under manual optimisation passes ``self.manual_backward``, so the
      ``on_before_backward``/``on_after_backward`` hooks see the loss once (not the chunks' slices)
      and the precision plugin scales it; step 3 back-propagates the chunks with autograd directly.
      It replaces ``scaler``: give one of them.
    - fp16: with ``scaler`` (a ``torch.amp.GradScaler``) step 2 back-propagates
      ``scaler.scale(loss)``, so the cached gradients, the objective's and the encoders' gradients
      are all scaled once; call ``scaler.step(optimizer)`` as usual. Autocast is whatever the caller
      has active around this call; both passes run under it.

    Args:
        chunk_size: rows per chunk in both passes (the per-chunk memory budget).
        scaler: optional ``GradScaler`` for mixed precision.
    """

    def __init__(self, chunk_size: int, scaler: Any | None = None) -> None:
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"GradCache: chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.scaler = scaler

    def __call__(
        self,
        pairs: Sequence[tuple[nn.Module, EncoderInputs]],
        objective: Callable[..., Tensor],
        backward: Callable[[Tensor], Any] | None = None,
    ) -> Tensor:
        if backward is not None and self.scaler is not None:
            raise ValueError("GradCache: give a scaler or a backward function, not both (Lightning's manual_backward scales the loss itself)")
        if len(pairs) == 0:
            raise ValueError("GradCache: pairs is empty; expected a sequence of (encoder, inputs)")
        chunked = [split_rows(inputs, self.chunk_size, k) for k, (_, inputs) in enumerate(pairs)]
        encoders = unique_modules(enc for enc, _ in pairs)

        saved = [save_buffers(enc) for enc in encoders]
        states: list[list[RNGState]] = []
        embeddings: list[Tensor] = []
        with torch.no_grad():
            for k, ((encoder, _), chunks) in enumerate(zip(pairs, chunked)):
                states.append([])
                parts = []
                for chunk in chunks:
                    states[k].append(RNGState.capture(encoder, chunk))
                    parts.append(check_embedding(encoder(chunk), chunk, k))
                embeddings.append(torch.cat(parts))
        after_pass_1 = [save_buffers(enc) for enc in encoders]  # what the uncached step leaves behind
        for enc, buffers in zip(encoders, saved):
            restore_buffers(enc, buffers)

        leaves = [e.detach().requires_grad_(True) for e in embeddings]
        loss = objective(*leaves)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"GradCache: the objective must return a scalar tensor, got {type(loss).__name__} "
                             f"of shape {tuple(getattr(loss, 'shape', ()))}")
        if not loss.requires_grad:
            for enc, buffers in zip(encoders, after_pass_1):
                restore_buffers(enc, buffers)
            return loss.detach()  # nothing depends on the embeddings: no gradient anywhere
        if backward is not None:
            backward(loss)
        else:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

        used = [leaf.grad is not None and any(p.requires_grad for p in enc.parameters()) for leaf, (enc, _) in zip(leaves, pairs)]
        last = last_chunk_of_each_encoder(pairs, chunked, used)
        for k, ((encoder, _), chunks) in enumerate(zip(pairs, chunked)):
            if not used[k]:
                continue  # the objective ignored this pair, or its tower is frozen: no second pass
            grads = leaves[k].grad.split([rows(c) for c in chunks])
            for j, (chunk, grad) in enumerate(zip(chunks, grads)):
                sync = (k, j) == last.get(id(encoder)) or not isinstance(encoder, DistributedDataParallel)
                with states[k][j].restored(), (contextlib.nullcontext() if sync else encoder.no_sync()):
                    torch.autograd.backward(encoder(chunk), grad)
        for enc, buffers in zip(encoders, after_pass_1):
            restore_buffers(enc, buffers)
        return loss.detach()


class RNGState:
    """The global CPU generator and the CUDA generators a chunk's forward may draw from."""

    def __init__(self, cpu: Tensor, cuda: dict[int, Tensor]) -> None:
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, encoder: nn.Module, chunk: EncoderInputs) -> "RNGState":
        devices = sorted(cuda_devices(encoder, chunk))
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices})

    @contextlib.contextmanager
    def restored(self):
        """Run the block from this state; the global generators are put back afterwards."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


def cuda_devices(encoder: nn.Module, chunk: EncoderInputs) -> set[int]:
    tensors = list(chunk.values()) if isinstance(chunk, Mapping) else [chunk]
    tensors += list(encoder.parameters()) + list(encoder.buffers())
    return {t.device.index if t.device.index is not None else torch.cuda.current_device()
            for t in tensors if isinstance(t, Tensor) and t.is_cuda}


def split_rows(inputs: EncoderInputs, chunk_size: int, pair: int) -> list[EncoderInputs]:
    """Cut a tensor, or every tensor of a dict, into chunks of ``chunk_size`` rows along dim 0."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0 or len(inputs) == 0:
            raise ValueError(f"GradCache: inputs of pair {pair} have no rows (shape {tuple(inputs.shape)})")
        return list(inputs.split(chunk_size))
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(f"GradCache: inputs of pair {pair} must be a tensor or a non-empty dict of tensors, "
                        f"got {type(inputs).__name__}")
    sizes = {key: (len(v) if isinstance(v, Tensor) and v.dim() > 0 else None) for key, v in inputs.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"GradCache: the dict inputs of pair {pair} must hold tensors with one common, non-zero "
                         f"first dimension; got first dimensions {sizes}")
    parts = {key: v.split(chunk_size) for key, v in inputs.items()}
    return [dict(zip(parts, values)) for values in zip(*parts.values())]


def rows(chunk: EncoderInputs) -> int:
    return len(chunk) if isinstance(chunk, Tensor) else len(next(iter(chunk.values())))


def check_embedding(emb: Any, chunk: EncoderInputs, pair: int) -> Tensor:
    if not isinstance(emb, Tensor) or emb.dim() < 1 or len(emb) != rows(chunk):
        raise ValueError(f"GradCache: the encoder of pair {pair} must return a tensor [b, D] with one row per "
                         f"input row ({rows(chunk)}), got {type(emb).__name__} {tuple(getattr(emb, 'shape', ()))}")
    return emb


def unique_modules(modules) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for m in modules:
        seen.setdefault(id(m), m)
    return list(seen.values())


def last_chunk_of_each_encoder(pairs, chunked, used: list[bool]) -> dict[int, tuple[int, int]]:
    """``id(encoder) -> (pair, chunk)`` of the encoder's last backward, the one DDP syncs on."""
    return {id(enc): (k, len(chunks) - 1) for k, ((enc, _), chunks) in enumerate(zip(pairs, chunked)) if used[k]}


def save_buffers(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.detach().clone()) for b in module.buffers()]


def restore_buffers(module: nn.Module, saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)
