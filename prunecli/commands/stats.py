"""`prunecli stats`: not implemented yet."""

from __future__ import annotations

from typing import Annotated

import typer

from prunecli.commands._common import DebugOpt, guarded
from prunecli.errors import PruneCliError


def main(model: Annotated[str, typer.Argument(help="Model folder.")], debug: DebugOpt = False) -> None:
    """Not implemented yet (exits 1)."""

    def body() -> None:
        raise PruneCliError("prunecli stats is not implemented yet")

    guarded(debug, body)
