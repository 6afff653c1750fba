"""Training MEND's networks on edit records (`prunecli train-mend`), with validation, early stopping and resume.

One step takes B training records and (paper section 3.2, the published code's losses):
1. computes the gradient rows of the edit loss on the *unedited* model (sum over the B edit prompts of the mean
   target NLL, `mend.edit_factors`), and feeds the rows to the normalisation statistics;
2. turns them into one update per weight with the networks (differentiable), and runs the edited model, with the
   updates added as low-rank terms (`mend.low_rank_added`), on
   - the edit and rephrase prompts: L_edit = mean target NLL (generalisation to paraphrases is what is trained), and
   - one unrelated prompt per record (its `loc` / `locality_prompt` with answer, or else another record's edit
     prompt): L_loc = KL(p_unedited || p_edited) per token, averaged over its tokens;
3. minimises edit_weight * L_edit + loc_weight * L_loc with Adam over the networks and the per-weight edit
   learning rates (their own learning rate, lr_lr).

The order of records is a function of (seed, step), and everything else is deterministic, so a run stopped and
resumed from its checkpoint reaches the same networks as one run without a stop. Validation runs every `val_every`
steps on the held-out records; the archive keeps the networks of the best validation loss, and training stops after
`patience` validations without improvement. The checkpoint (`<archive>.ckpt`, safetensors, written atomically after
every validation) holds the current and best networks, Adam's state and the training record.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunecli.core.artifacts import MEND_CHECKPOINT, read_artifact, write_artifact
from prunecli.core.checkpoint import Checkpoint
from prunecli.editors.mend.archive import MendArchive, base_fingerprints
from prunecli.editors.mend.networks import (
    MendConfig,
    MendNetworks,
    MendTarget,
    edit_factors,
    encode_targets,
    low_rank_added,
    sequence_correct,
    sequence_nll,
)
from prunecli.errors import PruneCliError
from prunecli.progress import Progress, no_progress
from prunecli.requests import EditRequest


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; `steps` and `patience` may change on resume, nothing else."""

    layers: tuple[int, ...]
    steps: int = 1000
    batch_size: int = 10
    val_fraction: float = 0.1
    lr: float = 1e-4  # Adam, networks (the paper's 1e-6 assumes ~100k steps; CPU runs are far shorter)
    lr_lr: float = 1e-5  # Adam, per-weight edit learning rates (Adam moves them ~lr_lr per step; init 1e-4)
    edit_weight: float = 0.1  # the published code's cedit
    loc_weight: float = 1.0  # cloc
    val_every: int = 100
    patience: int = 5  # validations without improvement before stopping
    seed: int = 0
    mend: MendConfig = MendConfig()

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    def resumable_from(self, other: dict[str, Any]) -> bool:
        mine, theirs = self.to_json(), dict(other)
        for key in ("steps", "patience"):
            mine.pop(key)
            theirs.pop(key, None)
        return mine == theirs


def split_records(records: Sequence[EditRequest], val_fraction: float, seed: int
                  ) -> tuple[list[EditRequest], list[EditRequest]]:
    """A seeded shuffle, then the last `val_fraction` of it held out for validation."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if len(records) - n_val < 1:
        raise PruneCliError(f"{len(records)} record(s) leave nothing to train on after holding out {n_val}")
    shuffled = [records[i] for i in order]
    return shuffled[: len(records) - n_val], shuffled[len(records) - n_val:]


def locality_pair(record: EditRequest, other: EditRequest) -> tuple[str, str]:
    """The unrelated (prompt, answer) whose predictions the edit must leave alone."""
    if record.locality_prompts:
        answer = record.locality_answers[0] if record.locality_answers else ""
        return record.locality_prompts[0], answer or other.target_new
    return other.text, other.target_true or other.target_new


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Records of a step: consecutive slices of one seeded permutation per epoch (a pure function of the step)."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1))
        out.append(int(perm[pos]))
    return out


def _loc_kl(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(pre || post) of the next-token distributions."""
    lp_pre = torch.log_softmax(pre.float(), -1)
    lp_post = torch.log_softmax(post.float(), -1)
    kl = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def step_losses(model: torch.nn.Module, tokenizer, networks: MendNetworks,  # noqa: ANN001
                records: Sequence[EditRequest], others: Sequence[EditRequest], config: TrainConfig,
                observe: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective on one batch of edits (differentiable in the networks) and its metrics."""
    device = next(model.parameters()).device
    pre_loss, factors = edit_factors(model, tokenizer, networks, records)
    if observe:
        networks.observe(factors)
    updates = networks.updates(factors)
    prompts = [r.text for r in records] + [p for r in records for p in r.rephrase_prompts]
    answers = [r.target_new for r in records] + [r.target_new for r in records for _ in r.rephrase_prompts]
    edit_batch = encode_targets(tokenizer, prompts, answers, device)
    loc = [locality_pair(r, o) for r, o in zip(records, others)]
    loc_batch = encode_targets(tokenizer, [p for p, _ in loc], [a for _, a in loc], device)
    mask = loc_batch.attention_mask.float()
    with torch.no_grad():
        pre_loc = model(**loc_batch.inputs()).logits
    with low_rank_added(model, networks.targets, updates):
        post_edit = model(**edit_batch.inputs()).logits
        post_loc = model(**loc_batch.inputs()).logits
    nll = sequence_nll(post_edit, edit_batch)
    l_edit = nll.mean()
    l_loc = _loc_kl(pre_loc, post_loc, mask)
    loss = config.edit_weight * l_edit + config.loc_weight * l_loc
    with torch.no_grad():
        correct = sequence_correct(post_edit, edit_batch).float()
        n = len(records)
        agree = ((pre_loc.argmax(-1) == post_loc.argmax(-1)).float() * mask).sum() / mask.sum()
    metrics = {"loss": float(loss.detach()), "edit_nll": float(l_edit.detach()), "loc_kl": float(l_loc.detach()),
               "pre_nll": pre_loss / n, "edit_acc": float(correct[:n].mean()),
               "rephrase_acc": float(correct[n:].mean()) if len(correct) > n else float("nan"),
               "loc_agree": float(agree)}
    return loss, metrics


def _mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts if not math.isnan(p[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def validate(model: torch.nn.Module, tokenizer, networks: MendNetworks,  # noqa: ANN001
             records: Sequence[EditRequest], config: TrainConfig) -> dict[str, float]:
    """Mean metrics over the held-out records, in batches of the training size (no statistics update)."""
    networks.eval()
    parts = []
    for start in range(0, len(records), config.batch_size):
        chunk = list(records[start:start + config.batch_size])
        others = [records[(start + i + 1) % len(records)] for i in range(len(chunk))]
        with torch.no_grad():  # the edit gradient inside is still computed (edit_factors enables it)
            _, metrics = step_losses(model, tokenizer, networks, chunk, others, config, observe=False)
        parts.append(metrics)
    networks.train()
    return _mean_metrics(parts)


@dataclass
class TrainState:
    """What a checkpoint restores besides the tensors."""

    step: int = 0
    best_step: int | None = None
    best_val: float | None = None
    bad_evals: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None


@dataclass
class TrainResult:
    archive: MendArchive
    state: TrainState
    n_train: int
    n_val: int


def _optimizer(networks: MendNetworks, config: TrainConfig) -> torch.optim.Adam:
    nets = [p for n, p in networks.named_parameters() if n != "edit_lrs"]
    return torch.optim.Adam([{"params": nets, "lr": config.lr}, {"params": [networks.edit_lrs], "lr": config.lr_lr}])


def save_checkpoint(path: Path, networks: MendNetworks, best: dict[str, torch.Tensor] | None,
                    optimizer: torch.optim.Adam, state: TrainState, config: TrainConfig, meta: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v for k, v in networks.state_dict().items()}
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    opt = optimizer.state_dict()
    for index, values in opt["state"].items():
        tensors.update({f"opt.{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    doc = {"config": config.to_json(), "state": dataclasses.asdict(state),
           "param_groups": groups, **meta}
    write_artifact(path, MEND_CHECKPOINT, doc, tensors, force=True)


def load_checkpoint(path: Path, networks: MendNetworks, optimizer: torch.optim.Adam, config: TrainConfig,
                    meta: dict[str, Any]) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    doc, tensors = read_artifact(path, MEND_CHECKPOINT)
    for key, value in meta.items():
        if doc.get(key) != value:
            raise PruneCliError(f"cannot resume from {path}: it was made with a different {key} (start afresh "
                                "without --resume, or use the same model and data)")
    if not config.resumable_from(doc.get("config", {})):
        raise PruneCliError(f"cannot resume from {path}: its training configuration differs (only --steps and "
                            "--early-stop-patience may change on resume)")
    networks.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, index, name = k.split(".", 2)
            state.setdefault(int(index), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    return TrainState(**doc["state"]), best


def train_mend(model: torch.nn.Module, tokenizer, base: Checkpoint, targets: list[MendTarget],  # noqa: ANN001
               records: Sequence[EditRequest], config: TrainConfig, checkpoint: Path, resume: bool,
               data_info: dict[str, Any], max_seconds: float | None = None,
               progress: Progress = no_progress) -> TrainResult:
    """Train networks for `targets` of the (frozen, unedited) `model`; returns the archive of the best networks.

    `progress` gets one task over the steps, showing smoothed training losses, with a line per validation."""
    torch.manual_seed(config.seed)
    model.requires_grad_(False)
    device = next(model.parameters()).device
    train, val = split_records(records, config.val_fraction, config.seed)
    fingerprints = base_fingerprints(base, targets)
    networks = MendNetworks(targets, config.mend).to(device).train()
    optimizer = _optimizer(networks, config)
    meta = {"fingerprints": fingerprints, "data": data_info}
    state, best = TrainState(), None
    if resume:
        if not checkpoint.is_file():
            raise PruneCliError(f"--resume: no checkpoint {checkpoint} to resume from")
        state, best = load_checkpoint(checkpoint, networks, optimizer, config, meta)
        state.stopped = None
    started = time.perf_counter() - state.seconds

    def evaluate_and_keep() -> bool:
        """Validate, keep the best networks, checkpoint; True when patience has run out."""
        nonlocal best
        if val:
            metrics = validate(model, tokenizer, networks, val, config)
            improved = state.best_val is None or metrics["loss"] < state.best_val
            if improved:
                state.best_val, state.best_step, state.bad_evals = metrics["loss"], state.step, 0
                best = {k: v.detach().clone() for k, v in networks.state_dict().items()}
            else:
                state.bad_evals += 1
            state.history.append({"step": state.step, **metrics})
            task.log(f"step {state.step}: val loss {metrics['loss']:.4f}, edit acc {metrics['edit_acc']:.3f}, "
                     f"rephrase acc {metrics['rephrase_acc']:.3f}, loc agree {metrics['loc_agree']:.3f}")
        state.seconds = time.perf_counter() - started
        save_checkpoint(checkpoint, networks, best, optimizer, state, config, meta)
        return bool(val) and state.bad_evals >= config.patience

    smooth: dict[str, float] = {}  # exponentially smoothed training metrics, for the progress line
    with progress("training", config.steps) as task:
        while state.step < config.steps:
            if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                state.stopped = "time limit"
                break
            indices = batch_indices(state.step, config.batch_size, len(train), config.seed)
            chunk = [train[i] for i in indices]
            others = [train[(i + 1) % len(train)] for i in indices]
            loss, metrics = step_losses(model, tokenizer, networks, chunk, others, config, observe=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.step += 1
            for key in ("loss", "edit_nll", "loc_kl", "edit_acc"):
                smooth[key] = metrics[key] if key not in smooth else 0.9 * smooth[key] + 0.1 * metrics[key]
            task.update(completed=state.step, losses=f"loss {smooth['loss']:.3f} edit {smooth['edit_nll']:.3f} "
                        f"loc {smooth['loc_kl']:.4f} acc {smooth['edit_acc']:.2f}")
            if state.step % config.val_every == 0 and state.step < config.steps and evaluate_and_keep():
                state.stopped = "early stop"
                break
        if not state.history or state.history[-1]["step"] != state.step:
            evaluate_and_keep()  # the final networks are validated (and checkpointed) too
    state.stopped = state.stopped or "steps"
    if best is not None:
        networks.load_state_dict(best)
    training = {"config": config.to_json(), "data": data_info, "train_records": len(train),
                "val_records": len(val), "steps": state.step, "best_step": state.best_step,
                "best_val_loss": state.best_val, "stopped": state.stopped, "seconds": state.seconds,
                "validation": state.history}
    archive = MendArchive(networks.cpu(), fingerprints, base.model_type, str(base.path), training)
    return TrainResult(archive, state, len(train), len(val))
