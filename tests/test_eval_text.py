"""ROUGE on known examples, answer matching, task prompts and judges, the task registry and data loading."""

from __future__ import annotations

from fractions import Fraction as F
from pathlib import Path

import pytest

from prunecli.errors import PruneCliError
from prunecli.evaluation import choice, generative
from prunecli.evaluation.answers import first_number, nli_verdict, normalize_answer, span_match
from prunecli.evaluation.data import load_records, subsample
from prunecli.evaluation.registry import parse_tasks
from prunecli.evaluation.rouge import lcs_length, rouge_l, rouge_n, rouge_scores, tokenize


def test_rouge_matches_the_rouge_score_readme_example() -> None:
    # rouge-score's README: target "The quick brown fox jumps over the lazy dog",
    # prediction "The quick brown dog jumps on the log." -> rouge1 P 0.75 R 0.6667, rougeL P 0.625 R 0.5556.
    s = rouge_scores("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog")
    assert s["rouge1"] == pytest.approx(float(2 * F(3, 4) * F(2, 3) / (F(3, 4) + F(2, 3))))
    assert s["rougeL"] == pytest.approx(float(2 * F(5, 8) * F(5, 9) / (F(5, 8) + F(5, 9))))
    # bigrams: prediction has 7, reference 8, shared "the quick", "quick brown" -> P 2/7, R 2/8.
    assert s["rouge2"] == pytest.approx(float(2 * F(2, 7) * F(2, 8) / (F(2, 7) + F(2, 8))))


def test_rouge_hand_computed_and_edge_cases() -> None:
    c, r = tokenize("The cat was found under the bed"), tokenize("the cat was under the bed.")
    assert rouge_n(c, r, 1) == pytest.approx(12 / 13)
    assert rouge_n(c, r, 2) == pytest.approx(8 / 11)
    assert lcs_length(c, r) == 6 and rouge_l(c, r) == pytest.approx(12 / 13)
    assert rouge_scores("", "a summary") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge_scores("Same words.", "same WORDS") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert tokenize("Hello, WORLD! it's 2024") == ["hello", "world", "it", "s", "2024"]
    assert rouge_n(["a", "a", "a"], ["a"], 1) == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))  # clipped counts


def test_answer_matching() -> None:
    assert normalize_answer("The  Beatles!") == "beatles"
    assert span_match("\n\nWilhelm Conrad Röntgen was the first.", ["Wilhelm Conrad Röntgen"])
    assert span_match("it was the MFSK mode", ["Olivia", "MFSK"])
    assert not span_match("in the 1990s", ["1990"])
    assert not span_match("anything", [""])
    assert first_number(" 1,234.5 dollars, then 7") == 1234.5
    assert first_number(" -3 apples") == -3.0 and first_number("none") is None
    assert nli_verdict(" True") is True and nli_verdict(" false, or true") is False and nli_verdict("maybe") is None


def test_generative_prompts_and_judges() -> None:
    gsm = generative.TASKS["gsm8k"]
    prompt, gold = gsm.build({"question": "How many?", "answer": "2 + 16 = <<2+16=18>>18\n#### 18"}, 0)
    assert prompt == ("Q: How many? A: Let's think step by step. 2 + 16 = <<2+16=18>>18 Therefore, the answer "
                      "(arabic numerals) is:")
    assert gold == 18.0
    assert gsm.judge(" 18.\n\nQ: next", gold) == {"gsm8k_solve_rate": 1.0}
    assert gsm.judge(" 180", gold) == {"gsm8k_solve_rate": 0.0}
    rte = generative.TASKS["rte"]
    prompt, gold = rte.build({"sentence1": "A man sleeps.", "sentence2": "A person rests", "label": "entailment"}, 0)
    assert prompt == "A man sleeps. entails the A person rests. True or False? answer:" and gold is True
    assert rte.judge(" True", gold) == {"rte_acc": 1.0} and rte.judge(" False", gold) == {"rte_acc": 0.0}
    assert rte.build({"sentence1": "a", "sentence2": "b", "label": 1}, 0)[1] is False  # GLUE ints: 1 = not_entailment
    nq = generative.TASKS["nq"]
    prompt, gold = nq.build({"question": "who?", "answer": ["Ann"], "output": ["\n\nAnn did it."]}, 0)
    assert prompt == ("Refer to the passage below and answer the following question. Passage: Ann did it. "
                      "Question: who?. Answer:") and gold == ["Ann"]
    assert nq.judge(" Ann.", gold) == {"nq_exact_match": 1.0}
    sam = generative.TASKS["samsum"]
    prompt, gold = sam.build({"dialogue": "A: hi\r\nB: hello", "summary": "A greets B."}, 0)
    assert prompt == "A: hi\r\nB: hello\nTL;DR:"
    scores = sam.judge("A greets B.", gold)
    assert scores["samsum_rouge"] == 1.0 and set(scores) == {"samsum_rouge1", "samsum_rouge2", "samsum_rougeL",
                                                             "samsum_rouge"}


def test_choice_prompts() -> None:
    mmlu = {"question": "2+2?", "choices": ["1", "4", "3", "5"], "answer": 1}
    prompt, gold = choice.TASKS["glue:mmlu"].build(mmlu, 0)
    assert prompt == "Question: 2+2?\n(A) 1\n(B) 4\n(C) 3\n(D) 5\nAnswer:" and gold == 1
    prompt, gold = choice.TASKS["glue:rte"].build({"sentence1": "P.", "sentence2": "H.", "label": 0}, 0)
    assert prompt == "P.\nquestion: H. True or False?\nanswer:" and choice.TASKS["glue:rte"].labels[gold] == "True"
    with pytest.raises(PruneCliError, match="label"):
        choice.TASKS["glue:sst2"].build({"sentence": "x", "label": 7}, 3)
    with pytest.raises(PruneCliError, match="record 2 has no field 'sentence'"):
        choice.TASKS["glue:cola"].build({"text": "x", "label": 1}, 2)


def test_task_registry_parsing() -> None:
    tasks = parse_tasks("counterfact, glue,gsm8k=my.jsonl,perplexity=t.txt,counterfact")
    assert [t.name for t, _ in tasks] == ["counterfact", "glue:sst2", "glue:mrpc", "glue:cola", "glue:rte",
                                          "glue:mmlu", "gsm8k", "perplexity"]
    assert dict((t.name, s) for t, s in tasks)["gsm8k"] == "my.jsonl"
    assert [t.name for t, _ in parse_tasks("general")] == ["gsm8k", "rte", "nq", "samsum"]
    for bad, message in [("bogus", "unknown task 'bogus'"), ("glue=x", "cannot take a source"),
                         ("counterfact=x.json", "--requests"), (" , ", "no task")]:
        with pytest.raises(PruneCliError, match=message):
            parse_tasks(bad)


def test_data_loading_and_subsampling(tmp_path: Path) -> None:
    tsv = tmp_path / "nli.tsv"
    tsv.write_text('index\tsentence1\tsentence2\tlabel\n0\tHe said "hi.\tHe spoke.\tentailment\n'
                   '1\tNo quote here.\tA "quoted" word\tnot_entailment\n')
    rows = load_records(str(tsv), "rte")
    assert [r["sentence1"] for r in rows] == ['He said "hi.', "No quote here."] and rows[1]["label"] == "not_entailment"
    js = tmp_path / "list.json"
    js.write_text('[{"id": "1", "dialogue": "d", "summary": "s"}, {"id": "2", "dialogue": "e", "summary": "t"}]')
    assert [r["dialogue"] for r in load_records(str(js), "samsum")] == ["d", "e"]
    with pytest.raises(PruneCliError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"), "gsm8k")
    assert subsample(20, 5, None) == [0, 1, 2, 3, 4]
    picked = subsample(20, 5, 3)
    assert picked == subsample(20, 5, 3) and len(set(picked)) == 5 and picked == sorted(picked) != [0, 1, 2, 3, 4]
    assert subsample(20, None, 3) == list(range(20)) and subsample(20, 50, 1) == list(range(20))


def test_every_default_data_file_loads_and_builds(shared_data: Path) -> None:
    for task in [*generative.TASKS.values(), *choice.TASKS.values()]:
        records = load_records(str(shared_data / task.default_file), task.name)
        for i in subsample(len(records), 3, None):
            prompt, gold = task.build(records[i], i)
            assert prompt and gold is not None, task.name
