"""Issue 11, crash safety: a folder replacement killed with SIGKILL at any instant leaves the complete old or the
complete new output at the path, and the next run removes what the killed one left; two writers without --force
cannot both succeed; SIGTERM/SIGINT clean up and say truthfully what is on disk."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import prunecli.core.atomic as atomic
from prunecli.core.applying import apply_deltas
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.errors import PruneCliError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
NAME = "model.layers.0.mlp.down_proj.weight"


def leftovers(folder: Path, name: str) -> list[str]:
    """Hidden temporary siblings of output `name` (of any writer, this one's naming or not)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def temp(folder: Path, pid: int, token: str, kind: str) -> Path:
    """A temporary name as the writer with process id `pid` on this host would make it."""
    return folder / f".out.prunecli-{atomic._host()}-{pid}-{token}.{kind}"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ kill -9
@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ~100 MB checkpoint folder and two deltas of it (versions A and B of an output)."""
    root = tmp_path_factory.mktemp("big")
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({NAME: torch.randn(5000, 5000, generator=torch.Generator().manual_seed(0))}, base / "model.safetensors")
    ck = Checkpoint(base)
    paths = {"base": base, "root": root}
    for i, version in enumerate("AB"):
        delta = Delta.for_base(ck)
        gen = torch.Generator().manual_seed(i + 1)
        delta.add(NAME, DeltaEntry.lowrank(torch.randn(5000, 1, generator=gen), torch.randn(5000, 1, generator=gen),
                                           "out_in"), ck)
        delta.save(root / f"{version}.safetensors")
        paths[version] = root / f"{version}.safetensors"
    return paths


def fork_writer(big: dict[str, Path], version: str, out: Path) -> int:
    """A child process (forked: no interpreter start-up per trial) replacing `out` by base + `version`."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            apply_deltas(Checkpoint(big["base"]), Delta.load(big[version]), out, force=True,
                         provenance=[str(big[version])])
            code = 0
        finally:
            os._exit(code)
    return pid


@pytest.mark.slow
def test_kill_9_during_folder_replacement_never_loses_the_output(big: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    expected, durations = {}, []
    for version in "AB":  # the two complete outputs, and how long one forked replacement takes from start to exit
        ref = tmp_path / f"ref-{version}"
        apply_deltas(Checkpoint(big["base"]), Delta.load(big[version]), ref, provenance=[str(big[version])])
        expected[file_hash(ref / "model.safetensors")] = version
        started = time.perf_counter()
        assert os.waitpid(fork_writer(big, version, ref), 0)[1] == 0
        durations.append(time.perf_counter() - started)
    duration = max(durations)
    os.rename(tmp_path / "ref-A", out)
    current, rng, outcomes = "A", random.Random(11), {"old": 0, "new": 0}
    for _ in range(20):
        target = "B" if current == "A" else "A"
        pid = fork_writer(big, target, out)
        time.sleep(rng.uniform(0.0, duration * 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # At every instant the path holds one complete version: every file there, the shard byte-identical.
        assert sorted(p.name for p in out.iterdir()) == [atomic.MARKER, "config.json", "model.safetensors"]
        found = expected.get(file_hash(out / "model.safetensors"))
        assert found in ("A", "B")
        outcomes["new" if found == target else "old"] += 1
        current = found
    # The next run that writes beside the output removes everything the killed runs left behind.
    pid = fork_writer(big, "B" if current == "A" else "A", out)
    assert os.waitpid(pid, 0)[1] == 0
    assert leftovers(tmp_path, "out") == []
    print(f"kill -9 outcomes over 20 trials: {outcomes}")


@pytest.mark.slow
def test_sigterm_and_ctrl_c_clean_up_and_say_nothing_was_written(big: dict[str, Path], tmp_path: Path) -> None:
    for sig, code, words in ((signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")):
        out = tmp_path / f"out-{code}"
        proc = subprocess.Popen([sys.executable, "-m", "prunecli", "apply", str(big["base"]), str(big["A"]), "-o",
                                 str(out)], stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not leftovers(tmp_path, out.name) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate()
        if proc.returncode == 0:
            pytest.skip("the write finished before the signal arrived")
        assert proc.returncode == code, err
        # The base of this test has no tokenizer: apply's warning about that may come first; nothing else may.
        lines = [line for line in err.strip().splitlines() if "has no tokenizer files" not in line]
        assert lines == [f"{words}: no output was written"], err
        assert not out.exists() and leftovers(tmp_path, out.name) == []


def test_interrupt_message_names_what_was_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from prunecli.commands._errors import run_guarded

    first = tmp_path / "first[1].txt"

    def body() -> None:
        with atomic.atomic_file(first) as tmp:
            tmp.write_text("done")
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        run_guarded(False, body)
    assert e.value.exit_code == 130
    assert f"{first} had been written completely" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- concurrent writers
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from prunecli.core.atomic import atomic_directory, atomic_file
    from prunecli.errors import PruneCliError
    kind, out, me, go = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    try:
        with (atomic_directory(out) if kind == "dir" else atomic_file(out)) as tmp:
            (tmp / "data" if kind == "dir" else tmp).write_text(me)
            (go.parent / f"ready-{me}").touch()
            while not go.exists():
                time.sleep(0.001)
    except PruneCliError as exc:
        print(exc)
        sys.exit(1)
""")


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_two_writers_without_force_cannot_both_succeed(tmp_path: Path, kind: str) -> None:
    for round_ in range(5):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        out, go = folder / "out", folder / "go"
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, kind, str(out), str(i), str(go)],
                                  stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT) for i in range(2)]
        deadline = time.monotonic() + 60
        while not all((folder / f"ready-{i}").exists() for i in range(2)) and time.monotonic() < deadline:
            time.sleep(0.005)
        go.touch()  # both passed the early "exists" check; both commit now
        results = [(p.wait(), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
        assert sorted(code for code, _ in results) == [0, 1], results
        loser = next(text for code, text in results if code == 1)
        assert "already exists" in loser
        winner = str(next(i for i, (code, _) in enumerate(results) if code == 0))
        assert (out / "data" if kind == "dir" else out).read_text() == winner
        assert leftovers(folder, "out") == []


# --------------------------------------------------------------------------- the journal fallback and cleaning
def test_swap_without_rename_exchange_and_its_recovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with atomic.atomic_directory(out) as tmp:
        (tmp / "v").write_text("old")
    monkeypatch.setattr(atomic, "_renameat2", lambda src, dest, flags: False)  # e.g. a filesystem without it
    with atomic.atomic_directory(out, force=True) as tmp:
        (tmp / "v").write_text("new")
    assert (out / "v").read_text() == "new" and leftovers(tmp_path, "out") == []

    # A run killed between the two renames: the journal says where both versions are; the next writer restores.
    pid = dead_pid()
    for present, expect in (("new", "new"), ("old", "old")):
        new, old = temp(tmp_path, pid, "aa", "tmp"), temp(tmp_path, pid, "bb", "old")
        (old if present == "old" else new).mkdir()
        ((old if present == "old" else new) / "v").write_text(expect)
        os.rename(out, tmp_path / "elsewhere")
        temp(tmp_path, pid, "cc", "swap").write_text(json.dumps({"target": "out", "new": new.name,
                                                                           "old": old.name}))
        with atomic.atomic_file(tmp_path / "neighbour") as tmp:
            tmp.write_text("x")
        assert (out / "v").read_text() == expect and leftovers(tmp_path, "out") == []
        (tmp_path / "neighbour").unlink()
        os.rename(tmp_path / "elsewhere", tmp_path / f"gone-{present}")


def test_leftovers_of_dead_processes_only_are_removed(tmp_path: Path) -> None:
    dead = temp(tmp_path, dead_pid(), "ab", "tmp")
    dead.mkdir()
    (dead / "big").write_bytes(b"x" * 1000)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = temp(tmp_path, sleeper.pid, "cd", "tmp")
        elsewhere = tmp_path / f".out.prunecli-otherhost-{dead_pid()}-ef.tmp"  # another machine's: never judged
        elsewhere.write_bytes(b"theirs")
        live.write_bytes(b"in progress")
        with atomic.atomic_file(tmp_path / "other") as tmp:
            tmp.write_text("x")
        assert not dead.exists() and live.exists() and elsewhere.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_commit_rechecks_what_it_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(PruneCliError, match="appeared while this run was writing"):
        with atomic.atomic_directory(out) as tmp:
            (tmp / "v").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("keep")
    assert [p.name for p in out.iterdir()] == ["theirs"] and leftovers(tmp_path, "out") == []
