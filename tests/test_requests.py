"""Bad edit requests are one line that says where (JSONL: the line an editor shows, 1-based; a JSON list: the record
number --start counts, 0-based) and what is missing, for the format the record most resembles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunecli.errors import PruneCliError
from prunecli.requests import load_requests

GOOD = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(PruneCliError) as caught:
        load_requests(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("record", "says"), [
    ({"prompt": GOOD["prompt"], "subject": "Danielle Darrieux", "ground_truth": "French"},
     "missing target_new (a CounterFact record needs prompt, subject, target_new)"),
    ({"prompt": GOOD["prompt"], "subject": "Danielle Darrieux"},
     "missing target_new (a minimal record needs prompt, subject, target_new)"),
    ({"src": "What is the mother tongue of Danielle Darrieux?", "subject": "Danielle Darrieux", "answers": ["French"]},
     "missing alt (a zsRE record needs src, subject, alt)"),
    ({"question": "Who?", "answer": "Me"}, "unknown record format: expected CounterFact"),
])
def test_the_missing_fields_of_the_resembled_format_are_named(tmp_path: Path, record: dict, says: str) -> None:
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(record) + "\n")  # a blank line: record 1 is line 3
    message = _error(jsonl)
    assert message.startswith(f"{jsonl}: line 3: {says}")
    listed = tmp_path / "r.json"
    listed.write_text(json.dumps([GOOD, GOOD, record], indent=2))
    assert _error(listed).startswith(f"{listed}: record 2: ")
    assert load_requests(listed, limit=2)[1].subject == "Danielle Darrieux"  # the bad record is not read


def test_jsonl_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "x",\n')
    assert _error(path).startswith(f"{path}: line 2 is not JSON (")
    listed = tmp_path / "r.json"
    listed.write_text("[" + json.dumps(GOOD) + ",]")
    assert _error(listed).startswith(f"{listed} is not valid JSON: ")


def test_skipped_records_are_reported_with_where_and_why(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [GOOD, {"prompt": "p {}", "subject": "s"}, GOOD]) + "\n")
    skipped: list[tuple[int, str]] = []
    kept = load_requests(path, on_invalid=lambda i, why: skipped.append((i, why)))
    assert [r.index for r in kept] == [0, 2]
    assert skipped == [(1, "line 2: missing target_new (a minimal record needs prompt, subject, target_new)")]
