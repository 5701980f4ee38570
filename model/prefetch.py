"""An iterator's items computed ahead in a background thread, so producing and consuming overlap.

Used by the checkpoint writer: the next tensor is generated (on a GPU or the CPU; torch releases the
interpreter lock inside its operators) while the current one is written to disk.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_ITEM, _END, _ERROR = "item", "end", "error"


@contextlib.contextmanager
def prefetched(items: Iterator[T], depth: int) -> Iterator[Iterator[T]]:
    """Within the context, an iterator over `items`, which a background thread computes up to `depth`
    items ahead. An exception raised computing an item is raised where that item would be yielded.
    Leaving the context, normally or by an error, stops the thread after the item it is computing and
    waits for it; items not yet consumed are dropped."""
    if depth < 1:
        raise ValueError(f"depth: got {depth}; allowed: a positive integer")
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                slots.put((_ITEM, item))
                if stop.is_set():
                    return
            slots.put((_END, None))
        except BaseException as err:  # handed to the consumer, raised there
            slots.put((_ERROR, err))

    def consume() -> Iterator[T]:
        while True:
            kind, value = slots.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        while thread.is_alive():  # take items until it ends, so a producer blocked on a full queue sees the stop
            with contextlib.suppress(queue.Empty):
                slots.get(timeout=0.05)
