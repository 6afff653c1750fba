"""Read ahead: produce the next item of a sequence in a background thread while the caller works on the current one.

`inspect` alternates reading a tensor (file I/O, dtype conversion) with decomposing it (BLAS/LAPACK); both release the
GIL, so a second thread overlaps them. The reader is kept one item ahead and no further: it starts producing item
k + 1 when the caller takes item k, and holds no item while it waits. So a caller that drops each item before asking
for the next (as `inspection.checkpoint_reports` does) never has more than two alive, the one it works on and the
next, whatever the length of the sequence. An exception raised while producing an item is raised in the caller when
it reaches that item, after every earlier item, as a sequential loop would raise it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def read_ahead(items: Iterable[T]) -> Iterator[T]:
    """The items of `items`, in order, produced by a background thread one item ahead of the caller.

    Leaving the loop early (break, an exception, closing the generator) stops the thread after the item it is
    producing; the thread never outlives the generator.
    """
    slot: queue.Queue[tuple[bool, T | BaseException | None]] = queue.Queue(maxsize=1)
    taken = threading.Semaphore(0)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                slot.put((True, item))
                del item  # held by the slot, then by the caller, not here
                taken.acquire()  # produce the next item only once the caller holds this one
                if stop.is_set():
                    return
            slot.put((False, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it in its own thread
            slot.put((False, exc))

    thread = threading.Thread(target=produce, name="prunecli-read-ahead", daemon=True)  # never blocks exit
    thread.start()
    try:
        while True:
            more, value = slot.get()
            if not more:
                if isinstance(value, BaseException):
                    raise value
                return
            taken.release()
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        taken.release()  # wakes a producer waiting for its last item to be taken; it then sees `stop`
        thread.join()  # the slot is empty whenever the producer puts (it waits for each item to be taken first)
