"""`core.prefetch.read_ahead`: the same items in the same order as a plain loop, produced concurrently one item ahead
and no further, errors raised where a plain loop would raise them, and no thread left behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from prunecli.core.prefetch import read_ahead


class Item:
    """Counts the instances alive (the stand-in for a matrix in memory)."""

    alive = 0
    most = 0

    def __init__(self, index: int) -> None:
        self.index = index
        Item.alive += 1
        Item.most = max(Item.most, Item.alive)

    def __del__(self) -> None:
        Item.alive -= 1


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prunecli-read-ahead"]


def test_same_items_in_order_and_the_thread_ends() -> None:
    assert list(read_ahead(iter(range(50)))) == list(range(50))
    assert list(read_ahead([])) == []
    assert not _reader_threads()


def test_one_item_ahead_and_no_further() -> None:
    Item.alive = Item.most = 0
    second_started = threading.Event()

    def produce() -> Iterator[Item]:
        for i in range(6):
            if i == 1:
                second_started.set()
            yield Item(i)

    seen = []
    for item in read_ahead(produce()):
        if item.index == 0:  # the next item is produced while the caller still works on this one
            assert second_started.wait(timeout=10)
        seen.append(item.index)
        del item  # as checkpoint_reports drops each matrix before asking for the next
    assert seen == list(range(6))
    assert Item.most == 2  # the caller's item and the next one, never a third


def test_an_error_surfaces_after_the_earlier_items() -> None:
    def produce() -> Iterator[int]:
        yield 0
        yield 1
        raise ValueError("tensor 2 is broken")

    got = []
    with pytest.raises(ValueError, match="tensor 2 is broken"):
        for x in read_ahead(produce()):
            got.append(x)
    assert got == [0, 1]
    assert not _reader_threads()


def test_leaving_early_stops_the_reader() -> None:
    produced = []

    def produce() -> Iterator[int]:
        for i in range(100):
            produced.append(i)
            yield i

    for x in read_ahead(produce()):
        if x == 3:
            break
    assert not _reader_threads()
    assert produced[-1] <= 4  # at most the one item beyond the last taken
