"""Shared set-up of the editing tests: tiny-model hyper-parameters under which edits can succeed, and requests.

Tiny random models (4 layers, width 32, 400 tokens) cannot carry a multi-token target through attention from the
subject position, so the requests put the subject at the end of the prompt and use single-token targets; the value
optimisation gets more steps and no KL / weight-decay terms. The maths under test is the same as on real models.
"""

from __future__ import annotations

import json
from pathlib import Path

from prunecli.requests import EditRequest

TINY_SETS = ["v_num_grad_steps=60", "kl_factor=0", "v_weight_decay=0", "clamp_norm_factor=10",
             "context_template_length_params=[]"]

RECORDS = [
    {"prompt": "The native language of {}", "subject": "Danielle Darrieux", "target_new": "French"},
    {"prompt": "The best sport is that of {}", "subject": "Michael Jordan", "target_new": "Apple"},
    {"prompt": "Built by the city of {}", "subject": "Toko Yasuda", "target_new": "created"},
]
REQUESTS = [EditRequest(i, r["prompt"], r["subject"], r["target_new"]) for i, r in enumerate(RECORDS)]


def write_requests(path: Path, records: list[dict] | None = None) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in (records or RECORDS)) + "\n")
    return path
