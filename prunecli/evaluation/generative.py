"""General-ability tasks answered by greedy generation, with the prompts of PRUNE's released evaluation code.

| task   | data (PRUNE's files)             | metric                                                         |
|--------|----------------------------------|----------------------------------------------------------------|
| gsm8k  | tasks/test-reasoning.jsonl       | solve rate: first number of the completion equals the gold one |
| rte    | tasks/test-NLI.tsv               | accuracy: "true"/"false" in the completion vs the label        |
| nq     | tasks/test-OpenDomainQA.jsonl    | exact match: a normalised gold answer is a word span of it     |
| samsum | tasks/test-summarization.json    | ROUGE-1/2/L F1 against the reference summary, and their mean   |

GSM8K follows PRUNE: the gold reasoning (the answer text before "####") is given as the hint and only the final
number is asked for, so the task measures whether the model can still read off a result, not whether it can reason.
Where we differ from PRUNE's script, on purpose: GSM8K writes "A: Let's" as the paper's Table 5 does (the script has
"A:Let's") and takes the first number of the completion (zero-shot-CoT answer cleansing) instead of testing whether
the gold string occurs anywhere in it ("18" would match "180"); RTE allows 2 new tokens instead of 1, so a tokenizer
that splits " True" still answers. Token budgets otherwise as PRUNE: GSM8K 5, NQ 20, SAMSum 25.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prunecli.evaluation.answers import first_number, nli_verdict, parse_number, span_match
from prunecli.evaluation.base import EvalContext, MetricGroup, RecordSet, TaskOutcome
from prunecli.evaluation.data import field, load_records, resolve_source, subsample
from prunecli.evaluation.metrics import Judgement, case_means
from prunecli.evaluation.rouge import rouge_scores
from prunecli.models.generation import greedy_generate


@dataclass(frozen=True)
class GenerativeTask:
    """A prompt per record, a greedy completion, and per-record metric values judged from it."""

    name: str
    default_file: str
    template: str  # shown in the protocol text
    max_new_tokens: int
    metric_text: str
    build: Callable[[dict[str, Any], int], tuple[str, Any]]  # (record, index) -> (prompt, gold)
    judge: Callable[[str, Any], dict[str, float]]  # (completion, gold) -> {metric: value}
    flags: bool = True  # the judge's values are successes (1.0/0.0: a proportion), not scores such as ROUGE


def _gsm8k(rec: dict[str, Any], i: int) -> tuple[str, Any]:
    hint, sep, gold = str(field(rec, "answer", "gsm8k", i)).partition("####")
    question = field(rec, "question", "gsm8k", i)
    prompt = f"Q: {question} A: Let's think step by step. {hint.strip()} Therefore, the answer (arabic numerals) is:"
    return prompt, parse_number(gold) if sep else None


def _gsm8k_judge(text: str, gold: float | None) -> dict[str, float]:
    pred = first_number(text)
    return {"gsm8k_solve_rate": float(pred is not None and gold is not None and abs(pred - gold) < 1e-6)}


def _rte(rec: dict[str, Any], i: int) -> tuple[str, Any]:
    label = field(rec, "label", "rte", i)
    entails = label == 0 if isinstance(label, int) else str(label).strip().lower() == "entailment"
    s1, s2 = field(rec, "sentence1", "rte", i), field(rec, "sentence2", "rte", i)
    return f"{s1} entails the {s2}. True or False? answer:", entails


def _nq(rec: dict[str, Any], i: int) -> tuple[str, Any]:
    passage = field(rec, "output", "nq", i)
    passage = passage[0] if isinstance(passage, list) and passage else passage
    answers = field(rec, "answer", "nq", i)
    answers = [answers] if isinstance(answers, str) else list(answers)
    question = field(rec, "question", "nq", i)
    prompt = (f"Refer to the passage below and answer the following question. Passage: {str(passage).strip()} "
              f"Question: {question}. Answer:")
    return prompt, answers


def _samsum(rec: dict[str, Any], i: int) -> tuple[str, Any]:
    return f"{field(rec, 'dialogue', 'samsum', i)}\nTL;DR:", str(field(rec, "summary", "samsum", i))


def _samsum_judge(text: str, gold: str) -> dict[str, float]:
    r = rouge_scores(text, gold)
    return {"samsum_rouge1": r["rouge1"], "samsum_rouge2": r["rouge2"], "samsum_rougeL": r["rougeL"],
            "samsum_rouge": (r["rouge1"] + r["rouge2"] + r["rougeL"]) / 3}


TASKS: dict[str, GenerativeTask] = {t.name: t for t in [
    GenerativeTask("gsm8k", "tasks/test-reasoning.jsonl",
                   "Q: {question} A: Let's think step by step. {gold reasoning} Therefore, the answer (arabic "
                   "numerals) is:", 5, "solve rate: the first number in the completion equals the gold answer",
                   _gsm8k, _gsm8k_judge),
    GenerativeTask("rte", "tasks/test-NLI.tsv", "{sentence1} entails the {sentence2}. True or False? answer:", 2,
                   "accuracy: the first of 'true'/'false' in the completion matches entailment/not_entailment "
                   "(neither counts as wrong)", _rte,
                   lambda text, gold: {"rte_acc": float(nli_verdict(text) == gold)}),
    GenerativeTask("nq", "tasks/test-OpenDomainQA.jsonl", "Refer to the passage below and answer the following "
                   "question. Passage: {output[0]} Question: {question}. Answer:", 20,
                   "exact match: some gold answer, SQuAD-normalised, equals a contiguous word span of the normalised "
                   "completion (PRUNE's criterion)", _nq,
                   lambda text, golds: {"nq_exact_match": float(span_match(text, golds))}),
    GenerativeTask("samsum", "tasks/test-summarization.json", "{dialogue}\\nTL;DR:", 25,
                   "ROUGE-1/2/L F1 against the reference summary (prunecli.evaluation.rouge: lowercase alphanumeric "
                   "tokens, no stemming); samsum_rouge = their mean (PRUNE's number)", _samsum, _samsum_judge,
                   flags=False),
]}


def run_generative(task: GenerativeTask, ctx: EvalContext, source: str | None) -> TaskOutcome:
    """Generate for the (subsampled) records, judge each completion, average per metric."""
    opts = ctx.options
    records = load_records(resolve_source(source, task.default_file, opts.data_dir, task.name), task.name)
    picked = subsample(len(records), opts.limit, opts.seed)
    built = [task.build(records[i], i) for i in picked]
    with ctx.progress(f"{task.name} (generations)", len(built)) as bar:
        outputs = ctx.workers.map(lambda part: greedy_generate(ctx.model, ctx.tokenizer, part, task.max_new_tokens,
                                                               opts.batch_size, bar.advance), [p for p, _ in built])
    per_metric: dict[str, list[list[Judgement]]] = {}
    for (_, gold), out in zip(built, outputs):
        for name, value in task.judge(out.text, gold).items():
            per_metric.setdefault(name, []).append([value if out.finite else None])
    protocol = (f"{task.name}: {task.metric_text}. Prompt: '{task.template}'; greedy decoding of at most "
                f"{task.max_new_tokens} new tokens (stops at end-of-sequence), batched with left padding. "
                "NaN/Inf logits while decoding count as failure (n_nonfinite).")
    metrics = {name: case_means(cases, 0.0, task.flags) for name, cases in per_metric.items()}
    return TaskOutcome([MetricGroup(task.name, protocol, metrics, RecordSet.of(picked, built))], len(built))
