"""The `prunecli` Typer application: registers one thin command module per subcommand."""

from __future__ import annotations

import inspect as pyinspect
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from prunecli.commands import (
    anchor,
    apply,
    compare,
    diff,
    edit,
    evaluate,
    export_lora,
    inspect,
    prune,
    stats,
    train_mend,
)

app = typer.Typer(
    name="prunecli",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: prose is rewrapped, examples are kept on one line (see below)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command_help(doc: str) -> str:
    """A command's help text from its docstring, every `Example:` paragraph joined into one unwrapped line.

    Click rewraps paragraphs to the terminal width; a wrapped example pasted into a shell runs half a command. A
    paragraph after click's `\\b` marker is printed as is (the terminal soft-wraps it, so copying gives one line).
    """
    paragraphs = pyinspect.cleandoc(doc).split("\n\n")
    return "\n\n".join("\b\n" + " ".join(line.strip() for line in p.splitlines()) if p.startswith("Example:") else p
                       for p in paragraphs)


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"prunecli {version('prunecli')}")
        except PackageNotFoundError:  # running from a source tree that was never installed
            typer.echo("prunecli (not installed)")
        raise typer.Exit()


@app.callback()
def _root(version_: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = False,
          threads: Annotated[int | None, typer.Option(
              "--threads", envvar="PRUNECLI_THREADS", min=1,
              help="CPU threads torch uses for the whole command (default: OMP_NUM_THREADS, else all cores). On a "
              "machine shared with other jobs, 1 is often faster (small eigendecompositions stall when a thread "
              "is descheduled).")] = None) -> None:
    """Sequential knowledge editing of LLM checkpoints, with the PRUNE perturbation restraint, as shell steps.

    Typical pipeline: stats -> edit -> prune -> apply / evaluate; inspect looks at spectra at any point;
    compare lines evaluation reports up; anchor measures NAS's target norm for edit --nas.
    """
    if threads is not None:  # the one place the process-wide thread count is set: library code never changes it
        import torch

        torch.set_num_threads(threads)


for _name, _module in [("inspect", inspect), ("diff", diff), ("prune", prune), ("apply", apply), ("stats", stats),
                       ("anchor", anchor), ("edit", edit), ("evaluate", evaluate), ("compare", compare),
                       ("export-lora", export_lora), ("train-mend", train_mend)]:
    app.command(_name, no_args_is_help=True, help=command_help(_module.main.__doc__ or ""))(_module.main)  # type: ignore[attr-defined]


def main() -> None:
    """Console-script entry point."""
    app()
