"""Every command as a plain function over an options object, for notebooks and scripts.

Each `prunecli` command is a thin wrapper over one of these: it parses its options into the options object, calls
the function, and renders the result (`result.to_json()` is what `--json` prints). For example:

    from prunecli.api import EditOptions, run_edit_job
    result = run_edit_job(EditOptions("smollm2", "facts.jsonl", "edits.safetensors", method="rome"))
    print(result.to_json()["failed_edits"])

Warnings reach Python's `warnings` (as `prunecli.errors.PruneCliWarning`), notes the `prunecli` logger, progress the
`progress` callable each function takes (`prunecli.progress`).
"""

from prunecli.api.apply import ApplyOptions, ApplyResult, run_apply
from prunecli.api.diff import DiffOptions, DiffResult, run_diff
from prunecli.api.edit import EditOptions, EditResult, run_edit_job
from prunecli.api.export_lora import ExportLoraOptions, run_export_lora
from prunecli.api.inspect import InspectOptions, InspectResult, run_inspect
from prunecli.api.prune import PruneOptions, PruneResult, run_prune
from prunecli.api.stats import StatsOptions, StatsResult, collect_stats
from prunecli.api.train_mend import TrainMendOptions, TrainMendResult, run_train_mend
from prunecli.core.restraint_functions import RestraintSettings
from prunecli.evaluation.base import EvalOptions
from prunecli.evaluation.runner import run_evaluation
from prunecli.models.options import LoadOptions

__all__ = ["ApplyOptions", "ApplyResult", "DiffOptions", "DiffResult", "EditOptions", "EditResult", "EvalOptions",
           "ExportLoraOptions", "InspectOptions", "InspectResult", "LoadOptions", "PruneOptions", "PruneResult",
           "RestraintSettings", "StatsOptions", "StatsResult", "TrainMendOptions", "TrainMendResult", "collect_stats",
           "run_apply", "run_diff", "run_edit_job", "run_evaluation", "run_export_lora", "run_inspect", "run_prune",
           "run_train_mend"]
