"""Every command-line option declared once, and option groups that commands receive as one object.

A command's parameter annotated with an `OptionGroup` (e.g. `load: Load`) stands for several options on the command
line (`--device`, `--dtype`, `--device-map`, ...): `with_option_groups` puts the group's options into the signature
Typer reads and builds the object (a `LoadOptions`, `RestraintSettings`, ...) from them before the command runs. So
a command lists what it takes in a few lines, and the same flag means the same thing, with the same help, in every
command. Old spellings live here too, as hidden options that print a deprecation line.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from prunecli.commands._output import Output, warn
from prunecli.core.restraint_functions import FUNCTIONS, RestraintSettings, SphereSettings
from prunecli.errors import PruneCliError
from prunecli.models.options import LoadOptions

F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------------------------------------- the mechanism
def option(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """One parameter of an option group (keyword-only: Typer only needs its name, annotation and default)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


@dataclass(frozen=True)
class OptionGroup:
    """Options declared once and given to a command as one object: `build(**values of params)`."""

    build: Callable[..., Any]
    params: tuple[inspect.Parameter, ...]

    def only(self, *names: str) -> OptionGroup:
        """The group with these options alone (the object's other fields keep their defaults)."""
        unknown = set(names) - {p.name for p in self.params}
        assert not unknown, unknown
        return OptionGroup(self.build, tuple(p for p in self.params if p.name in names))


def with_option_groups(fn: F) -> F:
    """`fn` with every parameter annotated `Annotated[T, OptionGroup]` replaced by that group's options in the
    signature Typer reads; the group's object is built from them when the command runs."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, OptionGroup] = {}
    for p in inspect.signature(fn).parameters.values():
        hint = hints.get(p.name, p.annotation)
        group = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, OptionGroup)), None)
        if group is None:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hint))
        else:
            groups[p.name] = group
            params.extend(group.params)
    names = [p.name for p in params]
    assert len(set(names)) == len(names), f"{fn.__name__}: an option is declared twice: {names}"

    @functools.wraps(fn)
    def command(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group.build(**{p.name: values.pop(p.name) for p in group.params})
        return fn(**values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command  # type: ignore[return-value]


def _deprecated(old: str, new: str) -> Callable[[Any], Any]:
    """Callback of a hidden old spelling: says once that it is old, and passes the value on."""
    def callback(value: Any) -> Any:
        if value not in (None, [], ()):
            warn(f"{old} is an old spelling of {new} and will be removed: use {new}")
        return value
    return callback


def either(new: Any, old: Any, new_name: str, old_name: str) -> Any:
    """An input given under its name or under its old spelling (not both)."""
    if new is not None and old is not None:
        raise typer.BadParameter(f"{old_name} is the old spelling of {new_name}: give only one of them")
    return new if new is not None else old


# ------------------------------------------------------------------------------------------------- single options
def _check_device(value: str) -> str:
    """A usage error (exit 2) for anything but auto, cpu, cuda, cuda:N or mps, before any work starts."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not auto, cpu, cuda, cuda:N or mps")
    return value


Model = Annotated[str, typer.Argument(
    metavar="MODEL", help="Model folder (Hugging Face layout), or a built-in model: smollm2, gemma3-270m.")]
Base = Annotated[str, typer.Argument(
    metavar="BASE", help="Base checkpoint: a model folder, a .safetensors file, or a built-in name (smollm2).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (a regular file or a folder prunecli "
                                     "wrote; never an input).")]
IgnoreBaseMismatch = Annotated[bool, typer.Option(
    "--ignore-base-mismatch", help="Accept deltas whose base fingerprints differ from these base weights (warns, "
    "naming the tensors that differ). Without it such a delta is an error.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin/.pt) weights; they can run "
                                           "code when loaded, and are read with weights_only=True.")]
Device = Annotated[str, typer.Option(
    "--device", callback=_check_device, envvar="PRUNECLI_DEVICE",
    help="auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps.")]
Select = Annotated[list[str] | None, typer.Option(
    "--select", "-s", help="Only tensors (delta entries) whose name matches this glob, canonical or as stored "
    "(repeatable), e.g. '*.mlp.down_proj.weight'.")]
Deltas = Annotated[list[Path] | None, typer.Option(
    "--delta", "-d", help="Delta file or PEFT LoRA adapter folder (repeatable, composed in the order given).")]
Start = Annotated[int, typer.Option("--start", min=0, help="First record to use (0-based).")]
OutputFile = Annotated[Path, typer.Option("-o", "--output", help="File to write (.safetensors).")]


# ------------------------------------------------------------------------------------------------- groups
OUTPUT = OptionGroup(lambda json_out: Output(json=json_out), (
    option("json_out", Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object on "
                                                    "stdout.")], False),))
Out = Annotated[Output, OUTPUT]
"""Every command's result channel (`--json`)."""

LOAD = OptionGroup(LoadOptions, (
    option("device", Device, "auto"),
    option("dtype", Annotated[str, typer.Option("--dtype", help="Model dtype: fp32, bf16 or fp16 (edits and "
                                                "statistics are computed in fp32/fp64 whatever it is).")], "fp32"),
    option("device_map", Annotated[str | None, typer.Option(
        "--device-map", help="Spread a model too big for one device over GPUs, CPU and disk with accelerate: auto, "
        "balanced, balanced_low_0, sequential, or one device (cpu, cuda:N). Replaces --device.")], None),
    option("max_memory", Annotated[str | None, typer.Option(
        "--max-memory", help="With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB (the rest goes "
        "to disk).")], None),
    option("offload_folder", Annotated[Path | None, typer.Option(
        "--offload-folder", help="With --device-map: folder accelerate may use for weights offloaded to disk.")], None),
    option("tokenizer", Annotated[str | None, typer.Option(
        "--tokenizer", metavar="PATH_OR_ALIAS", help="Tokenizer to use instead of the model folder's own (for "
        "folders saved without one): a folder, a tokenizer.json file, or a built-in name (smollm2, "
        "gemma3-270m).")], None),
    option("allow_pickle", AllowPickle, False),
))
Load = Annotated[LoadOptions, LOAD]
"""How a model is built (`prunecli.models.loading.LoadOptions`): every command that loads a model takes these."""


def _requests(requests: Path | None, edits_old: Path | None) -> Path | None:
    return either(requests, edits_old, "--requests", "--edits")


REQUESTS = OptionGroup(_requests, (
    option("requests", Annotated[Path | None, typer.Option(
        "--requests", "-r", help="Edit requests: a JSON list or JSONL file (CounterFact, zsRE MEND or minimal "
        "{prompt, subject, target_new}); - reads standard input.")], None),
    option("edits_old", Annotated[Path | None, typer.Option(
        "--edits", "-e", "--data", hidden=True, callback=_deprecated("--edits, -e and --data", "--requests/-r"))],
        None),
))
Requests = Annotated[Path | None, REQUESTS]
"""The edit requests file, `--requests`/`-r` in every command (old spellings `--edits`/`-e`, train-mend's `--data`)."""


def _base_and_delta(paths: list[str], base_old: str | None) -> tuple[str, Path]:
    """BASE DELTA, or the older `DELTA --base BASE`."""
    if base_old is not None:
        if len(paths) != 1:
            raise typer.BadParameter("with --base give only DELTA (or write BASE DELTA, base first)")
        return base_old, Path(paths[0])
    if len(paths) != 2:
        raise typer.BadParameter("give BASE DELTA: the base checkpoint first, then the delta")
    return paths[0], Path(paths[1])


BASE_DELTA = OptionGroup(_base_and_delta, (
    option("paths", Annotated[list[str], typer.Argument(
        metavar="BASE DELTA", help="The base checkpoint the delta was made for (folder, .safetensors file, or a "
        "built-in name such as smollm2), then the delta file (or PEFT adapter folder), as in apply and diff.")]),
    option("base_old", Annotated[str | None, typer.Option(
        "--base", hidden=True, callback=_deprecated("DELTA --base BASE", "BASE DELTA"))], None),
))
BaseDelta = Annotated[tuple[str, Path], BASE_DELTA]

Fn = Enum("Fn", {name.replace("-", "_"): name for name in FUNCTIONS}, type=str)  # type: ignore[misc]
"""`--fn`'s choices: the restraint table's functions (`prunecli.core.restraint.FUNCTIONS`)."""


def _restraint(fn: Enum | None, clamp: bool, target_kappa: float | None, **params: float) -> RestraintSettings:
    """Checked settings: a value out of its range or a contradiction is a usage error (exit 2), before any work."""
    if target_kappa is not None and fn not in (None, Fn("scale-free")):
        raise typer.BadParameter(f"--target-kappa searches the strength of scale-free F; it does not combine with "
                                 f"--fn {fn.value}", param_hint="--target-kappa")
    name = "scale-free" if target_kappa is not None else (fn.value if fn is not None else "log")
    settings = RestraintSettings(name, clamp=clamp, target_kappa=target_kappa, **params)
    try:
        settings.check()
    except PruneCliError as exc:
        raise typer.BadParameter(str(exc)) from None
    return settings


RESTRAINT = OptionGroup(_restraint, (
    option("fn", Annotated[Fn | None, typer.Option(  # type: ignore[valid-type]
        "--fn", help="Restraint function F for the singular values s > smax = sigma_max(W) of the delta: "
        + "; ".join(f"{f.name}: {f.formula}" for f in FUNCTIONS.values()) + ".")], None),
    *(option(f.name, Annotated[float, typer.Option(f"--{f.name}", help=f.metadata["help"])], f.default)
      for f in RestraintSettings.parameters()),
    option("clamp", Annotated[bool, typer.Option(
        "--clamp", help="Never enlarge a singular value: use min(s, F(s)) (log F enlarges values just above smax "
        "when smax * ln(alpha) < 1).")], False),
    option("target_kappa", Annotated[float | None, typer.Option(
        "--target-kappa", help="Per matrix, the mildest scale-free strength with kappa(W + D') <= K (reported with "
        "kappa before/after); K below kappa(W) is refused. Replaces --fn/--strength.")], None),
))
Restraint = Annotated[RestraintSettings, RESTRAINT]
"""The restraint (`prunecli.core.restraint`): options derived from its table of functions and parameters."""


def _sphere(sphere: bool, sphere_eta: float | None, sphere_alpha: float | None,
            sphere_basis: str | None) -> SphereSettings | None:
    """SPHERE's settings, or None without --sphere (its other options alone are a usage error)."""
    if not sphere:
        given = [name for name, value in (("--sphere-eta", sphere_eta), ("--sphere-alpha", sphere_alpha),
                                          ("--sphere-basis", sphere_basis)) if value is not None]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} set(s) SPHERE, which is on only with --sphere",
                                     param_hint="--sphere")
        return None
    defaults = SphereSettings()
    settings = SphereSettings(defaults.eta if sphere_eta is None else sphere_eta, sphere_alpha,
                              sphere_basis or defaults.basis)
    try:
        settings.check()
    except PruneCliError as exc:
        raise typer.BadParameter(str(exc)) from None
    return settings


SPHERE = OptionGroup(_sphere, (
    option("sphere", Annotated[bool, typer.Option(
        "--sphere", help="SPHERE while editing: project every update away from the principal directions of the "
        "row-normalised weight it changes (docs/METHODS.md#sphere); composes with --prune-every, --kappa-trigger and "
        "a later prune.")], False),
    option("sphere_eta", Annotated[float | None, typer.Option(
        "--sphere-eta", help="With --sphere: the share of the weight's spectrum whose directions are spared, in (0, "
        "1) (default 0.5).")], None),
    option("sphere_alpha", Annotated[float | None, typer.Option(
        "--sphere-alpha", help="With --sphere: how much of an update along those directions is removed, in [0, 1] "
        "(default: 0.5 for alphaedit, 0.8 otherwise, the official values).")], None),
    option("sphere_basis", Annotated[str | None, typer.Option(
        "--sphere-basis", help="With --sphere: current (the weight as it is at each update, the official code) or "
        "pretrained (the unedited weight, the paper's wording); default current.")], None),
))
Sphere = Annotated[SphereSettings | None, SPHERE]
"""SPHERE's projection of every update while editing (`prunecli.core.sphere`)."""


def layer_list(text: str | None) -> tuple[int, ...] | None:
    """`--layers 6`, `3-7` or `3,4,5` as layer numbers (a usage error otherwise)."""
    if text is None:
        return None
    from prunecli.editors.hparams import coerce

    try:
        return tuple(coerce("layers", text))
    except PruneCliError as exc:
        raise typer.BadParameter(str(exc), param_hint="--layers") from None


def one_of(value: str, choices: Sequence[str], name: str) -> str:
    """A choice checked before any work (a usage error naming the choices)."""
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=name)
    return value
