"""The task registry: every name `--tasks` accepts, what it needs, and how it runs.

A task list is comma-separated names, each optionally `=SOURCE` (a data file, or `hub:NAME[:CONFIG][@SPLIT]`;
for `perplexity` a text file): `counterfact,perplexity,glue:sst2,gsm8k=my/gsm8k.jsonl`. Groups expand: `glue` is
every GLUE-style subset, `general` the four generative tasks of PRUNE's Table 5. `counterfact` and `zsre` score edits
teacher-forced; `counterfact-gen` and `zsre-gen` judge what greedy decoding writes (`evaluation.edit_generation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunecli.errors import PruneCliError
from prunecli.evaluation import choice, counterfact, generative, zsre
from prunecli.evaluation.base import EvalContext, TaskOutcome
from prunecli.evaluation.data import resolve_source
from prunecli.evaluation.edit_generation import GenerationSpec, evaluate_generation, prompt_count
from prunecli.evaluation.perplexity import evaluate_perplexity
from prunecli.requests import EditRequest


@dataclass(frozen=True)
class TaskDef:
    name: str
    needs: str  # "edits" (requests), "text" (a text file) or "data" (a task data set)
    run: Callable[[EvalContext, str | None], TaskOutcome]
    locate: Callable[[Path, Path | None, str | None], str | None] = lambda data_dir, text, source: None
    """The file (or hub spec) the task will read, from (data dir, --text, =SOURCE); None when it reads none."""


def _requests(ctx: EvalContext, task: str) -> list[EditRequest]:
    if not ctx.requests:
        raise PruneCliError(f"task {task} needs edit requests: give --requests FILE (or deltas that record them)")
    return ctx.requests


def _run_counterfact(ctx: EvalContext, source: str | None) -> TaskOutcome:
    requests = _requests(ctx, "counterfact")
    with ctx.progress("counterfact (prompt/target pairs)", len(counterfact.needed_pairs(requests))) as bar:
        groups = counterfact.evaluate_counterfact(ctx.model, ctx.tokenizer, requests, ctx.options.batch_size,
                                                  bar.advance, ctx.workers)
    return TaskOutcome(groups, len(requests))


def _run_zsre(ctx: EvalContext, source: str | None) -> TaskOutcome:
    requests = _requests(ctx, "zsre")
    if ctx.locality_reference is None:
        raise PruneCliError("zsre needs the reference model's locality predictions (computed before deltas)")
    with ctx.progress("zsre (prompt/target pairs)", len(zsre.needed_pairs(requests))) as bar:
        groups = zsre.evaluate_zsre(ctx.model, ctx.tokenizer, requests, ctx.locality_reference,
                                    ctx.reference_name or "reference", ctx.options.batch_size, bar.advance, ctx.workers)
    return TaskOutcome(groups, len(requests))


def _generation_task(name: str, spec: GenerationSpec) -> TaskDef:
    def run(ctx: EvalContext, source: str | None) -> TaskOutcome:
        requests = _requests(ctx, name)
        with ctx.progress(f"{name} (prompts decoded)", prompt_count(ctx.tokenizer, requests, spec)) as bar:
            group = evaluate_generation(ctx.model, ctx.tokenizer, requests, spec, ctx.options.batch_size, bar.advance,
                                        ctx.workers)
        return TaskOutcome([group], len(requests))

    return TaskDef(name, "edits", run)


def _perplexity_text(data_dir: Path, text: Path | None, source: str | None) -> str:
    return source or str(text or data_dir / "wikitext" / "wiki.test.raw")


def _run_perplexity(ctx: EvalContext, source: str | None) -> TaskOutcome:
    opts = ctx.options
    path = Path(_perplexity_text(opts.data_dir, opts.text, source))
    return evaluate_perplexity(ctx.model, ctx.tokenizer, path, opts.window, opts.stride, opts.max_tokens,
                               opts.batch_size, ctx.progress, ctx.workers)


def _data_file(name: str, default: str | None) -> Callable[[Path, Path | None, str | None], str]:
    return lambda data_dir, text, source: resolve_source(source, default, data_dir, name)


def _generative(task: generative.GenerativeTask) -> TaskDef:
    return TaskDef(task.name, "data", lambda ctx, src: generative.run_generative(task, ctx, src),
                   _data_file(task.name, task.default_file))


def _choice(task: choice.ChoiceTask) -> TaskDef:
    return TaskDef(task.name, "data", lambda ctx, src: choice.run_choice(task, ctx, src),
                   _data_file(task.name, task.default_file))


REGISTRY: dict[str, TaskDef] = {t.name: t for t in [
    TaskDef("counterfact", "edits", _run_counterfact),
    TaskDef("zsre", "edits", _run_zsre),
    _generation_task("counterfact-gen", counterfact.GENERATION),
    _generation_task("zsre-gen", zsre.GENERATION),
    TaskDef("perplexity", "text", _run_perplexity, _perplexity_text),
    *(_generative(t) for t in generative.TASKS.values()),
    *(_choice(t) for t in choice.TASKS.values()),
]}
GROUPS: dict[str, list[str]] = {"glue": list(choice.TASKS), "general": list(generative.TASKS)}


def parse_tasks(spec: str) -> list[tuple[TaskDef, str | None]]:
    """Task definitions and their optional sources, in the order given, duplicates removed."""
    out: dict[str, tuple[TaskDef, str | None]] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, has_source, source = item.partition("=")
        name = name.strip().lower()
        names = GROUPS.get(name, [name])
        if has_source and len(names) > 1:
            raise PruneCliError(f"task group {name!r} cannot take a source; name its tasks one by one")
        for n in names:
            if n not in REGISTRY:
                known = ", ".join([*REGISTRY, *GROUPS])
                raise PruneCliError(f"unknown task {n!r}; known tasks: {known}")
            if has_source and REGISTRY[n].needs == "edits":
                raise PruneCliError(f"task {n} reads the requests given with --requests; it takes no =SOURCE")
            out[n] = (REGISTRY[n], (source.strip() or None) if has_source else None)
    if not out:
        raise PruneCliError("no task given in --tasks")
    return list(out.values())


def check_inputs(tasks: list[tuple[TaskDef, str | None]], data_dir: Path, text: Path | None) -> None:
    """Fail before any model is loaded when a task's input file is missing, saying which option points to it."""
    for task, source in tasks:
        where = task.locate(data_dir, text, source)
        if where is None or where.startswith("hub:") or Path(where).exists():
            continue
        if source:
            hint = f"check {task.name}={source}"
        elif task.name == "perplexity" and text is not None:
            hint = "check --text"
        else:
            hint = (f"it is looked up in the data folder {data_dir} (relative to the current directory unless "
                    f"absolute): set --data-dir or PRUNECLI_DATA_DIR, or give {task.name}=PATH")
        raise PruneCliError(f"task {task.name}: {where} does not exist; {hint}")
