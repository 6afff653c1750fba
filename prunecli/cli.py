"""The `prunecli` Typer application: registers one thin command module per subcommand."""

from __future__ import annotations

import typer

from prunecli.commands import apply, diff, edit, evaluate, export_lora, inspect, prune, stats, train_mend

app = typer.Typer(
    name="prunecli",
    help="Sequential knowledge editing of LLM checkpoints, with the PRUNE perturbation restraint, as shell steps.\n\n"
    "Typical pipeline: stats -> edit -> prune -> apply / evaluate; inspect looks at spectra at any point.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for _name, _module in [("inspect", inspect), ("diff", diff), ("prune", prune), ("apply", apply), ("stats", stats),
                       ("edit", edit), ("evaluate", evaluate), ("export-lora", export_lora),
                       ("train-mend", train_mend)]:
    app.command(_name, no_args_is_help=True)(_module.main)


def main() -> None:
    """Console-script entry point."""
    app()
