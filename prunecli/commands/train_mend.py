"""`prunecli train-mend`: train MEND's gradient-transform networks for one base model into an archive."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prunecli.commands._display import cli_progress
from prunecli.commands._errors import guarded
from prunecli.commands._options import LOAD, Force, Model, Out, Requests, Start, layer_list
from prunecli.models.options import LoadOptions

if TYPE_CHECKING:
    from prunecli.api.train_mend import TrainMendResult

TrainLoad = Annotated[LoadOptions, LOAD.only("device", "tokenizer", "allow_pickle")]
"""Training runs in fp32 on one device."""


@guarded
def main(model: Model, requests: Requests,
         output: Annotated[Path, typer.Option("-o", "--output", help="Archive to write (.safetensors); the "
                                              "checkpoint goes next to it as ARCHIVE.ckpt.")],
         out: Out, load: TrainLoad,
         layers: Annotated[str | None, typer.Option("--layers", help="Layers whose MLP matrices are edited, e.g. "
                                                    "'27,28,29' or '27-29' (default: the last three).")] = None,
         start: Start = 0,
         limit: Annotated[int | None, typer.Option("--limit", help="Number of records to use.", min=1)] = None,
         steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps (each edits --batch-size "
                                            "records).")] = 1000,
         batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Edits per step.")] = 10,
         val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.9,
                                                     help="Share of the records held out for validation.")] = 0.1,
         val_every: Annotated[int, typer.Option("--val-every", min=1, help="Validate (and checkpoint) every N "
                                                "steps.")] = 100,
         lr: Annotated[float, typer.Option("--lr", min=0.0, help="Adam learning rate of the networks.")] = 1e-4,
         lr_lr: Annotated[float, typer.Option("--lr-lr", min=0.0, help="Adam learning rate of the per-weight edit "
                                              "learning rates.")] = 1e-5,
         edit_lr_init: Annotated[float, typer.Option("--edit-lr-init", help="Initial edit learning rate of every "
                                                     "weight.")] = 1e-4,
         rank: Annotated[int, typer.Option("--rank", min=1, help="Hidden width of the networks' low-rank MLP.")]
         = 256,
         edit_weight: Annotated[float, typer.Option("--edit-weight", min=0.0, help="Weight of the edit NLL in the "
                                                    "loss.")] = 0.1,
         loc_weight: Annotated[float, typer.Option("--loc-weight", min=0.0, help="Weight of the locality KL in the "
                                                   "loss.")] = 1.0,
         patience: Annotated[int, typer.Option("--early-stop-patience", min=1, help="Stop after N validations "
                                               "without a better validation loss.")] = 5,
         max_minutes: Annotated[float | None, typer.Option(
             "--max-minutes", min=0.0, help="Stop (validate, checkpoint, write the archive) after this much training "
             "time.")] = None,
         resume: Annotated[bool, typer.Option("--resume", help="Continue from ARCHIVE.ckpt (same model, data and "
                                              "settings; --steps and --early-stop-patience may change).")] = False,
         seed: Annotated[int, typer.Option("--seed", help="Seed of the split, the record order and the networks' "
                                           "initialisation.")] = 0,
         force: Force = False) -> None:
    """Train MEND's networks (Mitchell et al. 2022) for a base model on edit records: the archive is what
    `prunecli edit --method mend --archive ARCHIVE` uses. Holds out --val-fraction of the records for validation,
    keeps the best networks, stops early, checkpoints after every validation and resumes with --resume.

    Example: prunecli train-mend smollm2 -r "$PRUNECLI_DATA_DIR/zsre/zsre_mend_train-1k.json" --limit 20 --steps 2
    --val-every 1 --rank 16 -o smollm2.mend.safetensors

    Example: prunecli edit smollm2 --method mend --archive smollm2.mend.safetensors -r
    "$PRUNECLI_DATA_DIR/zsre/zsre_mend_train-1k.json" --limit 1 -o mend-edits.safetensors
    """
    from prunecli.api.train_mend import TrainMendOptions, run_train_mend
    from prunecli.editors.mend.networks import MendConfig
    from prunecli.editors.mend.train import TrainConfig

    if requests is None:
        raise typer.BadParameter("give the training records with --requests FILE", param_hint="--requests")
    config = TrainConfig(layer_list(layers) or (), steps, batch_size, val_fraction, lr, lr_lr, edit_weight,
                         loc_weight, val_every, patience, seed, MendConfig(rank, edit_lr_init))
    options = TrainMendOptions(model, requests, output, config, start, limit, max_minutes, resume, load, force)
    with cli_progress() as progress:
        result = run_train_mend(options, progress)
    out.result(result.to_json(), lambda: _render(out, result))


def _render(out: Out, result: TrainMendResult) -> None:
    state = result.result.state
    columns = ("step", "loss", "edit_nll", "loc_kl", "pre_nll", "edit_acc", "rephrase_acc", "loc_agree")
    if state.history:
        out.table("validation", columns, [[str(row[c]) if c == "step" else f"{row[c]:.4f}" for c in columns]
                                          for row in state.history], right=columns)
    best = "n/a" if state.best_val is None else f"{state.best_val:.4f}"
    out.say(f"wrote {result.options.output}: {len(result.weights)} weights, {state.step} steps ({state.stopped}), "
            f"best validation loss {best} at step {state.best_step}")
