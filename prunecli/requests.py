"""Edit requests: one normalised record type read from the formats users already have.

Accepted (JSON list or JSONL, one record per line):
- EasyEdit CounterFact: `prompt`, `subject`, `target_new`, `ground_truth`, `rephrase_prompt`, `locality_prompt`,
  `locality_ground_truth` (strings, or lists for the last four).
- zsRE (MEND format): `src`, `subject`, `alt`, `answers`, `rephrase`, `loc`, `loc_ans`.
- Minimal: `prompt` (with `{}` where the subject goes, or containing the subject), `subject`, `target_new`.

Targets are stored as given; where a model needs a leading space before the target (GPT-2/LLaMA tokenisers), the
scoring code adds it, so every editor and metric tokenises targets the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunecli.core.textio import STDIN, read_text
from prunecli.errors import PruneCliError


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit, with the prompts that evaluate it."""

    index: int  # record number in its file (0-based)
    prompt: str  # template: "{}" marks the subject, e.g. "The mother tongue of {} is"
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)  # full texts (subject filled in)
    locality_prompts: list[str] = field(default_factory=list)
    locality_answers: list[str] = field(default_factory=list)
    case_id: Any = None
    source_format: str = "minimal"  # counterfact | zsre | minimal

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"expected a string or a list of strings, got {type(value).__name__}")


def _template(prompt: Any, subject: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt is missing or empty")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("subject is missing or empty")
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise ValueError("prompt must contain '{}' exactly once")
        return prompt.replace("{", "{{").replace("}", "}}").replace("{{}}", "{}")
    if subject not in prompt:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    escaped = prompt.replace("{", "{{").replace("}", "}}")
    return escaped.replace(subject.replace("{", "{{").replace("}", "}}"), "{}", 1)


def _target(value: Any, what: str) -> str:
    if isinstance(value, dict):  # some EasyEdit dumps use {"str": "..."}
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is missing or empty")
    return value.strip()


def parse_record(rec: Any, index: int) -> EditRequest:
    """Normalise one record; raises ValueError with a short reason on a bad record."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "src" in rec and "alt" in rec:  # zsRE, MEND format
        answers = _as_list(rec.get("answers"))
        return EditRequest(index=index, prompt=_template(rec["src"], rec.get("subject")), subject=rec["subject"],
                           target_new=_target(rec["alt"], "alt"), target_true=answers[0] if answers else None,
                           rephrase_prompts=_as_list(rec.get("rephrase")), locality_prompts=_as_list(rec.get("loc")),
                           locality_answers=_as_list(rec.get("loc_ans")), case_id=rec.get("case_id", index),
                           source_format="zsre")
    if "prompt" in rec and "target_new" in rec:
        counterfact = "ground_truth" in rec or "rephrase_prompt" in rec or "locality_prompt" in rec
        truth = rec.get("ground_truth", rec.get("target_true"))
        loc_prompts = _as_list(rec.get("locality_prompt"))
        loc_answers = _as_list(rec.get("locality_ground_truth"))
        if len(loc_answers) == 1 and len(loc_prompts) > 1:
            loc_answers = loc_answers * len(loc_prompts)
        if loc_prompts and len(loc_answers) != len(loc_prompts):
            raise ValueError("locality_prompt and locality_ground_truth have different lengths")
        return EditRequest(index=index, prompt=_template(rec["prompt"], rec.get("subject")), subject=rec["subject"],
                           target_new=_target(rec["target_new"], "target_new"),
                           target_true=_target(truth, "ground_truth") if truth is not None else None,
                           rephrase_prompts=_as_list(rec.get("rephrase_prompt")), locality_prompts=loc_prompts,
                           locality_answers=loc_answers, case_id=rec.get("case_id", index),
                           source_format="counterfact" if counterfact else "minimal")
    raise ValueError("unknown record format: expected CounterFact (prompt, subject, target_new, ...), "
                     "zsRE (src, subject, alt, ...) or minimal (prompt, subject, target_new)")


def load_requests(path: str | os.PathLike[str], start: int = 0, limit: int | None = None,
                  on_invalid: Callable[[int, str], None] | None = None) -> list[EditRequest]:
    """Read records [start, start + limit) of a JSON list or JSONL file (`-`: standard input); any bad record is a clear error, unless
    `on_invalid(index, reason)` is given: then bad records are reported to it and skipped (bulk training data)."""
    path = Path(path)
    if str(path) != STDIN and not path.is_file():
        raise PruneCliError(f"requests file {path} does not exist")
    text = read_text(path, "requests file")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PruneCliError(f"{path} is neither a JSON list nor JSONL: {exc}") from exc
    except RecursionError:
        raise PruneCliError(f"{path}: its JSON is nested too deeply to be edit requests") from None
    if isinstance(records, dict):
        records = [records]
    end = len(records) if limit is None else min(len(records), start + limit)
    out = []
    for i in range(start, end):
        try:
            out.append(parse_record(records[i], i))
        except (ValueError, KeyError, TypeError) as exc:
            if on_invalid is None:
                raise PruneCliError(f"{path}: record {i}: {exc}") from None
            on_invalid(i, str(exc))
    if not out:
        raise PruneCliError(f"{path}: no requests in the selected range")
    return out
