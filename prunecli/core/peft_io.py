"""Deltas as PEFT LoRA adapters, both ways (docs/DESIGN.md section 8).

A delta entry D = U diag(s) V^T ([out, in], math orientation) becomes lora_B = U sqrt(s) [out, r] and
lora_A = sqrt(s) V^T [r, in] with lora_alpha = r (scale 1). PEFT builds B @ A as [out, in] for every layer type and
transposes it for GPT-2's Conv1D when `fan_in_fan_out` is true, so the factors are the same for both layouts; only the
flag differs. Uneven ranks go to `rank_pattern` / `alpha_pattern`.

Reading an adapter gives back factors a = B * (alpha / r), b = A^T (PEFT's own scaling, rsLoRA included). Adapters
carry no fingerprint of their base, so the base the user names is taken as the base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from prunecli.core.artifacts import read_tensors
from prunecli.core.atomic import Inputs, atomic_directory
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry, add_update
from prunecli.core.history import ImportPeftOp
from prunecli.core.lowrank import entry_svd
from prunecli.core.safetensors_stream import TensorSource, write_safetensors
from prunecli.core.textio import read_json_object
from prunecli.errors import PruneCliError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_peft_adapter(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).exists()


def _module(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise PruneCliError(f"cannot export {weight_name!r} as LoRA: only '.weight' matrices are LoRA targets")
    return weight_name[: -len(".weight")]


def export_lora(delta: Delta, base: Checkpoint, out: Path, force: bool = False,
                rtol: float = 1e-6, inputs: Inputs = ()) -> dict[str, Any]:
    """Write `delta` as a PEFT LoRA adapter folder; returns the per-module ranks.

    Singular values below `rtol * s_max` of an entry are dropped (they are round-off of the factored form). The
    merged weight W + B A must be finite in the base's dtype (an adapter that breaks the model is not written), and
    `out` may never be, hold or sit inside the base or one of `inputs`.
    """
    layouts = {e.layout for e in delta.entries.values()}
    if len(layouts) > 1:
        raise PruneCliError("this delta mixes Conv1D and Linear weights; PEFT's fan_in_fan_out is one flag per "
                            "adapter, so export the two kinds separately (--select)")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, entry in delta.entries.items():
        module = _module(base.canonical(name))
        svd = entry_svd(entry)
        keep = svd.s > (svd.s[0] * rtol if len(svd.s) else 0)
        k = max(int(keep.sum()), 1)
        root = svd.s[:k].sqrt()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = (svd.u[:, :k] * root).float().contiguous()
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = (svd.v[:, :k] * root).T.float().contiguous()
        ranks[module] = k
        add_update(name, base.get(name), entry.stored_update())  # refuses a merge with NaN/Inf
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base.path),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: k for m, k in ranks.items() if k != r},
        "target_modules": sorted(ranks),
        "fan_in_fan_out": layouts == {"in_out"},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    sources = [TensorSource(k, "F32", tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]
    with atomic_directory(out, force, [("base checkpoint", base.path), *inputs]) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS, sources, {"format": "pt"})  # follows the umask, unlike save_file
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {"output": str(out), "r": r, "ranks": ranks, "fan_in_fan_out": config["fan_in_fan_out"]}


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """PEFT matches pattern keys as a suffix of the module path (or exactly)."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return float(value)
    return default


def _config(path: Path) -> dict[str, Any]:
    """adapter_config.json, checked where it is read: a JSON object with an integer rank `r` >= 1, a finite
    `lora_alpha`, and `rank_pattern` / `alpha_pattern` objects of such values."""
    config = read_json_object(path / ADAPTER_CONFIG, "PEFT adapter config")
    if config.get("peft_type") != "LORA":
        raise PruneCliError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise PruneCliError(f"{path}: DoRA adapters are not a low-rank update of the weight and are not supported")
    if "r" not in config:
        raise PruneCliError(f"PEFT adapter {path}: {ADAPTER_CONFIG} has no rank 'r'")
    _rank(path, "r", config["r"])
    _alpha(path, "lora_alpha", config.get("lora_alpha", config["r"]))
    for key, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise PruneCliError(f"PEFT adapter {path}: {key} in {ADAPTER_CONFIG} is a {type(pattern).__name__}, "
                                "expected an object mapping module names to values")
        for module, value in pattern.items():
            check(path, f"{key}[{module!r}]", value)
    return config


def _rank(path: Path, key: str, value: Any) -> int:
    if type(value) is not int or value < 1:
        raise PruneCliError(f"PEFT adapter {path}: {key} in {ADAPTER_CONFIG} is {value!r}, expected an integer >= 1")
    return value


def _alpha(path: Path, key: str, value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise PruneCliError(f"PEFT adapter {path}: {key} in {ADAPTER_CONFIG} is {value!r}, expected a finite "
                            "number > 0")
    return float(value)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise PruneCliError(f"PEFT adapter {path} has no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    return read_tensors(file, "PEFT adapter weights")[1]


def delta_from_peft(path: Path, base: Checkpoint) -> Delta:
    """Read a PEFT LoRA adapter folder as a delta of `base` (factors scaled exactly as PEFT merges them).

    Validated like a delta file: finite factors, a finite positive scale, and ranks that agree between lora_A,
    lora_B and the config.
    """
    path = Path(path)
    config = _config(path)
    weights = _weights(path)
    layout = "in_out" if config.get("fan_in_fan_out") else "out_in"
    r_default = float(config["r"])
    alpha_default = float(config.get("lora_alpha", config["r"]))
    delta = Delta.for_base(base)
    modules = sorted({k[: -len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")})
    if not modules:
        raise PruneCliError(f"{path}: no lora_A/lora_B weights found")
    for key in modules:
        a_key, b_key = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
        if b_key not in weights:
            raise PruneCliError(f"{path}: {a_key} has no matching {b_key}")
        module = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        r = _pattern_value(config.get("rank_pattern") or {}, module, r_default)
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha_default)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        lora_a, lora_b = weights[a_key], weights[b_key]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise PruneCliError(f"{path}: {module}: lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)} are "
                                "not [r, in] and [out, r] matrices of one rank r")
        if lora_a.shape[0] != int(r):
            raise PruneCliError(f"{path}: {module}: the factors have rank {lora_a.shape[0]}, the config says "
                                f"r = {int(r)}")
        if not lora_a.is_floating_point() or not lora_b.is_floating_point():
            raise PruneCliError(f"{path}: {module}: the factors are stored as {lora_a.dtype}/{lora_b.dtype}, "
                                "not floating point")
        if not math.isfinite(scale) or scale <= 0:
            raise PruneCliError(f"{path}: {module}: the scale alpha/r = {scale!r} is not a finite positive number")
        a = lora_b.float() * scale
        for what, t in (("lora_A", lora_a), ("lora_B", lora_b), ("lora_B * scale", a)):
            if not bool(torch.isfinite(t.float()).all()):
                raise PruneCliError(f"{path}: {module}: {what} contains NaN or Inf values")
        delta.add(base.canonical(module + ".weight"), DeltaEntry.lowrank(a, lora_a.float().T, layout), base)
    return delta.with_entries(delta.entries, ImportPeftOp(str(path)))
