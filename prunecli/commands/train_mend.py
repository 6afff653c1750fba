"""`prunecli train-mend`: train MEND's gradient-transform networks for one base model into an archive."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from prunecli.commands._common import (AllowPickleOpt, DebugOpt, DeviceOpt, ForceOpt, JsonOpt, TokenizerOpt, either,
                                       cli_progress, emit_json, guarded, say, warn)


def main(
    model: Annotated[str, typer.Argument(help="Base model folder (or `smollm2`).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Archive to write (.safetensors); the checkpoint "
                                         "goes next to it as ARCHIVE.ckpt.")],
    requests: Annotated[Path | None, typer.Option("--requests", "-r", help="Edit records: JSON list or JSONL (zsRE "
                                                  "MEND format or CounterFact), as `edit --requests` reads them.")]
    = None,
    data_old: Annotated[Path | None, typer.Option("--data", hidden=True)] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Layers whose MLP matrices are edited, e.g. "
                                               "'27,28,29' or '27-29' (default: the last three).")] = None,
    start: Annotated[int, typer.Option("--start", help="First record to use (0-based).", min=0)] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Number of records to use.", min=1)] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps (each edits --batch-size records).",
                                       min=1)] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Edits per step.", min=1)] = 10,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of the records held out for "
                                                "validation.", min=0.0, max=0.9)] = 0.1,
    val_every: Annotated[int, typer.Option("--val-every", help="Validate (and checkpoint) every N steps.",
                                           min=1)] = 100,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the networks.", min=0.0)] = 1e-4,
    lr_lr: Annotated[float, typer.Option("--lr-lr", help="Adam learning rate of the per-weight edit learning "
                                         "rates.", min=0.0)] = 1e-5,
    edit_lr_init: Annotated[float, typer.Option("--edit-lr-init", help="Initial edit learning rate of every "
                                                "weight.")] = 1e-4,
    rank: Annotated[int, typer.Option("--rank", help="Hidden width of the networks' low-rank MLP.", min=1)] = 256,
    edit_weight: Annotated[float, typer.Option("--edit-weight", help="Weight of the edit NLL in the loss.",
                                               min=0.0)] = 0.1,
    loc_weight: Annotated[float, typer.Option("--loc-weight", help="Weight of the locality KL in the loss.",
                                              min=0.0)] = 1.0,
    patience: Annotated[int, typer.Option("--early-stop-patience", help="Stop after N validations without a "
                                          "better validation loss.", min=1)] = 5,
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", help="Stop (validate, checkpoint, write "
                                                      "the archive) after this much training time.",
                                                      min=0.0)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from ARCHIVE.ckpt (same model, data and "
                                         "settings; --steps and --early-stop-patience may change).")] = False,
    device: DeviceOpt = "auto",
    tokenizer_ref: TokenizerOpt = None,
    allow_pickle: AllowPickleOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split, the record order and the networks' "
                                      "initialisation.")] = 0,
    json_out: JsonOpt = False,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train MEND's networks (Mitchell et al. 2022) for a base model on edit records: the archive is what
    `prunecli edit --method mend --archive ARCHIVE` uses. Holds out --val-fraction of the records for validation,
    keeps the best networks, stops early, checkpoints after every validation and resumes with --resume.

    Example: prunecli train-mend smollm2 --requests ../shared/data/zsre/zsre_mend_train-1k.json --limit 900
    --steps 2000 --max-minutes 30 -o smollm2.mend.safetensors
    """

    data = either(requests, data_old, "--requests", "--data")
    if data is None:
        raise typer.BadParameter("give the training records with --requests FILE")

    def body() -> None:
        import torch

        from prunecli.core.atomic import check_output_path
        from prunecli.models.default_model import resolve_model_path
        from prunecli.editors.hparams import coerce
        from prunecli.editors.mend import MendConfig, default_layers, mlp_targets
        from prunecli.editors.mend_train import TrainConfig, train_mend
        from prunecli.models.adapters import resolve_adapter
        from prunecli.models.loading import load_model
        from prunecli.requests import load_requests

        checkpoint = Path(str(output) + ".ckpt")
        inputs = [("model", resolve_model_path(model)), ("training data", data)]
        if not resume:
            check_output_path(output, force, is_dir=False, inputs=inputs)
            check_output_path(checkpoint, force, is_dir=False, inputs=inputs)
        else:
            check_output_path(output, force=True, is_dir=False, inputs=inputs)
        skipped: list[int] = []
        records = load_requests(data, start, limit, lambda i, reason: skipped.append(i))
        if skipped:
            warn(f"skipped {len(skipped)} unusable record(s) of {data} (e.g. record {skipped[0]}); "
                 f"training on {len(records)}")
        data_info = {"path": str(data), "start": start, "records": len(records), "skipped": skipped,
                     "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}

        lm, tokenizer, base = load_model(model, device, "fp32", tokenizer=tokenizer_ref,
                                         allow_pickle=allow_pickle)
        adapter = resolve_adapter(lm)
        chosen = coerce("layers", layers) if layers is not None else tuple(default_layers(adapter.num_layers))
        for layer in chosen:
            adapter.check_layer(layer)
        targets = mlp_targets(adapter, chosen)
        config = TrainConfig(tuple(chosen), steps, batch_size, val_fraction, lr, lr_lr, edit_weight, loc_weight,
                             val_every, patience, seed, MendConfig(rank, edit_lr_init))
        torch.manual_seed(seed)
        with cli_progress() as progress:
            result = train_mend(lm, tokenizer, base, targets, records, config, checkpoint, resume, data_info,
                                None if max_minutes is None else max_minutes * 60, progress)
        result.archive.save(output, force=True)
        summary = {"output": str(output), "checkpoint": str(checkpoint), "model": str(base.path),
                   "weights": [t.name for t in targets], "train_records": result.n_train,
                   "val_records": result.n_val, "steps": result.state.step, "best_step": result.state.best_step,
                   "best_val_loss": result.state.best_val, "stopped": result.state.stopped,
                   "seconds": result.state.seconds,
                   "edit_lrs": [float(x) for x in result.archive.networks.edit_lrs.detach()],
                   "validation": result.state.history}
        if json_out:
            emit_json(summary)
        else:
            _print_validation(result.state.history)
            say(f"wrote {output}: {len(targets)} weights, {result.state.step} steps ({result.state.stopped}), best "
                f"validation loss {_fmt(result.state.best_val)} at step {result.state.best_step}")

    guarded(debug, body)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_validation(history: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not history:
        return
    table = Table(title="validation")
    columns = ("step", "loss", "edit_nll", "loc_kl", "pre_nll", "edit_acc", "rephrase_acc", "loc_agree")
    for col in columns:
        table.add_column(col, justify="right")
    for row in history:
        table.add_row(*(str(row[c]) if c == "step" else f"{row[c]:.4f}" for c in columns))
    Console().print(table)

