"""GLUE-style classification by label-word likelihood (AlphaEdit's general-ability check), batched.

Each label word is scored teacher-forced after the prompt (`score_targets`, so the project's tokenisation: one
space before the word); the prediction is the label with the lowest mean token NLL (ties: the first label). No
generation and no answer parsing, so tiny models get a meaningful, low-variance number. Metrics: accuracy and F1
weighted by class frequency (AlphaEdit's `f1_new`). Prompts are AlphaEdit's zero-shot prompts; CoLA's trailing
space after "Answer:" is dropped so the label word carries its own leading space like every other task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prunecli.errors import PruneCliError
from prunecli.evaluation.base import EvalContext, MetricGroup, RecordSet, TaskOutcome
from prunecli.evaluation.data import field, load_records, resolve_source, subsample
from prunecli.evaluation.metrics import MetricValue, case_means, weighted_f1
from prunecli.evaluation.uncertainty import WEIGHTED_F1, Outcomes
from prunecli.models.scoring import score_targets


@dataclass(frozen=True)
class ChoiceTask:
    name: str  # e.g. "glue:sst2"
    default_file: str
    template: str
    labels: tuple[str, ...]  # label words, indexed by the gold label
    build: Callable[[dict[str, Any], int], tuple[str, int]]  # (record, index) -> (prompt, gold label index)

    @property
    def prefix(self) -> str:
        """Metric name prefix: "glue:sst2" -> "glue_sst2"."""
        return self.name.replace(":", "_")


def _label(rec: dict[str, Any], key: str, task: str, i: int, n: int) -> int:
    value = field(rec, key, task, i)
    if not isinstance(value, int) or not 0 <= value < n:
        raise PruneCliError(f"task {task}: record {i}: label {value!r} is not an integer in [0, {n})")
    return value


def _sst2(rec: dict[str, Any], i: int) -> tuple[str, int]:
    return f"Review :{field(rec, 'sentence', 'glue:sst2', i)}\nSentiment :", _label(rec, "label", "glue:sst2", i, 2)


def _mrpc(rec: dict[str, Any], i: int) -> tuple[str, int]:
    s1, s2 = field(rec, "sentence1", "glue:mrpc", i), field(rec, "sentence2", "glue:mrpc", i)
    prompt = f"Are the sentences paraphrases of each other.\nSentence 1: {s1}\nSentence 2: {s2}\nAnswer:"
    return prompt, _label(rec, "label", "glue:mrpc", i, 2)


def _cola(rec: dict[str, Any], i: int) -> tuple[str, int]:
    prompt = f"Is this sentence linguistically acceptable?\nSentence: {field(rec, 'sentence', 'glue:cola', i)}\nAnswer:"
    return prompt, _label(rec, "label", "glue:cola", i, 2)


def _rte(rec: dict[str, Any], i: int) -> tuple[str, int]:
    s1, s2 = field(rec, "sentence1", "glue:rte", i), field(rec, "sentence2", "glue:rte", i)
    # GLUE labels: 0 = entailment ("True"), 1 = not_entailment ("False").
    return f"{s1}\nquestion: {s2} True or False?\nanswer:", _label(rec, "label", "glue:rte", i, 2)


def _mmlu(rec: dict[str, Any], i: int) -> tuple[str, int]:
    choices = field(rec, "choices", "glue:mmlu", i)
    if not isinstance(choices, list) or len(choices) != 4:
        raise PruneCliError(f"task glue:mmlu: record {i}: expected 4 choices")
    options = "".join(f"({letter}) {c}\n" for letter, c in zip("ABCD", choices))
    return f"Question: {field(rec, 'question', 'glue:mmlu', i)}\n{options}Answer:", _label(rec, "answer", "glue:mmlu",
                                                                                           i, 4)


TASKS: dict[str, ChoiceTask] = {t.name: t for t in [
    ChoiceTask("glue:sst2", "glue/sst2.jsonl", "Review :{sentence}\\nSentiment :", ("negative", "positive"), _sst2),
    ChoiceTask("glue:mrpc", "glue/mrpc.jsonl", "Are the sentences paraphrases of each other.\\nSentence 1: "
               "{sentence1}\\nSentence 2: {sentence2}\\nAnswer:", ("No", "Yes"), _mrpc),
    ChoiceTask("glue:cola", "glue/cola.jsonl", "Is this sentence linguistically acceptable?\\nSentence: "
               "{sentence}\\nAnswer:", ("No", "Yes"), _cola),
    ChoiceTask("glue:rte", "glue/rte.jsonl", "{sentence1}\\nquestion: {sentence2} True or False?\\nanswer:",
               ("True", "False"), _rte),
    ChoiceTask("glue:mmlu", "glue/mmlu.jsonl", "Question: {question}\\n(A) ..\\n(B) ..\\n(C) ..\\n(D) ..\\nAnswer:",
               ("A", "B", "C", "D"), _mmlu),
]}


def run_choice(task: ChoiceTask, ctx: EvalContext, source: str | None) -> TaskOutcome:
    """Score every label word of every (subsampled) record in one batched pass; accuracy and weighted F1."""
    opts = ctx.options
    records = load_records(resolve_source(source, task.default_file, opts.data_dir, task.name), task.name)
    picked = subsample(len(records), opts.limit, opts.seed)
    built = [task.build(records[i], i) for i in picked]
    prompts = [p for p, _ in built for _ in task.labels]
    words = [w for _ in built for w in task.labels]
    with ctx.progress(f"{task.name} (label words)", len(prompts)) as bar:
        scores = ctx.workers.map(lambda part: score_targets(ctx.model, ctx.tokenizer, [p for p, _ in part],
                                                            [w for _, w in part], opts.batch_size, bar.advance),
                                 list(zip(prompts, words)))
    k = len(task.labels)
    golds, preds, judged = [], [], []
    for j, (_, gold) in enumerate(built):
        mine = scores[j * k:(j + 1) * k]
        ok = all(s.finite for s in mine)
        pred = min(range(k), key=lambda c: mine[c].nll) if ok else -1
        golds.append(gold)
        preds.append(pred)
        judged.append([float(pred == gold) if ok else None])
    acc = case_means(judged, 0.0, flags=True)
    predicted = Outcomes(WEIGHTED_F1, [float(p) for p in preds], labels=golds)
    f1 = MetricValue(weighted_f1(golds, preds), acc.n, acc.n_nonfinite, predicted)
    protocol = (f"{task.name}: zero-shot label-word likelihood (AlphaEdit's protocol): each label word "
                f"{list(task.labels)} is scored teacher-forced after the prompt '{task.template}'; prediction = the "
                "lowest mean token NLL; accuracy and class-frequency-weighted F1. NaN/Inf scores count as wrong "
                "(n_nonfinite).")
    return TaskOutcome([MetricGroup(task.prefix, protocol, {f"{task.prefix}_acc": acc, f"{task.prefix}_f1": f1},
                                    RecordSet.of(picked, built))], len(built))
