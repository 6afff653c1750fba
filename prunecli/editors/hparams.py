"""Typed hyper-parameters of ROME, MEMIT and AlphaEdit: packaged per-family defaults, user files, `--set` overrides.

Defaults live in `hparams/{rome,memit,alphaedit}.yaml` next to this module: a `defaults` section, per-family sections
that override it, and inside a family `by_depth` entries for model depths whose layers are known (GPT-2 XL's 48 layers,
LLaMA-2-7B's 32, SmolLM2-135M's 30). For other depths the layers follow from `layer_fraction` (the position of the
(last) edited layer as a fraction of the depth) and, for MEMIT and AlphaEdit, `num_edit_layers` consecutive layers
ending there, so tiny test models and unknown sizes get sensible layers too.

User files (YAML or JSON) may use EasyEdit's key names, so existing `hparams/ROME/*.yaml` files work: keys that only
tell EasyEdit where modules or statistics are (prunecli resolves those from the loaded model and the command line)
are accepted and ignored with a note; unknown keys are an error. YAML 1.1 reads `5e-1` as a string, so every value
is coerced to its field's type.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prunecli.core.textio import read_text
from prunecli.errors import PruneCliError

METHODS = ("rome", "memit", "alphaedit")

# EasyEdit keys that prunecli derives itself (from the loaded model, --stats, --device, --batch-size) or that only
# keep EasyEdit's books (precision, device placement, where it caches things): accepted and reported as not used.
IGNORED_KEYS = frozenset({
    "alg_name", "model_name", "device", "model_parallel", "rewrite_module_tmp", "layer_module_tmp",
    "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "v_loss_layer", "stats_dir",
    "mom2_dataset", "mom2_n_samples", "mom2_dtype", "max_length", "batch_size", "layer_selection", "fp16",
    "P_loc",  # EasyEdit AlphaEdit: where it saves its projector; prunecli computes P in memory per run
})
# EasyEdit's `alg_name` values and the prunecli method each selects (prunecli's ROME is R-ROME: one averaged key).
ALG_NAMES = {"rome": "rome", "r-rome": "rome", "r_rome": "rome", "memit": "memit", "alphaedit": "alphaedit"}
# R-ROME's key-handling switches, and the value of each that describes what prunecli's ROME does.
RROME_SWITCHES = {"original_implementation": False, "enable_prompt_keys": False, "enable_random_prefix_keys": True}
# Module names an EasyEdit file assumes: templates with `{}` for the layer number, and plain names.
MODULE_TEMPLATES = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp")
MODULE_NAMES = ("ln_f_module", "lm_head_module")
# Keys only AlphaEdit has; None (and absent from `to_json`) for the other methods, so their records are unchanged.
ALPHAEDIT_KEYS = ("nullspace_threshold", "L2")
# ROME's key handling: "averaged" (R-ROME: the prefix-averaged key k* in the update and its denominator) or
# "original" (the published ROME code: u = C^-1 k* but the denominator u^T k of the bare prompt's key), which the
# R-ROME paper blames for the collapse of long sequential runs. None (and absent from `to_json`) for other methods.
ROME_KEYS = ("averaged", "original")
# Keys only MEMIT has and that are off unless a family's defaults or the user set them; None (and absent from
# `to_json`) otherwise, so records of the published method are unchanged.
MEMIT_KEYS = ("prior_edit_weight", "retry_rounds", "retry_below")
# Keys of the packaged defaults that choose layers and are not hyper-parameters of the edit itself.
_LAYER_RULE_KEYS = ("layer_fraction", "num_edit_layers")


@dataclass(frozen=True)
class EditHParams:
    """Everything that determines an edit besides the model, the request and the key statistics."""

    method: str
    layers: tuple[int, ...]
    v_lr: float  # Adam learning rate of the value optimisation
    v_num_grad_steps: int
    v_stop_loss: float  # stop early once the mean target NLL is below this
    clamp_norm_factor: float  # |delta| <= clamp_norm_factor * |initial value|
    kl_factor: float  # weight of KL(original || edited) on the "{subject} is a" prompts
    v_weight_decay: float  # weight of |delta|^2 / |initial value|^2
    mom2_adjustment: bool  # ROME: u = C^-1 k* (needs statistics) instead of u = k*
    mom2_update_weight: float  # MEMIT: lambda in (lambda C + K K^T)^-1
    context_template_length_params: tuple[tuple[int, int], ...]  # (generated tokens, number of prefixes)
    fact_token: str = "subject_last"
    nullspace_threshold: float | None = None  # AlphaEdit: eigenvalues of the mean C below this span the null space
    L2: float | None = None  # AlphaEdit: ridge term L2 I added after projecting (the official key name)
    rome_key: str | None = None  # ROME: "averaged" | "original" (see ROME_KEYS)
    # MEMIT: weight w of the earlier edits' keys K_p in (lambda C + w K_p K_p^T + K K^T)^-1 (editors/memit.py);
    # None: the published MEMIT, which preserves only the corpus keys' outputs.
    prior_edit_weight: float | None = None
    # MEMIT: extra rounds per batch for the edits that did not take (editors/memit.py); None: one round, as published.
    retry_rounds: int | None = None
    # MEMIT with retry_rounds: also retry edits that took with the new target's mean token probability below this.
    retry_below: float | None = None
    # ROME/MEMIT/AlphaEdit: the most prompts (context prefixes + 1 per fact) whose value optimisation runs at once
    # (editors/value.py); a larger batch is optimised in groups of whole facts. Speed and memory only, not results.
    value_batch_rows: int = 128

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if not (k in (*ALPHAEDIT_KEYS, *MEMIT_KEYS, "rome_key") and v is None)}
        d["layers"] = list(self.layers)
        d["context_template_length_params"] = [list(p) for p in self.context_template_length_params]
        return d


# ------------------------------------------------------------------------------------------------- coercion
def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return float(value)  # also parses YAML 1.1 strings such as "5e-1"


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true or false, got {value!r}")


def _as_layers(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        text = value.strip().strip("[]")
        if "-" in text and "," not in text:  # "4-8"
            lo, hi = (int(x) for x in text.split("-", 1))
            return tuple(range(lo, hi + 1))
        value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"expected a non-empty list of layer numbers, got {value!r}")
    return tuple(_as_int(v) for v in value)


def _as_length_params(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"expected a list of [length, count] pairs, got {value!r}")
    pairs = []
    for item in value:
        if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
            raise ValueError(f"expected [length, count], got {item!r}")
        pairs.append((_as_int(item[0]), _as_int(item[1])))
    return tuple(pairs)


_COERCE: dict[str, Callable[[Any], Any]] = {
    "layers": _as_layers, "v_lr": _as_float, "v_num_grad_steps": _as_int, "v_stop_loss": _as_float,
    "clamp_norm_factor": _as_float, "kl_factor": _as_float, "v_weight_decay": _as_float,
    "mom2_adjustment": _as_bool, "mom2_update_weight": _as_float,
    "context_template_length_params": _as_length_params, "fact_token": str,
    "nullspace_threshold": _as_float, "L2": _as_float, "rome_key": str, "prior_edit_weight": _as_float,
    "retry_rounds": _as_int, "retry_below": _as_float, "value_batch_rows": _as_int,
}
assert set(_COERCE) == {f.name for f in dataclasses.fields(EditHParams)} - {"method"}


def coerce(key: str, value: Any) -> Any:
    try:
        return _COERCE[key](value)
    except (TypeError, ValueError) as exc:
        raise PruneCliError(f"hyper-parameter {key}: {exc}") from None


# ------------------------------------------------------------------------------------------------- sources
def _packaged(method: str) -> dict[str, Any]:
    text = resources.files("prunecli.editors").joinpath("hparams", f"{method}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def default_values(method: str, family: str, num_layers: int) -> dict[str, Any]:
    """The packaged defaults for a family and model depth, with the layers resolved to numbers."""
    if method not in METHODS:
        raise PruneCliError(f"unknown editing method {method!r}; use one of {', '.join(METHODS)}")
    doc = _packaged(method)
    family_doc = dict((doc.get("families") or {}).get(family) or {})
    by_depth = family_doc.pop("by_depth", None) or {}
    values = {**doc["defaults"], **family_doc, **(by_depth.get(num_layers) or {})}
    rule = {k: values.pop(k) for k in _LAYER_RULE_KEYS if k in values}
    if "layers" not in values:
        last = round(float(rule["layer_fraction"]) * (num_layers - 1))
        count = min(int(rule.get("num_edit_layers", 1)), last + 1)
        values["layers"] = list(range(last - count + 1, last + 1))
    return values


def read_hparams_file(path: str | Path) -> dict[str, Any]:
    """A user's YAML or JSON file as a flat mapping (EasyEdit files included)."""
    path = Path(path)
    if not path.is_file():
        raise PruneCliError(f"hyper-parameter file {path} does not exist")
    text = read_text(path, "hyper-parameter file")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except RecursionError:
        raise PruneCliError(f"cannot parse hyper-parameter file {path}: it is nested too deeply") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PruneCliError(f"cannot parse hyper-parameter file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PruneCliError(f"hyper-parameter file {path} must hold a mapping of key: value")
    return data


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` items; values are read as YAML (`layers=[4,5]`, `mom2_adjustment=false`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PruneCliError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _check_keys(values: Mapping[str, Any], where: str, ignored: list[str]) -> dict[str, Any]:
    known = {}
    for key, value in values.items():
        if key in _COERCE:
            known[key] = value
        elif key in IGNORED_KEYS:
            ignored.append(key)
        elif key in RROME_SWITCHES:
            if coerce_bool(key, value) != RROME_SWITCHES[key]:
                raise PruneCliError(f"{key}: {value!r} in {where} asks for key handling prunecli's ROME does not "
                                    f"implement (it uses one averaged key everywhere, as R-ROME with {key}: "
                                    f"{str(RROME_SWITCHES[key]).lower()})")
            ignored.append(key)
        else:
            raise PruneCliError(f"unknown hyper-parameter {key!r} in {where}; known: {', '.join(sorted(_COERCE))}")
    return known


def coerce_bool(key: str, value: Any) -> bool:
    try:
        return _as_bool(value)
    except ValueError as exc:
        raise PruneCliError(f"hyper-parameter {key}: {exc}") from None


def file_method(path: str | Path) -> str | None:
    """The prunecli method an EasyEdit file's `alg_name` names (None without one); an unknown one is an error."""
    user = read_hparams_file(path)
    if "alg_name" not in user:
        return None
    name = str(user["alg_name"]).strip().lower()
    if name not in ALG_NAMES:
        raise PruneCliError(f"{path} holds {user['alg_name']} hyper-parameters; prunecli edits with "
                            f"{', '.join(sorted(set(ALG_NAMES.values())))} (alg_name ROME, R-ROME, MEMIT, AlphaEdit)")
    return ALG_NAMES[name]


def check_file(method: str, path: str | Path) -> None:
    """Everything about a hyper-parameter file that needs no model (parsing, keys, alg_name): run before loading."""
    given = file_method(path)
    if given is not None and given != method:
        raise PruneCliError(f"{path} holds {read_hparams_file(path)['alg_name']} hyper-parameters, but the method is "
                            f"{method} (drop --method to use the file's)")
    _check_keys(read_hparams_file(path), str(path), [])


@dataclass(frozen=True)
class ModelModules:
    """What an EasyEdit file's module names are checked against: the loaded model's module names and the name of
    the projection prunecli edits in a layer."""

    names: frozenset[str]
    projection: Callable[[int], str]
    num_layers: int
    model_type: str


def check_modules(user: Mapping[str, Any], where: str, modules: ModelModules) -> None:
    """A file written for another architecture is an error, not a silent edit of whatever its numbers select."""
    other = f"{where} is for another architecture than this {modules.model_type} model"
    for key in MODULE_TEMPLATES:
        if key in user and str(user[key]).format(0) not in modules.names:
            raise PruneCliError(f"{other}: its {key} {user[key]!r} names no module of the model")
    if "rewrite_module_tmp" in user and str(user["rewrite_module_tmp"]).format(0) != modules.projection(0):
        raise PruneCliError(f"{other}: its rewrite_module_tmp {user['rewrite_module_tmp']!r} is not the MLP output "
                            f"projection prunecli edits ({modules.projection(0).replace('.0.', '.{}.')})")
    for key in MODULE_NAMES:
        if key in user and str(user[key]) not in modules.names:
            raise PruneCliError(f"{other}: its {key} {user[key]!r} names no module of the model")
    if "v_loss_layer" in user and _as_int(user["v_loss_layer"]) != modules.num_layers - 1:
        raise PruneCliError(f"{where} is for a model of {_as_int(user['v_loss_layer']) + 1} layers (v_loss_layer "
                            f"{user['v_loss_layer']}); this {modules.model_type} model has {modules.num_layers}: use "
                            "a file for this model, or drop v_loss_layer and set its layers")


def resolve_hparams(method: str, family: str, num_layers: int, file: str | Path | None = None,
                    sets: Sequence[str] = (), on_note: Callable[[str], None] | None = None,
                    modules: ModelModules | None = None) -> EditHParams:
    """Packaged defaults < `--hparams FILE` < `--set key=value`, coerced, validated against the model depth (and,
    with `modules`, the file's module names against the loaded model)."""
    values = default_values(method, family, num_layers)
    ignored: list[str] = []
    if file is not None:
        check_file(method, file)
        user = read_hparams_file(file)
        if modules is not None:
            check_modules(user, str(file), modules)
        values.update(_check_keys(user, str(file), ignored))
    values.update(_check_keys(parse_set(sets), "--set", ignored))
    if ignored and on_note is not None:
        on_note(f"not used (prunecli derives or does not need them): {', '.join(sorted(set(ignored)))}")
    hp = EditHParams(method=method, **{k: coerce(k, v) for k, v in values.items()})
    validate(hp, num_layers)
    return hp


def validate(hp: EditHParams, num_layers: int) -> None:
    bad = [layer for layer in hp.layers if not 0 <= layer < num_layers]
    if bad:
        raise PruneCliError(f"layers {bad} are out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    if hp.method == "rome" and len(hp.layers) != 1:
        raise PruneCliError(f"ROME edits exactly one layer, got layers {list(hp.layers)}")
    if len(set(hp.layers)) != len(hp.layers):
        raise PruneCliError(f"layers {list(hp.layers)} contain duplicates")
    if hp.method == "alphaedit":
        for key in ALPHAEDIT_KEYS:
            if getattr(hp, key) is None or not getattr(hp, key) > 0:
                raise PruneCliError(f"AlphaEdit needs {key} > 0, got {getattr(hp, key)!r}")
    else:
        given = [key for key in ALPHAEDIT_KEYS if getattr(hp, key) is not None]
        if given:
            raise PruneCliError(f"{', '.join(given)} only apply to alphaedit, not {hp.method}")
    if hp.method == "rome" and hp.rome_key not in ROME_KEYS:
        raise PruneCliError(f"rome_key must be one of {', '.join(ROME_KEYS)}, got {hp.rome_key!r}")
    if hp.method != "rome" and hp.rome_key is not None:
        raise PruneCliError(f"rome_key only applies to rome, not {hp.method}")
    given = [key for key in MEMIT_KEYS if getattr(hp, key) is not None]
    if given and hp.method != "memit":
        raise PruneCliError(f"{', '.join(given)} only apply to memit, not {hp.method}")
    if hp.prior_edit_weight is not None and not hp.prior_edit_weight >= 0:
        raise PruneCliError(f"hyper-parameter prior_edit_weight={hp.prior_edit_weight!r} is out of range")
    if hp.retry_rounds is not None and not hp.retry_rounds >= 0:
        raise PruneCliError(f"hyper-parameter retry_rounds={hp.retry_rounds!r} is out of range")
    if hp.retry_below is not None and not 0 <= hp.retry_below <= 1:
        raise PruneCliError(f"hyper-parameter retry_below={hp.retry_below!r} is out of range (a probability)")
    if hp.fact_token != "subject_last":
        raise PruneCliError(f"fact_token {hp.fact_token!r} is not supported (only subject_last)")
    checks = [("v_num_grad_steps", hp.v_num_grad_steps >= 1), ("v_lr", hp.v_lr > 0),
              ("value_batch_rows", hp.value_batch_rows >= 1),
              ("clamp_norm_factor", hp.clamp_norm_factor > 0), ("kl_factor", hp.kl_factor >= 0),
              ("v_weight_decay", hp.v_weight_decay >= 0), ("mom2_update_weight", hp.mom2_update_weight >= 0),
              ("context_template_length_params", all(n >= 0 and c >= 0 for n, c in hp.context_template_length_params))]
    for key, ok in checks:
        if not ok:
            raise PruneCliError(f"hyper-parameter {key}={getattr(hp, key)!r} is out of range")
