"""The model's own ``encode`` / ``decode``, run fast: precision as ``torch.autocast``,
on CUDA replayed from a CUDA graph captured once per input shape, optionally
``torch.compile``-d first.

Everything except the capture itself runs on any device: on the CPU (or with
``graphs=False``) ``ModelRunner`` makes the same calls eagerly, so the code a
reader finds in ``model/`` is the code that runs.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .model import Sam3D

__all__ = ["CapturedCall", "ModelRunner"]


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 tensor cores for float32 matrix products and convolutions on or off
    (cuDNN's default is on: off means true float32), restored after. The flags
    in force at capture are baked into a graph."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class CapturedCall:
    """One call captured as a CUDA graph: static input buffers, the graph, its
    output tensors; calling it copies new inputs in and replays."""

    def __init__(self, fn, inputs: tuple, pool, warmup: int):
        self.inputs = tuple(x.clone() for x in inputs)
        self.outputs = self._capture(fn, pool, warmup)

    def _capture(self, fn, pool, warmup: int) -> tuple:
        # Warm-up on a side stream: cuBLAS / cuDNN / compile initialisation stays out of the graph.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            return fn(*self.inputs)

    def _replay(self) -> None:
        self.graph.replay()

    def __call__(self, *values: torch.Tensor) -> tuple:
        for buffer, value in zip(self.inputs, values):
            buffer.copy_(value, non_blocking=True)
        self._replay()
        # Clones: the next replay overwrites the outputs.
        return tuple(o.clone() for o in self.outputs)


class ModelRunner:
    """``Sam3D.encode`` / ``Sam3D.decode`` on ``device``.

    precision: the encoder's autocast dtype (float32: none). decoder_precision:
    the decoder's (float32 by default: it is latency-bound, so full precision
    costs little; on CUDA its float32 matrix products use TF32 when ``tf32``).
    graphs: replay CUDA graphs captured per input shape (CUDA only). compile:
    ``torch.compile`` the calls first (CUDA only; tens of seconds per shape).
    Outputs are float32 on ``device``: embedding (1, C, g, g, g); low-res
    logits (B, 1|3, s, s, s) and IoU (B, 1|3).
    """

    def __init__(self, model: Sam3D, device: torch.device | str | None = None,
                 precision: torch.dtype = torch.float32, decoder_precision: torch.dtype = torch.float32,
                 graphs: bool = True, compile: bool = False, tf32: bool = True, warmup: int = 2):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        cuda = self.device.type == "cuda"
        self.model = model.eval().to(self.device)
        self.precision = precision
        self.decoder_precision = decoder_precision
        self.graphs = graphs and cuda
        self.tf32 = tf32 and cuda
        self.warmup = warmup
        self.compiled = compile and cuda
        self._encode, self._decode = self._plain_encode, self._plain_decode
        if self.compiled:
            self._encode = torch.compile(self._plain_encode, dynamic=False)
            self._decode = torch.compile(self._plain_decode, dynamic=False)
        self._captured: dict[tuple, CapturedCall] = {}
        self._pool = None
        self.capture = CapturedCall           # how a call is captured (tests replace the CUDA part)

    def describe(self) -> str:
        parts = [f"{str(self.precision).replace('torch.', '')} encoder",
                 f"{str(self.decoder_precision).replace('torch.', '')} decoder"]
        if self.graphs:
            parts.append("CUDA graphs")
        if self.compiled:
            parts.append("compiled")
        return ", ".join(parts)

    def _autocast(self, dtype: torch.dtype):
        # No cast cache: cached casts must not outlive a graph capture (each weight is cast once
        # per call anyway).
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32,
                              cache_enabled=False)

    # -- the computations (captured as they are) ----------------------------------
    def _plain_encode(self, volume: torch.Tensor) -> torch.Tensor:
        with self._autocast(self.precision):
            return self.model.encode(volume).float()

    def _plain_decode(self, embedding, points, labels, mask_logits, multimask: bool):
        with self._autocast(self.decoder_precision):
            logits, iou = self.model.decode(embedding, points, labels, mask_logits, multimask)
        return logits.float(), iou.float()

    def _run(self, key: tuple, fn, inputs: tuple, tf32: bool):
        """fn(*inputs) eagerly, or as the replay of the graph captured for ``key``."""
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device, _tf32(tf32):
            if not self.graphs:
                return fn(*inputs)
            call = self._captured.get(key)
            if call is None:
                if self._pool is None and self.device.type == "cuda":
                    # One memory pool: graphs replay one at a time on one stream and
                    # their outputs are cloned, so they may share temporaries.
                    self._pool = torch.cuda.graph_pool_handle()
                try:
                    call = self.capture(fn, inputs, self._pool, self.warmup)
                except torch.cuda.OutOfMemoryError:
                    raise                     # the session's CPU fallback handles memory
                except RuntimeError as exc:
                    # A call that cannot be captured on this driver or build must not stop
                    # segmentation: the same model calls run eagerly from now on.
                    self.graphs = False
                    self._captured.clear()
                    warnings.warn(f"CUDA graph capture failed ({str(exc).splitlines()[0][:120]}); "
                                  "running without CUDA graphs")
                    return fn(*inputs)
                self._captured[key] = call
            return call(*inputs)

    # -- public API ---------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S, S) z-normalised crop (any device) -> embedding, float32."""
        volume = volume.to(self.device, torch.float32)
        key = ("encode", tuple(volume.shape))
        return self._run(key, lambda v: (self._encode(v),), (volume,), tf32=False)[0]

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
               mask_logits: torch.Tensor | None = None,
               multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``Sam3D.decode``; inputs on any device."""
        dev = self.device
        inputs = (embedding.to(dev, torch.float32), points.to(dev, torch.float32), labels.to(dev, torch.int64))
        if mask_logits is not None:
            inputs += (mask_logits.to(dev, torch.float32),)
        multimask = bool(multimask)
        key = ("decode", multimask) + tuple(tuple(x.shape) for x in inputs)

        def fn(embedding, points, labels, mask_logits=None):
            return self._decode(embedding, points, labels, mask_logits, multimask)
        return self._run(key, fn, inputs, tf32=self.tf32)

    def warm_up(self, max_points: int = 4) -> None:
        """Capture the encoder and the single-mask decoder for 1..max_points points
        (with a mask prompt) now, so the first clicks replay."""
        if not self.graphs:
            return
        cfg = self.model.config
        s, g = cfg.encoder.img_size, cfg.image_embedding_size
        embedding = self.encode(torch.zeros(1, cfg.encoder.in_chans, s, s, s))
        mask = torch.zeros(1, 1, 4 * g, 4 * g, 4 * g, device=self.device)
        for n in range(1, max_points + 1):
            self.decode(embedding, torch.full((1, n, 3), s / 2), torch.ones(1, n), mask)

    def release(self) -> None:
        """Free the captured graphs and their memory pool."""
        self._captured.clear()
        self._pool = None
