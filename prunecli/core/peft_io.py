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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prunecli.core.atomic import atomic_directory
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.core.lowrank import entry_svd
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
                rtol: float = 1e-6) -> dict[str, Any]:
    """Write `delta` as a PEFT LoRA adapter folder; returns the per-module ranks.

    Singular values below `rtol * s_max` of an entry are dropped (they are round-off of the factored form).
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
    with atomic_directory(out, force) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {"output": str(out), "r": r, "ranks": ranks, "fan_in_fan_out": config["fan_in_fan_out"]}


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """PEFT matches pattern keys as a suffix of the module path (or exactly)."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return float(value)
    return default


def delta_from_peft(path: Path, base: Checkpoint) -> Delta:
    """Read a PEFT LoRA adapter folder as a delta of `base` (factors scaled exactly as PEFT merges them)."""
    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        weights = load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise PruneCliError(f"cannot read PEFT adapter {path}: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise PruneCliError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise PruneCliError(f"{path}: DoRA adapters are not a low-rank update of the weight and are not supported")
    layout = "in_out" if config.get("fan_in_fan_out") else "out_in"
    r_default, alpha_default = float(config["r"]), float(config.get("lora_alpha", config["r"]))
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
        lora_a, lora_b = weights[a_key].float(), weights[b_key].float()
        entry = DeltaEntry.lowrank(lora_b * scale, lora_a.T, layout)
        delta.add(base.canonical(module + ".weight"), entry, base)
    delta.history.append({"op": "import-peft", "adapter": str(path)})
    return delta
