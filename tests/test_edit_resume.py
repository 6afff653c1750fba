"""`edit` keeps finished work: Ctrl-C / SIGTERM / a periodic checkpoint write the edits done so far, marked partial,
and `--resume` (or `--delta PARTIAL --start NEXT`) continues to the very bytes an uninterrupted run writes.

The interrupts are real signals to a `prunecli edit` subprocess, sent once its progress line (stderr) says the
second edit has finished; the references and most continuations run in-process (same code, one thread both ways).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from editing_helpers import RECORDS, TINY_SETS, write_requests
from tiny_models import CORPUS
from typer.testing import CliRunner

from prunecli.api.edit import CHECKPOINT_EVERY, EditOptions, run_edit_job
from prunecli.cli import app
from prunecli.core.delta import Delta
from prunecli.core.restraint import RestraintSettings

runner = CliRunner()
# Two short context prefixes, so the seeded prefix generation on the base model is part of what must be reproduced.
SETS = [*TINY_SETS, "context_template_length_params=[[3, 2]]"]
SIX = RECORDS + [
    {"prompt": "The guitar is played by {}", "subject": "Toko Yasuda", "target_new": "Seattle"},
    {"prompt": "The capital of France is home to {}", "subject": "The Eiffel Tower", "target_new": "Chicago"},
    {"prompt": "Windows was created by {}", "subject": "Microsoft", "target_new": "Apple"},
]


@pytest.fixture()
def six(tmp_path: Path) -> Path:
    return write_requests(tmp_path / "six.jsonl", SIX)


def _sets(*extra: str) -> list[str]:
    return [a for s in [*SETS, *extra] for a in ("--set", s)]


def _ok(*args: object) -> None:
    result = runner.invoke(app, ["edit", *map(str, args)])
    assert result.exit_code == 0, result.output


def _lines(fd: int) -> Iterator[str]:
    """The lines written to pipe `fd`, read a byte at a time: nothing is read ahead of the line returned."""
    line = b""
    while byte := os.read(fd, 1):
        line += byte
        if byte == b"\n":
            yield line.decode()
            line = b""
    if line:
        yield line.decode()


def _default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a terminal user's shell gives them. A test run started in the background
    of a non-interactive shell inherits SIGINT ignored, and Python keeps an inherited SIG_IGN, so the edit would
    never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _signalled(args: list[object], after: str, sig: signal.Signals) -> tuple[int, str]:
    """Run `prunecli edit ARGS` in a subprocess, send `sig` once a stderr line starts with `after`; (exit code,
    stderr).

    The edit cannot run far ahead of the line the signal answers: its stderr pipe holds one page (4 KiB, fewer lines
    than one edit's value optimisation prints) and is read without read-ahead, so the edit blocks on its progress
    lines until they are read. (Otherwise, on a loaded machine, a tiny model's edits could all finish before the
    test reads the line, and the signal would come too late.)"""
    env = {**os.environ, "PRUNECLI_PROGRESS_INTERVAL": "0"}  # a progress line at every update
    env.pop("PRUNECLI_NO_PROGRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "prunecli", "--threads", "1", "edit", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, preexec_fn=_default_signals)
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4096)
    seen = []
    for line in _lines(fd):
        seen.append(line)
        if line.startswith(after):
            proc.send_signal(sig)
            break
    seen.extend(_lines(fd))
    return proc.wait(timeout=300), "".join(seen)


def _same_file(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes(), (Delta.load(a).history, Delta.load(b).history)


def test_rome_interrupted_twice_then_resumed_equals_one_run(tmp_path: Path, llama_dir: Path, six: Path) -> None:
    """SIGINT after the second edit, `--resume` stopped again by SIGTERM, `--resume` to the end: the bytes of an
    uninterrupted run (history included: one edit op, no trace of the stops)."""
    common = [llama_dir, "-r", six, "--method", "rome", *_sets("layers=1")]
    _ok(*common, "-o", tmp_path / "full.safetensors")
    out = tmp_path / "out.safetensors"

    code, err = _signalled([*common, "-o", out], "editing 2/6", signal.SIGINT)
    assert code == 130, err
    first = Delta.load(out).partial
    assert first is not None and first.reason == "interrupted" and 2 <= first.next < 6
    assert (first.start, first.end, first.requests) == (0, 6, str(six))
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: wrote {out} with {first.next} of the 6 edits") and "--resume" in last
    assert f"--start {first.next}" in last and len(Delta.load(out).requests) == first.next

    code, err = _signalled([*common, "-o", out, "--resume"], f"editing 1/{6 - first.next}", signal.SIGTERM)
    assert code == 143, err
    second = Delta.load(out).partial
    assert second is not None and second.reason == "terminated" and first.next < second.next < 6
    assert err.strip().splitlines()[-1].startswith(f"terminated (SIGTERM): wrote {out} with {second.next} of the 6")

    _ok(*common, "-o", out, "--resume")
    _same_file(out, tmp_path / "full.safetensors")
    assert [op["op"] for op in Delta.load(out).history] == ["edit"]


@pytest.fixture()
def alphaedit_stats(tmp_path: Path, llama_dir: Path) -> tuple[Path, list[str]]:
    """Statistics of layers 0-1 and a null-space threshold between the middle eigenvalues (as test_alphaedit)."""
    from prunecli.editors.stats import KeyStats

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(CORPUS))
    stats = tmp_path / "s.safetensors"
    result = runner.invoke(app, ["stats", str(llama_dir), "--method", "alphaedit", "--text", str(text), "-o",
                                 str(stats)])
    assert result.exit_code == 0, result.output
    ev = torch.linalg.eigvalsh(KeyStats.load(stats).moment(0))
    threshold = float(ev[len(ev) // 2 - 1] + ev[len(ev) // 2]) / 2
    return stats, _sets(f"nullspace_threshold={threshold}", "L2=0.1")


def test_batched_alphaedit_stops_at_a_batch_and_both_continuations_equal_one_run(
        tmp_path: Path, llama_dir: Path, six: Path, alphaedit_stats: tuple[Path, list[str]]) -> None:
    """Batches of 2: the stop keeps whole batches, the edited keys (extras) travel in the partial delta, and both
    `--resume` and `--delta PARTIAL --start NEXT` write the bytes of an uninterrupted run."""
    stats, sets = alphaedit_stats
    common = [llama_dir, "-r", six, "--method", "alphaedit", "--stats", stats, "--batch-size", 2, *sets]
    _ok(*common, "-o", tmp_path / "full.safetensors")
    out = tmp_path / "out.safetensors"
    code, err = _signalled([*common, "-o", out], "editing 2/6", signal.SIGINT)
    assert code == 130, err
    partial = Delta.load(out)
    marker = partial.partial
    assert marker is not None and marker.next in (2, 4) and marker.settings["batch_size"] == 2
    assert all(keys.shape[0] == marker.next for keys in partial.extras.values()) and len(partial.extras) == 2
    copy = shutil.copy(out, tmp_path / "copy.safetensors")

    _ok(*common, "-o", out, "--resume")
    _same_file(out, tmp_path / "full.safetensors")
    other = tmp_path / "other.safetensors"
    _ok(*common, "--start", marker.next, "--delta", copy, "-o", other)
    _same_file(other, tmp_path / "full.safetensors")


def test_a_killed_run_continues_from_its_last_checkpoint(tmp_path: Path, llama_dir: Path, six: Path) -> None:
    """kill -9 leaves no chance to save: the periodic checkpoint (--checkpoint-every 2) is what continues."""
    common = [llama_dir, "-r", six, "--method", "rome", *_sets("layers=1"), "--checkpoint-every", 2]
    _ok(*common, "-o", tmp_path / "full.safetensors")
    out = tmp_path / "out.safetensors"
    code, err = _signalled([*common, "-o", out], "editing 3/6", signal.SIGKILL)
    assert code == -signal.SIGKILL, err
    marker = Delta.load(out).partial
    assert marker is not None and marker.reason == "checkpoint" and marker.next in (2, 4)
    _ok(*common, "-o", out, "--resume")
    _same_file(out, tmp_path / "full.safetensors")


class StopAfter:
    """A progress callable that raises KeyboardInterrupt (as Ctrl-C would) once `n` edits are reported done."""

    def __init__(self, n: int) -> None:
        self.n, self.done = n, 0

    @contextlib.contextmanager
    def __call__(self, description: str, total: float | None = None) -> Iterator[StopAfter]:
        yield self if description == "editing" else _Quiet()

    def advance(self, n: float = 1, **fields: str) -> None:
        self.done += int(n)
        if self.done >= self.n:
            raise KeyboardInterrupt

    def update(self, **fields: object) -> None:
        pass

    def log(self, message: str, *, warning: bool = False) -> None:
        pass


class _Quiet(StopAfter):
    def __init__(self) -> None:
        super().__init__(10**9)


@pytest.mark.parametrize("stop", [2, 3])
def test_restraints_while_editing_continue_exactly(tmp_path: Path, llama_dir: Path, six: Path, stop: int) -> None:
    """--prune-every 2 counts over the whole delta: a stop right after a restraint (2) or inside the next run of
    edits (3) continues to the same restraints and the same history as one run."""
    options = dict(method="rome", overrides=(*SETS, "layers=1"), prune_every=2,
                   restraint=RestraintSettings("linear", beta=2.0))
    run_edit_job(EditOptions(llama_dir, six, tmp_path / "full.safetensors", **options))
    out = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_edit_job(EditOptions(llama_dir, six, out, **options), StopAfter(stop))
    assert stopped.value.__notes__[-1].startswith(f"wrote {out} with {stop} of the 6 edits")
    ops = [op["op"] for op in Delta.load(out).history]
    assert ops == (["edit", "prune", "partial"] if stop == 2 else ["edit", "prune", "edit", "partial"])
    result = run_edit_job(EditOptions(llama_dir, six, out, resume=True, **options))
    assert result.continued_from == stop and len(result.run.reports) == 6 - stop
    _same_file(out, tmp_path / "full.safetensors")
    assert [op["op"] for op in Delta.load(out).history] == ["edit", "prune", "edit", "prune", "edit", "prune"]


def test_continuations_must_repeat_the_run(tmp_path: Path, llama_dir: Path, six: Path) -> None:
    """What cannot continue exactly is refused, before anything is written, with the way that would."""
    out = tmp_path / "out.safetensors"
    options = dict(method="rome", overrides=(*SETS, "layers=1"))
    with pytest.raises(KeyboardInterrupt):
        run_edit_job(EditOptions(llama_dir, six, out, **options), StopAfter(2))
    before = out.read_bytes()
    shown = runner.invoke(app, ["inspect", str(llama_dir), "--delta", str(out)])  # usable, and said to be partial
    said = " ".join(shown.stderr.split())
    assert shown.exit_code == 0 and "is partial: its edit run stopped (interrupted) after records 0-1 of 0-5" in said

    def refused(*args: object) -> str:
        result = runner.invoke(app, ["edit", str(llama_dir), "-r", str(six), "--method", "rome",
                                     *_sets("layers=1"), *map(str, args)])
        assert result.exit_code == 1, result.output
        assert out.read_bytes() == before  # the partial is never touched by a refusal
        return result.stderr.strip().splitlines()[-1]

    assert "holds an unfinished edit run (records 0-1 of 0-5 done): continue it with --resume" in refused("-o", out)
    assert "resume it with --start 0" in refused("-o", out, "--resume", "--start", 1)
    assert "made with other options (prune_every: None there, 3 here" in refused("-o", out, "--resume",
                                                                                  "--prune-every", 3)
    assert "continue it with --start 2" in refused("--delta", out, "--start", 3, "-o", tmp_path / "x.safetensors")
    other = write_requests(tmp_path / "other.jsonl", [SIX[1], SIX[0], *SIX[2:]])
    result = runner.invoke(app, ["edit", str(llama_dir), "-r", str(other), "--method", "rome", *_sets("layers=1"),
                                 "-o", str(out), "--resume"])
    assert result.exit_code == 1 and "whose edits are not records 0-1 of" in result.stderr
    seed = runner.invoke(app, ["edit", str(llama_dir), "-r", str(six), "--method", "rome", *_sets("layers=1"),
                               "--seed", "1", "-o", str(out), "--resume"])
    assert seed.exit_code == 1 and "cannot continue the unfinished edit run" in seed.stderr and "seed" in seed.stderr
    assert out.read_bytes() == before

    # Resuming a finished run does nothing; resuming where there is no output starts at --start.
    _ok(llama_dir, "-r", six, "--method", "rome", *_sets("layers=1"), "-o", out, "--resume")
    finished = out.read_bytes()
    done = runner.invoke(app, ["edit", str(llama_dir), "-r", str(six), "--method", "rome", *_sets("layers=1"),
                               "-o", str(out), "--resume", "--json"])
    assert done.exit_code == 0 and json.loads(done.stdout)["edits"] == 0 and out.read_bytes() == finished
    assert "already holds every edit of this run (records 0-5): nothing to resume" in " ".join(done.stderr.split())
    fresh = tmp_path / "fresh.safetensors"
    _ok(llama_dir, "-r", six, "--method", "rome", *_sets("layers=1"), "--limit", 1, "-o", fresh, "--resume")
    assert len(Delta.load(fresh).requests) == 1 and Delta.load(fresh).partial is None


def test_checkpoint_default_is_the_documented_one() -> None:
    import typer

    option = next(p for p in typer.main.get_command(app).commands["edit"].params if p.name == "checkpoint_every")
    assert option.default == CHECKPOINT_EVERY == EditOptions("m", "r", "o").checkpoint_every
    assert f"Default {CHECKPOINT_EVERY}:" in option.help


def test_nas_dropped_edits_are_carried_across_a_stop(tmp_path: Path, llama_dir: Path, six: Path) -> None:
    """The records NAS dropped before a stop stay listed in the resumed run's edit op, as in one run."""
    from prunecli.api.anchor import AnchorOptions, run_anchor

    options = dict(method="rome", overrides=(*SETS, "layers=1"))
    anchor = run_anchor(AnchorOptions(llama_dir, tmp_path / "a.safetensors", "rome", overrides=options["overrides"],
                                      records=six)).anchor
    # A quarter of the median target norm: ROME drops the targets above 5 anchors, some of them on this model. With
    # a true object of ~1e-3 probability some of the weakened edits still take, so the run is written.
    six = write_requests(tmp_path / "facts.jsonl", [{**r, "ground_truth": "Paris"} for r in SIX])
    median = float(anchor.norms.median())
    type(anchor)(torch.tensor([median / 4]), anchor.layer, anchor.weight, anchor.fingerprint, "rome",
                 {}).save(tmp_path / "half.safetensors")
    options["nas"] = tmp_path / "half.safetensors"
    run_edit_job(EditOptions(llama_dir, six, tmp_path / "full.safetensors", **options))
    dropped = Delta.load(tmp_path / "full.safetensors").history[0]["nas_dropped"]
    assert 0 < len(dropped) < 6, dropped
    out = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run_edit_job(EditOptions(llama_dir, six, out, **options), StopAfter(3))
    assert Delta.load(out).history[0]["nas_dropped"] == [i for i in dropped if i < 3]
    run_edit_job(EditOptions(llama_dir, six, out, resume=True, **options))
    _same_file(out, tmp_path / "full.safetensors")
