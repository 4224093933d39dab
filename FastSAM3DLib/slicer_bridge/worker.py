"""One persistent worker thread for engine calls (model load, embedding, decoding).

PyTorch keeps per-thread state (cuDNN plans, autocast caches), so warm-up and
every later call run on the same thread. The worker never touches MRML or Qt:
it returns ``concurrent.futures.Future`` objects that the main thread polls
(e.g. with a QTimer) before writing results into the scene.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class EngineWorker:
    def __init__(self, name: str = "FastSAM3D-engine"):
        self._name = name
        self._executor = None

    def submit(self, fn, *args, **kwargs) -> Future:
        """Queue ``fn(*args, **kwargs)``; calls run one at a time, in order."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None
