"""JSON as every prunecli output writes it (stdout's `--json`, reports): strict JSON, NaN-safe.

It lives below the CLI layer so library modules (evaluation reports) write the same JSON without importing Typer.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _json_safe(obj: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats are written as the strings "nan", "inf", "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(_json_safe(obj), indent=indent, allow_nan=False)
