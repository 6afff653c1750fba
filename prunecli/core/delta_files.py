"""Deltas as commands receive them: a prunecli delta file or a PEFT LoRA adapter folder, several composed in order.

This is the one loader every command uses, so an adapter is accepted wherever a delta is (`--delta`, `BASE DELTA`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.core.peft_io import ADAPTER_CONFIG, delta_from_peft, is_peft_adapter
from prunecli.errors import PruneCliError, PruneCliWarning


def load_delta(path: str | os.PathLike[str], base: Checkpoint | None = None) -> Delta:
    """A delta file, or a PEFT LoRA adapter folder of `base`; problems are one clear line.

    Adapters carry no fingerprint of their base, so they can only be read together with the base they are for.
    """
    path = Path(path)
    if not path.is_dir():
        delta = Delta.load(path)
        if (marker := delta.partial) is not None:
            warnings.warn(PruneCliWarning(
                f"{path} is partial: its edit run stopped ({marker.reason}) after records {marker.start}-"
                f"{marker.next - 1} of {marker.start}-{marker.end - 1}; `edit --resume` continues it"), stacklevel=2)
        return delta
    if not is_peft_adapter(path):
        raise PruneCliError(f"delta {path} is a directory but not a PEFT adapter (no {ADAPTER_CONFIG}); expected a "
                            ".safetensors delta file or a PEFT LoRA adapter folder")
    if base is None:
        raise PruneCliError(f"{path} is a PEFT adapter: this command needs the base checkpoint to read it")
    return delta_from_peft(path, base)


def load_deltas(paths: Iterable[str | os.PathLike[str]], base: Checkpoint | None = None) -> Delta | None:
    """Load and compose several delta files (or PEFT adapters of `base`) in order; None when no path is given."""
    total: Delta | None = None
    for p in paths:
        d = load_delta(p, base)
        total = d if total is None else total.compose(d)
    return total
