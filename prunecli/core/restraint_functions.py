"""The restraint table: every function F that PRUNE-style restraint can apply, and their parameters, in one place.

`RestraintSettings` holds one restraint as a user chose it; each numeric parameter is a field made with `_parameter`
(default, valid range, help). `FUNCTIONS` names each F with the parameters it reads and its formula. The CLI options
(`--fn`, `--alpha`, ...), their checks and the history entries of a restraint are all derived from these two, so a new
function with a new parameter is written here and nowhere else. No torch import: the CLI reads this table to build
its options, and `prunecli --help` must start instantly (the formulas only use tensor methods).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from prunecli.errors import PruneCliError

if TYPE_CHECKING:
    import torch

MAX_STRENGTH = 2.0
"""Scale-free strengths run from 0 (no restraint) over 1 (values above sigma_max cut to it) to 2 (D' = 0)."""


def _parameter(default: float, valid: Callable[[float], bool], rule: str, help: str) -> Any:
    """A numeric parameter of the restraint functions: its default, its valid range (`rule` says it in words), and
    its help text. The command-line option `--<name>` and the history entry are derived from it."""
    return field(default=default, metadata={"valid": valid, "rule": rule, "help": help})


@dataclass(frozen=True)
class RestraintSettings:
    """One restraint as a user chose it (`prune`'s options, `edit`'s restraints while editing): the function F, its
    parameters, whether to clamp, and `target_kappa` (scale-free F with its strength searched per matrix).

    A new parameter is one field here made with `_parameter`; a new function is one `RestraintFunction` in
    `FUNCTIONS`. The CLI options, their checks and the history entries follow from these two places."""

    fn: str = "log"
    alpha: float = _parameter(1.2, lambda a: a > 1, "a finite number > 1 (the base of the log in F)",
                              "Base of the log in log F (> 1; paper: 1.2, 1.5, 2 or e). Shrinks only where "
                              "smax * ln(alpha) >= 1.")
    beta: float = _parameter(2.0, lambda b: b > 1, "a finite number > 1 (the slope divisor of linear F)",
                             "Divisor of linear F (> 1; paper: 2).")
    strength: float = _parameter(0.5, lambda t: 0 <= t <= MAX_STRENGTH,
                                 f"in [0, {MAX_STRENGTH:g}] (0: no restraint, 1: every value cut to sigma_max(W), "
                                 f"2: the delta removed)",
                                 f"Strength t of scale-free F, in [0, {MAX_STRENGTH:g}]: 0 changes nothing, 0.5 maps "
                                 "s/smax to its square root, 1 cuts every value to smax, 2 removes the delta.")
    clamp: bool = False
    target_kappa: float | None = None

    @classmethod
    def parameters(cls) -> list[Field[Any]]:
        """The numeric parameters of the functions, in table order."""
        return [f for f in fields(cls) if "valid" in f.metadata]

    def check(self) -> None:
        """Reject what makes F meaningless, as one user-facing line."""
        if self.fn not in FUNCTIONS:
            raise PruneCliError(f"unknown restraint function {self.fn!r} (choose one of {', '.join(FUNCTIONS)})")
        for f in self.parameters():
            value = getattr(self, f.name)
            if not (math.isfinite(value) and f.metadata["valid"](value)):
                raise PruneCliError(f"--{f.name} must be {f.metadata['rule']}, got {value}")
        if self.target_kappa is not None and not (math.isfinite(self.target_kappa) and self.target_kappa >= 1):
            raise PruneCliError(f"--target-kappa must be a finite number >= 1, got {self.target_kappa}")

    def with_strength(self, strength: float) -> RestraintSettings:
        """Scale-free F at `strength` (the kappa target's search tries many)."""
        return replace(self, fn="scale-free", strength=strength, clamp=False)

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON object (in `prune --json` and in the history's prune entries)."""
        return asdict(self)


@dataclass(frozen=True)
class RestraintFunction:
    """One F: its name (`--fn`), the parameters it reads, its formula in words (help and docs), and F(s) for the
    singular values s > sigma_max (the others are kept by `restraint_values`)."""

    name: str
    uses: tuple[str, ...]
    formula: str
    values: Callable[[torch.Tensor, float, RestraintSettings], torch.Tensor]


def _log(s: torch.Tensor, smax: float, p: RestraintSettings) -> torch.Tensor:
    return (s.log() - math.log(smax)) / math.log(p.alpha) + smax


def _linear(s: torch.Tensor, smax: float, p: RestraintSettings) -> torch.Tensor:
    return s / p.beta + (p.beta - 1) / p.beta * smax


def _scale_free(s: torch.Tensor, smax: float, p: RestraintSettings) -> torch.Tensor:
    # smax * (s / smax) ** (1 - t) = s * (s / smax) ** -t; written so, a factor <= 1 times s, rounding cannot make
    # F(s) exceed s either. Beyond t = 1 every value shrinks by 2 - t (see `restraint_values`).
    return s * (-min(p.strength, 1.0) * (s.log() - math.log(smax))).exp()


FUNCTIONS: dict[str, RestraintFunction] = {f.name: f for f in (
    RestraintFunction("log", ("alpha",), "log_alpha(s) - log_alpha(smax) + smax (paper, default)", _log),
    RestraintFunction("linear", ("beta",), "s/beta + (beta-1)/beta * smax (paper, app. C.3)", _linear),
    RestraintFunction("scale-free", ("strength",), "smax * (s/smax)^(1 - strength): the same effect at any weight "
                      "scale, never enlarges (docs/RESTRAINT.md)", _scale_free),
)}


def restraint_values(s: torch.Tensor, sigma_max: float, settings: RestraintSettings) -> torch.Tensor:
    """F(s) where s > sigma_max, s elsewhere (the paper's formulas as they are, no clamping)."""
    f = FUNCTIONS[settings.fn].values(s, sigma_max, settings)
    kept = f.where(s > sigma_max, s)
    if settings.fn == "scale-free" and settings.strength > 1:
        return (2 - settings.strength) * kept
    return kept


# ------------------------------------------------------------------------ restraint of each update while editing
ALPHA_BY_METHOD = {"alphaedit": 0.5}
"""The official defaults of alpha: 0.5 on AlphaEdit, DEFAULT_ALPHA on MEMIT (and every other editor)."""
DEFAULT_ALPHA = 0.8


@dataclass(frozen=True)
class SphereSettings:
    """SPHERE while editing: `eta` the share of the row-normalised weight's spectrum whose directions are spared,
    `alpha` how much of an update along them is removed (1: all; None: the official default for the method,
    `for_method`), `basis` whether the directions come from the weight as it is when each update is made
    (`current`, the official code) or from the unedited weight (`pretrained`, the paper's wording)."""

    eta: float = 0.5
    alpha: float | None = None
    basis: str = "current"

    def for_method(self, method: str) -> SphereSettings:
        """These settings with alpha resolved for an editing method."""
        if self.alpha is not None:
            return self
        return SphereSettings(self.eta, ALPHA_BY_METHOD.get(method, DEFAULT_ALPHA), self.basis)

    def check(self) -> None:
        if not 0 < self.eta < 1:
            raise PruneCliError(f"--sphere-eta must be in (0, 1) (a share of the spectrum), got {self.eta}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise PruneCliError(f"--sphere-alpha must be in [0, 1] (0: no projection, 1: full), got {self.alpha}")
        if self.basis not in ("current", "pretrained"):
            raise PruneCliError(f"--sphere-basis must be current or pretrained, got {self.basis!r}")

    def to_json(self) -> dict[str, object]:
        return {"eta": self.eta, "alpha": self.alpha, "basis": self.basis}
