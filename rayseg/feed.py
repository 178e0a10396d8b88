"""The training feed: batches of augmented pairs, made by a background thread while the training step runs.

Augmentation is OpenCV and numpy, which release the GIL, so the thread overlaps the step even on the one CPU a
Ray Train worker has. On CUDA the thread also puts each batch in pinned memory, so the step's copy to the GPU is
asynchronous (`non_blocking=True`). Plain Python and torch, tested without Ray.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from rayseg.augment import augment

DEPTH = 2  # batches made ahead: one in the step's hands, one ready; more only holds memory


class _Failed:
    """What the producer raised, as the queue carries it: told apart from any item."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Prefetch:
    """Iterate `items` on a background thread, at most `depth` items ahead of the consumer.

        with Prefetch(batches) as ahead:
            for batch in ahead:
                ...

    An exception raised by `items` is raised again in the consumer, in order, after the items before it. Leaving
    the `with` block, by the end, a break or an exception in the consumer, stops the thread, closes `items` on it
    and waits for it: no thread outlives the block.
    """

    def __init__(self, items: Iterable, depth: int = DEPTH):
        self.items, self.queue, self.stop = items, queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._produce, name="rayseg-prefetch", daemon=True)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        it = iter(self.items)
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Failed(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Iterator:
        self.thread.start()
        return self._consume()

    def _consume(self) -> Iterator:
        while (item := self.queue.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def augmented_batches(batches: Iterable[dict], inputs, size: int, rng: np.random.Generator, fill: tuple[float, ...],
                      pin: torch.device | None = None, geometry: str = "resize",
                      foreground: float = 0.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images N,H,W,C, masks N,H,W) tensors of each batch of labelled rows (`image`, `dtype`, `target`), each pair
    prepared by `inputs` (rayseg.intensity.Inputs) and augmented with `rng` in row order (`geometry` and
    `foreground`: rayseg.augment's). With `pin` (a CUDA device) the tensors are in pinned memory, ready for an
    asynchronous copy to it."""
    if pin is not None:
        torch.cuda.set_device(pin)  # a new thread's current device is GPU 0, whose context this rank must not create
    for batch in batches:
        pairs = [augment(inputs.one(im, dt), m, size, rng, fill=fill, geometry=geometry, foreground=foreground)
                 for im, dt, m in zip(batch["image"], batch["dtype"], batch["target"])]
        images, masks = (torch.from_numpy(np.stack([p[i] for p in pairs])) for i in (0, 1))
        yield (images.pin_memory(), masks.pin_memory()) if pin is not None else (images, masks)
