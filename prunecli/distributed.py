"""Data parallelism over the processes of `accelerate launch` / `torchrun`: shard the work, gather results exactly.

A run is multi-process when the launcher sets WORLD_SIZE > 1; accelerate's `PartialState` then joins the process
group (NCCL between GPUs, gloo on CPUs) and gives each process its device. Each process loads the whole model and
takes a share of the work:
- `Workers.map`: a contiguous slice of a list (prompt/target pairs, windows, examples); the per-item results are
  gathered to every process and concatenated in rank order, i.e. in the original order, so metrics are computed over
  exactly the items, in exactly the order, of a single-process run.
- `Workers.owns`: every W-th element of a stream (batches of a corpus read once by each process).
- `Workers.sum`: sums (float64 moments, int64 counts) added over processes.
Only the main process (rank 0) writes files and prints; the others stay quiet. A single-process run never touches
torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from prunecli.errors import PruneCliError
from prunecli.progress import Progress, no_progress

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes of a run (rank 0 of 1 when not launched in parallel)."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None  # the launcher's device for this process (cuda:LOCAL_RANK, or cpu)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, end) of this process's contiguous share of n items (shares differ in size by at most one)."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def share(self, n: int) -> int:
        start, end = self.bounds(n)
        return end - start

    def progress(self, progress: Progress) -> Progress:
        """What this process reports of a task: in a parallel run the main process counts its own share (and says
        so), the others report nothing."""
        if not self.parallel:
            return progress
        if not self.is_main:
            return no_progress
        return lambda description, total=None: progress(f"{description} [process 1 of {self.world_size}]",
                                                         None if total is None else self.share(int(total)))

    def map(self, fn: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
        """`fn` (a list of items -> one result per item) on this process's share; all results, in item order."""
        start, end = self.bounds(len(items))
        mine = list(fn(list(items[start:end])))
        if len(mine) != end - start:
            raise RuntimeError(f"sharded work returned {len(mine)} results for {end - start} items")
        if not self.parallel:
            return mine
        import torch.distributed as dist

        parts: list[list[R] | None] = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        return [r for part in parts for r in (part or [])]

    def owns(self, index: int) -> bool:
        """Whether element `index` of a stream is this process's (round robin)."""
        return index % self.world_size == self.rank

    def sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over processes (exact for integers; float64 sums differ from one process's only in
        the order of additions)."""
        if not self.parallel:
            return list(tensors)
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"
        where = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        out = []
        for t in tensors:
            moved = t.to(where, copy=True)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            out.append(moved.to(t.device))
        return out

    def resolve_device(self, name: str) -> str:
        """In a parallel run, `auto` and a bare `cuda` mean this process's own GPU, not every process on GPU 0."""
        if self.parallel and self.device is not None and name in ("auto", "cuda"):
            return self.device
        return name


SINGLE = Workers()


def launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise PruneCliError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


@contextlib.contextmanager
def workers(device: str = "auto", device_map: str | None = None) -> Iterator[Workers]:
    """The processes of this run: joins the launcher's process group when WORLD_SIZE > 1, and leaves it after.

    `device` is the command's --device: with `cpu` (or no GPU) the processes talk over gloo on the CPU.
    """
    if launched_world_size() <= 1:
        yield SINGLE
        return
    if device_map is not None:
        raise PruneCliError("--device-map splits one model over devices; a parallel run (accelerate launch) holds one "
                            "whole model per process: use one or the other")
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    device_name = "cpu" if state.device.type == "cpu" else str(state.device)
    try:
        yield Workers(state.process_index, state.num_processes, device_name)
        _leave_together(state.process_index, state.num_processes)
    finally:
        state.destroy_process_group()


def _leave_together(rank: int, world_size: int) -> None:
    """Return only when no process's group can still be talking to another, so tearing it down aborts no peer.

    A barrier alone is not enough: gloo lets a process leave a barrier while its last message to a peer is still
    queued, and destroying its group then closes that connection under the peer, which aborts (SIGABRT) with
    "connection closed by peer" (gloo issue 155: barrier followed by context destruction). So after the barrier every
    process says so through the launcher's key-value store (not through gloo) and waits until all have: by then every
    barrier message has been received. The store's server lives in process 0, so process 0 also waits until the
    others have read that, and leaves last.
    """
    import torch.distributed as dist

    dist.barrier()
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store; no public accessor exists
    if store.add("prunecli/left-barrier", 1) == world_size:
        store.set("prunecli/all-left-barrier", "1")
    store.wait(["prunecli/all-left-barrier"])
    if rank != 0:
        if store.add("prunecli/released", 1) == world_size - 1:
            store.set("prunecli/all-released", "1")
    elif world_size > 1:
        store.wait(["prunecli/all-released"])
