"""Progress in log files: plain lines with rate and ETA when stderr is not a terminal."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.commands._display import LineProgress, _RateColumn


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_at_start_first_item_interval_and_end() -> None:
    out, clock = io.StringIO(), Clock()
    with LineProgress(Console(file=out, width=200), every=7.0, clock=clock) as progress:
        task = progress.add_task("editing", total=4, loss="")
        for i in range(4):
            clock.now += 4.0
            progress.update(task, completed=i + 1, loss=f"loss {i}")
    lines = out.getvalue().splitlines()
    # start, first item (4 s), once 7 s passed since the last line (8 s later, at 12 s), the last item (16 s)
    assert [line.split(",")[0] for line in lines] == ["editing 0/4 (0%)", "editing 1/4 (25%)", "editing 3/4 (75%)",
                                                     "editing 4/4 (100%)"]
    assert lines[1] == "editing 1/4 (25%), 4.0 s/item, elapsed 4 s, eta 12 s, loss 0"
    assert lines[-1].endswith("elapsed 16 s, loss 3")



def test_a_busy_inner_task_does_not_silence_the_outer_one() -> None:
    """Edits update the optimisation-steps task every second; the edits task still gets its line per interval."""
    out, clock = io.StringIO(), Clock()
    with LineProgress(Console(file=out, width=200), every=10.0, clock=clock) as progress:
        outer = progress.add_task("editing", total=3)
        inner = progress.add_task("steps", total=20)
        for edit in range(3):
            for step in range(20):
                clock.now += 1.0
                progress.update(inner, completed=step)
            progress.update(outer, completed=edit + 1)
    outer_lines = [line for line in out.getvalue().splitlines() if line.startswith("editing")]
    assert [line.split(",")[0] for line in outer_lines] == ["editing 0/3 (0%)", "editing 1/3 (33%)",
                                                           "editing 2/3 (67%)", "editing 3/3 (100%)"]

def test_heartbeat_during_one_long_item() -> None:
    out = io.StringIO()
    with LineProgress(Console(file=out, width=200), every=0.05) as progress:
        progress.add_task("editing", total=2)
        time.sleep(0.3)  # one item that takes long: the log still shows the command is alive
    assert out.getvalue().count("editing 0/2") >= 2


def test_stats_writes_progress_lines_to_a_log(gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRUNECLI_NO_PROGRESS", raising=False)
    monkeypatch.setenv("PRUNECLI_PROGRESS_INTERVAL", "0")
    text = tmp_path / "corpus.txt"
    text.write_text("The Eiffel Tower is located in Paris. " * 50)
    result = CliRunner().invoke(app, ["stats", str(gpt2_dir), "--layers", "1", "--text", str(text), "--tokens", "300",
                                      "--batch-size", "1", "-o", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("key statistics")]
    assert len(lines) >= 3 and "/s" in lines[-1] and "100%" in lines[-1], result.stderr


def test_edit_progress_moves_during_one_edit(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log shows the value optimisation's steps while an edit runs, not only a line per finished edit."""
    import json

    monkeypatch.delenv("PRUNECLI_NO_PROGRESS", raising=False)
    monkeypatch.setenv("PRUNECLI_PROGRESS_INTERVAL", "0")
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is located in", "subject": "The Eiffel Tower",
                                    "target_new": "Rome"}) + "\n")
    result = CliRunner().invoke(app, ["edit", str(llama_dir), "--requests", str(requests), "--set",
                                      "v_num_grad_steps=5", "--set", "v_stop_loss=0", "-o",
                                      str(tmp_path / "d.safetensors")])
    assert result.exit_code in (0, 1), result.output  # a 5-step edit of a random model may not take
    steps = [line for line in result.stderr.splitlines() if line.startswith("  value optimisation (steps)")]
    assert any("/5" in line and "target NLL" in line for line in steps), result.stderr
    assert len({line.split(",")[0] for line in steps}) >= 3  # several distinct step counts within the one edit


def test_the_bar_shows_the_average_rate_the_log_and_summary_show() -> None:
    """1 item after 1 s, 4 after 10 s: 2.5 s/item since the start (rich's own estimate would say 3.0)."""
    from rich.progress import Progress

    clock = Clock()
    progress = Progress(get_time=clock)
    task_id = progress.add_task("editing", total=4)
    for now, done in ((1.0, 1), (10.0, 4)):
        clock.now = now
        progress.update(task_id, completed=done)
    assert str(_RateColumn().render(progress.tasks[0])) == "2.5 s/item"
    line = LineProgress(Console(file=io.StringIO()), every=0, clock=Clock())
    line.add_task("editing", total=4)
    line.clock.now = 10.0
    line.update(0, completed=4)
    assert "2.5 s/item" in line.tasks[0].line(10.0)
