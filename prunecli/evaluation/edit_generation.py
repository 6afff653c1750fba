"""The generation protocol of edits: what the edited model *writes* after each edit, paraphrase and neighborhood prompt.

Teacher-forced scores (`counterfact`, `zsre`) ask whether the model prefers the new object when handed its tokens;
this protocol decodes greedily and applies the generation rule of `models.recall` (the answer's token count plus a
margin of new tokens; the normalised continuation starts with the normalised expected answer, word for word).
A dataset says, per prompt kind, which answer each prompt should produce (`GenerationSpec`): the new object after
edit and rephrase prompts, the true object after neighborhood prompts. Every distinct prompt is decoded once (with
the largest budget among its answers), the prompts sharded over the processes of a data-parallel run, and every
continuation goes into the report next to its prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prunecli.distributed import SINGLE, Workers
from prunecli.evaluation.base import MetricGroup, request_records
from prunecli.evaluation.metrics import Judgement, case_means
from prunecli.models.generation import Generation, greedy_generate
from prunecli.models.recall import ANSWER_MARGIN, answer_budgets, recalled_by
from prunecli.progress import Advance
from prunecli.requests import EditRequest

Answers = dict[str, list[tuple[str, str]]]
"""Per prompt kind: (prompt, the answer the continuation should start with)."""


@dataclass(frozen=True)
class GenerationSpec:
    """One dataset's generation protocol: its group, the metric name per prompt kind, the prompts with their expected
    answers, and in words which answer each metric expects (for the protocol text)."""

    group: str
    dataset: str
    metrics: dict[str, str]  # prompt kind -> metric name
    answers: Callable[[EditRequest], Answers]
    expected: str

    @property
    def protocol(self) -> str:
        return (f"{self.dataset}, generation protocol: greedy decoding after each prompt (batched, left padding) of at "
                f"most the expected answer's token count + {ANSWER_MARGIN} new tokens; a prompt counts when the "
                "continuation's words (lowercased, split at anything but letters and digits, articles dropped) "
                f"start with the answer's words. {self.expected} Mean over each case's prompts, then over cases; "
                "NaN/Inf logits count as failure (n_nonfinite). The continuations are in the report's `generations`. "
                "Sequential: every edit judged on the final model (all deltas).")


def _pairs(requests: Sequence[EditRequest], spec: GenerationSpec) -> list[tuple[str, str]]:
    return [pair for r in requests for kind in spec.metrics for pair in spec.answers(r).get(kind, [])]


def prompt_count(tokenizer: Any, requests: Sequence[EditRequest], spec: GenerationSpec) -> int:
    """How many distinct prompts will be decoded (the progress total)."""
    return len(answer_budgets(tokenizer, _pairs(requests, spec)))


def evaluate_generation(model: Any, tokenizer: Any, requests: Sequence[EditRequest], spec: GenerationSpec,
                        batch_size: int = 16, on_batch: Advance | None = None,
                        workers: Workers = SINGLE) -> MetricGroup:
    """Decode every distinct prompt (each process its share), judge each (prompt, answer), average per kind."""
    budgets = list(answer_budgets(tokenizer, _pairs(requests, spec)).items())
    decoded = workers.map(lambda part: greedy_generate(model, tokenizer, [p for p, _ in part], [b for _, b in part],
                                                       batch_size, on_batch), budgets)
    said: dict[str, Generation] = {p: g for (p, _), g in zip(budgets, decoded)}
    per_metric: dict[str, list[list[Judgement]]] = {name: [] for name in spec.metrics.values()}
    generations: list[dict[str, Any]] = []
    records = request_records(requests)
    for case_id, req in zip(records.ids, requests):
        answers = spec.answers(req)
        texts: dict[str, Any] = {"case_id": case_id}
        for kind, name in spec.metrics.items():
            pairs = answers.get(kind, [])
            verdicts = [recalled_by(said[p], answer) for p, answer in pairs]
            per_metric[name].append([None if v is None else float(v) for v in verdicts])
            texts[kind] = [[p, said[p].text] for p, _ in pairs]
        generations.append(texts)
    metrics = {name: case_means(cases, 0.0, flags=True) for name, cases in per_metric.items()}
    return MetricGroup(spec.group, spec.protocol, {k: v for k, v in metrics.items() if v.n}, records, generations)
