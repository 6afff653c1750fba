"""The restraint options `prune` and `edit` share (one definition each), and their validation into settings."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from prunecli.errors import PruneCliError

if TYPE_CHECKING:
    from prunecli.core.restraint import RestraintSettings


class Fn(str, Enum):
    log = "log"
    linear = "linear"
    scale_free = "scale-free"


FnOpt = Annotated[Fn | None, typer.Option(
    "--fn", help="Restraint function F for singular values s > smax = sigma_max(W): log (paper, default): "
    "log_alpha(s) - log_alpha(smax) + smax; linear (paper, app. C.3): s/beta + (beta-1)/beta * smax; scale-free: "
    "smax * (s/smax)^(1 - strength), the same effect at any weight scale, never enlarges (docs/RESTRAINT.md).")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="Base of the log in log F (> 1; paper: 1.2, 1.5, 2 or e). "
                                         "Shrinks only where smax * ln(alpha) >= 1.")]
BetaOpt = Annotated[float, typer.Option("--beta", help="Divisor of linear F (> 1; paper: 2).")]
StrengthOpt = Annotated[float, typer.Option(
    "--strength", help="Strength t of scale-free F, in [0, 1]: 0 changes nothing, 0.5 maps s/smax to its square "
    "root, 1 cuts every value to smax.")]
ClampOpt = Annotated[bool, typer.Option("--clamp", help="Never enlarge a singular value: use min(s, F(s)) (log F "
                                        "enlarges values just above smax when smax * ln(alpha) < 1).")]
TargetKappaOpt = Annotated[float | None, typer.Option(
    "--target-kappa", help="Per matrix, the mildest scale-free strength with kappa(W + D') <= K (reported with "
    "kappa before/after); K below kappa(W) is refused. Replaces --fn/--strength.")]


def restraint_settings(fn: Fn | None, alpha: float, beta: float, strength: float, clamp: bool,
                       target_kappa: float | None) -> RestraintSettings:
    """Checked settings from the shared options: bad values are one-line errors, contradictions usage errors."""
    from prunecli.core.restraint import RestraintSettings

    if target_kappa is not None and fn not in (None, Fn.scale_free):
        raise typer.BadParameter(f"--target-kappa searches the strength of scale-free F; it does not combine with "
                                 f"--fn {fn.value}", param_hint="--target-kappa")
    settings = RestraintSettings("scale-free" if target_kappa is not None else (fn or Fn.log).value, alpha, beta,
                                 strength, clamp, target_kappa)
    try:
        settings.check()
    except PruneCliError as exc:  # a value out of its range is a usage error (exit 2), caught before any work
        raise typer.BadParameter(str(exc)) from None
    return settings
