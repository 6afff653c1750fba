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
    raise ValueError(_missing_fields(rec))


# The formats a record may be in: the fields that identify each, and the ones it needs.
_FORMATS = (("CounterFact", {"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                             "locality_ground_truth"}, ("prompt", "subject", "target_new")),
            ("zsRE", {"src", "subject", "alt", "answers", "rephrase", "loc", "loc_ans"}, ("src", "subject", "alt")),
            ("minimal", {"prompt", "subject", "target_new"}, ("prompt", "subject", "target_new")))


def _missing_fields(rec: dict[str, Any]) -> str:
    """What a record that fits no format lacks, for the format it most resembles (most fields in common; minimal
    rather than CounterFact when it has none of CounterFact's own fields)."""
    def likeness(fmt: tuple[str, set[str], tuple[str, ...]]) -> tuple[int, bool]:
        return len(fmt[1] & rec.keys()), fmt[0] == "minimal"

    name, fields, required = max(_FORMATS, key=likeness)
    if not fields & rec.keys():
        return ("unknown record format: expected CounterFact (prompt, subject, target_new, ...), zsRE (src, subject, "
                f"alt, ...) or minimal (prompt, subject, target_new); it has {', '.join(map(repr, rec)) or 'no field'}")
    missing = [f for f in required if f not in rec]
    return f"missing {', '.join(missing)} (a {name} record needs {', '.join(required)})"


def _parse(text: str, path: Path) -> tuple[list[Any], Callable[[int], str]]:
    """The records of a JSON list or JSONL text, and how messages name record i: a JSONL record by its line (1-based,
    as an editor shows it), a JSON list's by its index (0-based, as --start counts)."""
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PruneCliError(f"{path} is not valid JSON: {exc}") from exc
        except RecursionError:
            raise PruneCliError(f"{path}: its JSON is nested too deeply to be edit requests") from None
        return records, lambda i: f"record {i}"
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PruneCliError(f"{path}: line {n} is not JSON ({exc.msg}, column {exc.colno}); a requests file is a "
                                "JSON list or one JSON object per line (JSONL)") from exc
        except RecursionError:
            raise PruneCliError(f"{path}: line {n} is nested too deeply to be an edit request") from None
    return records, lambda i: f"line {lines[i][0]}"


def load_requests(path: str | os.PathLike[str], start: int = 0, limit: int | None = None,
                  on_invalid: Callable[[int, str], None] | None = None) -> list[EditRequest]:
    """Read records [start, start + limit) of a JSON list or JSONL file (`-`: standard input); any bad record is a
    clear error naming it (`_parse`), unless `on_invalid(index, "WHERE: reason")` is given: then bad records are
    reported to it and skipped (bulk training data)."""
    path = Path(path)
    if str(path) != STDIN and not path.is_file():
        raise PruneCliError(f"requests file {path} does not exist")
    records, where = _parse(read_text(path, "requests file"), path)
    end = len(records) if limit is None else min(len(records), start + limit)
    out = []
    for i in range(start, end):
        try:
            out.append(parse_record(records[i], i))
        except (ValueError, KeyError, TypeError) as exc:
            if on_invalid is None:
                raise PruneCliError(f"{path}: {where(i)}: {exc}") from None
            on_invalid(i, f"{where(i)}: {exc}")
    if not out:
        raise PruneCliError(f"{path}: no requests in the selected range")
    return out
