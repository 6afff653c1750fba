"""Hyper-parameters: the machinery every editor's own class shares (packaged defaults, user files, `--set`).

Each editor declares its hyper-parameters as a frozen dataclass derived from `HParams`, in its own module, with its
own `validate()`; the fields say what is known and of which type, so a new editor adds no second list anywhere.
Values come, later ones winning, from:

1. the packaged defaults `hparams/<method>.yaml` next to this module: a `defaults` section, per-family sections that
   override it, and inside a family `by_depth` entries for model depths whose layers are known (GPT-2 XL's 48
   layers, LLaMA-2-7B's 32, SmolLM2-135M's 30). For other depths the layers follow from `layer_fraction` (the
   position of the (last) edited layer as a fraction of the depth) and `num_edit_layers` consecutive layers ending
   there, so tiny test models and unknown sizes get sensible layers too;
2. a user file (`--hparams`, YAML or JSON), which may be EasyEdit's: keys that only tell EasyEdit where modules or
   statistics are (prunecli resolves those from the loaded model and the command line) are accepted and ignored
   with a note, unknown keys are an error, and module names are checked against the loaded model;
3. `--set key=value` overrides.

YAML 1.1 reads `5e-1` as a string, so every value is coerced to its field's type.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from prunecli.core.textio import read_text
from prunecli.errors import PruneCliError

H = TypeVar("H", bound="HParams")

# EasyEdit keys that prunecli derives itself (from the loaded model, --stats, --device, --batch-size) or that only
# keep EasyEdit's books (precision, device placement, where it caches things): accepted and reported as not used.
IGNORED_KEYS = frozenset({
    "alg_name", "model_name", "device", "model_parallel", "rewrite_module_tmp", "layer_module_tmp",
    "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "v_loss_layer", "stats_dir",
    "mom2_dataset", "mom2_n_samples", "mom2_dtype", "max_length", "batch_size", "layer_selection", "fp16",
    "P_loc",  # EasyEdit AlphaEdit: where it saves its projector; prunecli computes P in memory per run
})
# Module names an EasyEdit file assumes: templates with `{}` for the layer number, and plain names.
MODULE_TEMPLATES = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp")
MODULE_NAMES = ("ln_f_module", "lm_head_module")
# Keys of the packaged defaults that choose layers and are not hyper-parameters of the edit itself.
_LAYER_RULE_KEYS = ("layer_fraction", "num_edit_layers")


# ------------------------------------------------------------------------------------------------- coercion
def as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def as_float(value: Any) -> float:
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


def as_layers(value: Any) -> tuple[int, ...]:
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
    return tuple(as_int(v) for v in value)


def _as_length_params(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"expected a list of [length, count] pairs, got {value!r}")
    pairs = []
    for item in value:
        if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
            raise ValueError(f"expected [length, count], got {item!r}")
        pairs.append((as_int(item[0]), as_int(item[1])))
    return tuple(pairs)


def _as_str_tuple(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"expected a list of names, got {value!r}")
    return tuple(items)


# A field's declared type -> how a value from a file or --set becomes one (optional fields: the same without None).
_COERCERS: dict[Any, Callable[[Any], Any]] = {
    int: as_int, float: as_float, bool: _as_bool, str: str, tuple[int, ...]: as_layers,
    tuple[tuple[int, int], ...]: _as_length_params, tuple[str, ...]: _as_str_tuple,
}


def coerce(key: str, value: Any, to: Any = tuple[int, ...]) -> Any:
    """`value` as type `to` (a field type of `_COERCERS`; layer numbers by default), a bad one as one clear line."""
    try:
        return _COERCERS[to](value)
    except (TypeError, ValueError) as exc:
        raise PruneCliError(f"hyper-parameter {key}: {exc}") from None


def _field_type(hint: Any) -> Any:
    """`float | None` -> float: optional fields coerce like their type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, type(float | None)) and len(args) == 1 else hint


# ------------------------------------------------------------------------------------------------- the base class
@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of one editing method; each editor derives its own class (fields with defaults only where a
    file need not give them) and names it in `Editor.hparams`.

    `to_json` is what delta histories record: the method, then every field in declaration order, fields that are
    None left out (options that are off add nothing to the records of the published method)."""

    method: ClassVar[str]
    accepted: ClassVar[Mapping[str, Any]] = {}
    """Keys of other tools' files that are accepted (and ignored) when they hold exactly this value: settings of
    theirs that describe what prunecli does anyway (R-ROME's key-handling switches, for ROME)."""

    layers: tuple[int, ...]

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: _field_type(hints[f.name]) for f in dataclasses.fields(cls)}

    @classmethod
    def coerce(cls, key: str, value: Any) -> Any:
        return coerce(key, value, cls.field_types()[key])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _jsonable(value)
        return out

    def validate(self, num_layers: int) -> None:
        """Checks against the model depth; subclasses add their own (and call this)."""
        bad = [layer for layer in self.layers if not 0 <= layer < num_layers]
        if bad:
            raise PruneCliError(f"layers {bad} are out of range: the model has {num_layers} layers "
                                f"(0-{num_layers - 1})")
        if len(set(self.layers)) != len(self.layers):
            raise PruneCliError(f"layers {list(self.layers)} contain duplicates")

    def require(self, checks: Sequence[tuple[str, bool]]) -> None:
        """Each (field, condition): a false condition is the error `hyper-parameter F=V is out of range`."""
        for key, ok in checks:
            if not ok:
                raise PruneCliError(f"hyper-parameter {key}={getattr(self, key)!r} is out of range")

    # ------------------------------------------------------------------------------------------ sources
    @classmethod
    def defaults(cls, family: str, num_layers: int) -> dict[str, Any]:
        """The packaged defaults for a family and model depth, with the layers resolved to numbers."""
        text = resources.files("prunecli.editors").joinpath("hparams", f"{cls.method}.yaml").read_text("utf-8")
        doc = yaml.safe_load(text)
        family_doc = dict((doc.get("families") or {}).get(family) or {})
        by_depth = family_doc.pop("by_depth", None) or {}
        values = {**doc["defaults"], **family_doc, **(by_depth.get(num_layers) or {})}
        rule = {k: values.pop(k) for k in _LAYER_RULE_KEYS if k in values}
        if "layers" not in values:
            last = round(float(rule["layer_fraction"]) * (num_layers - 1))
            count = min(int(rule.get("num_edit_layers", 1)), last + 1)
            values["layers"] = list(range(last - count + 1, last + 1))
        return values

    @classmethod
    def check_modules(cls, user: Mapping[str, Any], where: str, modules: ModelModules) -> None:
        """A file written for another architecture is an error, not a silent edit of whatever its numbers select
        (module names and depth against the loaded model; editors that edit other modules extend this)."""
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
        if "v_loss_layer" in user and as_int(user["v_loss_layer"]) != modules.num_layers - 1:
            raise PruneCliError(f"{where} is for a model of {as_int(user['v_loss_layer']) + 1} layers (v_loss_layer "
                                f"{user['v_loss_layer']}); this {modules.model_type} model has {modules.num_layers}: "
                                "use a file for this model, or drop v_loss_layer and set its layers")

    @classmethod
    def known_keys(cls, values: Mapping[str, Any], where: str, ignored: list[str]) -> dict[str, Any]:
        """The keys of `values` this class has; bookkeeping keys of other tools go to `ignored`, others are errors."""
        known, types = {}, cls.field_types()
        for key, value in values.items():
            if key in types:
                known[key] = value
            elif key in IGNORED_KEYS:
                ignored.append(key)
            elif key in cls.accepted:
                if coerce(key, value, bool) != cls.accepted[key]:
                    raise PruneCliError(f"{key}: {value!r} in {where} asks for key handling prunecli's {cls.method} "
                                        f"does not implement ({key}: {str(cls.accepted[key]).lower()} is what it "
                                        "does)")
                ignored.append(key)
            else:
                owners = sorted(c.method for c in _subclasses(HParams) if key in c.field_types())
                if owners:
                    raise PruneCliError(f"{key} only applies to {', '.join(owners)}, not {cls.method}")
                raise PruneCliError(f"unknown hyper-parameter {key!r} in {where}; known: {', '.join(sorted(types))}")
        return known

    @classmethod
    def check_file(cls, path: str | Path) -> None:
        """Everything about a hyper-parameter file's keys that needs no model: run before the model loads (which
        method an EasyEdit file's alg_name names is the registry's check, `registry.check_file`)."""
        cls.known_keys(read_hparams_file(path), str(path), [])

    @classmethod
    def resolve(cls: type[H], family: str, num_layers: int, file: str | Path | None = None, sets: Sequence[str] = (),
                on_note: Callable[[str], None] | None = None, modules: ModelModules | None = None) -> H:
        """Packaged defaults < `--hparams FILE` < `--set key=value`, coerced and validated against the model depth
        (and, with `modules`, the file's module names against the loaded model)."""
        values = cls.defaults(family, num_layers)
        ignored: list[str] = []
        if file is not None:
            user = read_hparams_file(file)
            if modules is not None:
                cls.check_modules(user, str(file), modules)
            values.update(cls.known_keys(user, str(file), ignored))
        values.update(cls.known_keys(parse_set(sets), "--set", ignored))
        if ignored and on_note is not None:
            on_note(f"not used (prunecli derives or does not need them): {', '.join(sorted(set(ignored)))}")
        hp = cls(**{k: cls.coerce(k, v) for k, v in values.items()})
        hp.validate(num_layers)
        return hp


def _subclasses(cls: type[HParams]) -> list[type[HParams]]:
    """Every method's class defined so far (the registry imports them all before an editor checks its inputs)."""
    out = []
    for sub in cls.__subclasses__():
        if "method" in vars(sub):
            out.append(sub)
        out.extend(_subclasses(sub))
    return out


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


# ------------------------------------------------------------------------------------------------- files
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


@dataclass(frozen=True)
class ModelModules:
    """What an EasyEdit file's module names are checked against: the loaded model's module names and the name of
    the projection prunecli edits in a layer."""

    names: frozenset[str]
    projection: Callable[[int], str]
    num_layers: int
    model_type: str
