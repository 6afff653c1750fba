"""UltraEdit (Gu et al. 2025, arXiv 2505.14679): lifelong editing with no optimisation loop.

A step edits one batch of requests (`--batch-size`) into every edited module at once, on the model with all earlier
steps applied (official repo XiaojieGu/UltraEdit, `editor/ultraedit.py` and `nets.py`):

1. The requests, ordered by token count (longest first, as the official data loader does), go through the model in
   sub-batches of `batch_size_once`: one forward and one backward pass of the token-mean cross-entropy of the answer
   tokens. For every answer-predicting token (`token: ans`; EasyEdit's `mask`: every token) each edited module gives
   a row: its input k and the gradient g = dL/d(module output), both float32. The input is prompt + answer (as
   EasyEdit feeds it; the official code drops the answer's last token, which in a causal model changes none of the
   rows `ans` keeps).
2. A lifelong normaliser per weight *shape* (in, out), shared by every edited module of that shape and never reset,
   keeps count n, mean mu, sum of squares S and std sigma of the rows [k, g]. After each sub-batch, per module, the
   m new rows (mean xbar, *unbiased* variance s2) enter it: n' = n + m, dlt = xbar - mu, mu += m dlt / n',
   S += m s2 + n m dlt^2 / n', sigma = sqrt(S / (n' - 1 + eps)) with eps = float32's machine epsilon. The stored
   std is not the textbook one (m s2, not (m - 1) s2) and depends on the grouping, so the grouping is the official
   one: one block per sub-batch per module, modules in their configured order.
3. With all the step's rows in the normaliser: [k_hat, g_hat] = ([k, g] - mu) / (sigma + eps), the value of row i
   v_i = -lr |k_hat_i|^2 g_hat_i, and from the RAW keys K [N, in] and values V [N, out] of the step's N rows the ridge
   solution Delta W^T = (K^T K + I)^-1 K^T V, i.e. (push-through identity) Delta W = V^T (K K^T + I_N)^-1 K: an
   N x N solve (float64 here, float32 officially), kept factored as a = V^T (K K^T + I_N)^-1 [out, N], b = K^T
   [in, N], so its rank is at most N. Every module's shift is computed before any is added to the model.

GPT-2's Conv1D computes y = x W with W stored [in, out]; its input and output are still k and y, so the factors are
the same and only the delta entry's layout differs. Modules may be any nn.Linear / Conv1D of a decoder layer; the
official configurations edit the MLP's output projection (Mistral, GPT-J) or its input projections gate_proj and
up_proj (LLaMA-3, Qwen2.5, Gemma-3).

State: the normaliser travels in the delta as extra tensors `ultraedit.{count,mean,sumsq,std}::<in>x<out>` (float32,
one row; see `core/delta.py`), so `edit --delta a -o b` continues exactly where one run would be. Continuing a delta
without it, with one for other weight shapes, or with several rows (deltas of separate runs composed) is refused.

Where prunecli differs from the official code, on purpose: a sub-batch with a single row has no unbiased variance (the
official code's normaliser turns NaN for good); here it adds no within-block term (s2 = 0) and the run says so once.
The official code also zero-pads the last sub-batch's gradients when the number of edits is not a multiple of the
sub-batch size (it loads ceil(n / size) key files but n // size gradient files); that slip is not reproduced. The
ridge solve is float64. `editor_batch_size` (the official standardisation's padding group) changes nothing and is
ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from prunecli.editors.base import EditContext, Editor, LayerUpdate, RequestOutcome
from prunecli.editors.hparams import IGNORED_KEYS, as_float, as_int, as_layers, parse_set, read_hparams_file
from prunecli.editors.mend.networks import (
    MendTarget,
    TargetBatch,
    add_to_weight,
    encode_targets,
    gradient_factors,
    layer_matrix,
    sequence_nll,
)
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.models.placement import input_device
from prunecli.models.tokens import encode_pair
from prunecli.requests import EditRequest

EPS = torch.finfo(torch.float32).eps
TOKENS = ("ans", "mask")
STATE_PREFIX = "ultraedit."  # + "<quantity>::<in>x<out>": the normaliser in delta extras
QUANTITIES = ("count", "mean", "sumsq", "std")


# ------------------------------------------------------------------------------------------ hyper-parameters
@dataclass(frozen=True)
class UltraEditHParams:
    """What `edit --method ultraedit` uses and records (an `editors.base.HParams`)."""

    layers: tuple[int, ...]  # the layers of `targets`, ascending
    targets: tuple[MendTarget, ...]  # the edited weights, in the order the normaliser sees them
    lr: float
    batch_size_once: int
    token: str
    method: str = "ultraedit"
    context_template_length_params: tuple[tuple[int, int], ...] = ()  # UltraEdit uses no context prefixes

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "layers": list(self.layers),
                "inner_params": [t.module_name for t in self.targets], "lr": self.lr,
                "batch_size_once": self.batch_size_once, "token": self.token}


def _as_names(value: Any) -> tuple[str, ...]:
    """Module names: a list, or one string of comma-separated names."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ValueError(f"expected a non-empty list of module names, got {value!r}")
    return tuple(v.strip() for v in items)


_COERCE: dict[str, Callable[[Any], Any]] = {"layers": as_layers, "modules": _as_names, "inner_params": _as_names,
                                            "lr": as_float, "batch_size_once": as_int, "token": str}
# EasyEdit's UltraEdit keys that only keep its books, or that prunecli takes from the command line (--batch-size,
# --dtype): accepted and reported as not used.
_IGNORED = IGNORED_KEYS | {"model_class", "class_name", "tokenizer_class", "tokenizer_name", "dropout",
                           "no_grad_layers", "silent", "results_dir", "half", "editor_batch_size"}
_LAYER_RULE = ("layer_fraction", "num_edit_layers")  # packaged defaults only: the layers for unknown depths


def _known(values: Mapping[str, Any], where: str, ignored: list[str]) -> dict[str, Any]:
    """The UltraEdit keys of one source, coerced; bookkeeping keys go to `ignored`, unknown ones are an error."""
    known = {}
    for key, value in values.items():
        if key in _IGNORED:
            ignored.append(key)
        elif key not in _COERCE:
            raise PruneCliError(f"unknown UltraEdit hyper-parameter {key!r} in {where}; known: "
                                f"{', '.join(sorted(_COERCE))}")
        else:
            try:
                known[key] = _COERCE[key](value)
            except (TypeError, ValueError) as exc:
                raise PruneCliError(f"hyper-parameter {key} in {where}: {exc}") from None
    if "inner_params" in known and ("layers" in known or "modules" in known):
        raise PruneCliError(f"{where} gives inner_params and layers/modules: give one of the two")
    return known


def check_hparams_file(path: str | Path) -> None:
    """Everything about a user's UltraEdit file that needs no model: parsing, keys and their types (its alg_name is
    checked by the registry, `registry.check_alg_name`)."""
    _known(read_hparams_file(path), str(path), [])


def _packaged_sources(family: str, model_type: str, num_layers: int) -> list[tuple[str, dict[str, Any]]]:
    """The sections of ultraedit.yaml that apply to a model, least specific first (`where`, values)."""
    text = resources.files("prunecli.editors").joinpath("hparams", "ultraedit.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    sources = [("ultraedit.yaml defaults", dict(doc["defaults"]))]
    for key in dict.fromkeys((family, model_type)):
        section = dict((doc.get("families") or {}).get(key) or {})
        by_depth = section.pop("by_depth", None) or {}
        sources += [(f"ultraedit.yaml {key}", section), (f"ultraedit.yaml {key} {num_layers} layers",
                                                          dict(by_depth.get(num_layers) or {}))]
    return sources


def _module_of(adapter: ModelAdapter, name: str) -> tuple[int, str]:
    """(layer, path inside the layer) of a full module name such as "model.layers.11.mlp.gate_proj". Names are matched
    from the layer stack's last component on, so "language_model.model.layers.52..." (Gemma-3's official configs)
    names the same module as "model.language_model.layers.52..."."""
    tail = re.escape(adapter.stack_name.rpartition(".")[2])
    match = re.search(rf"(?:^|\.){tail}\.(\d+)\.(.+)$", name.removesuffix(".weight"))
    if match is None:
        raise PruneCliError(f"inner_params entry {name!r} is not a module of this model's decoder layers "
                            f"({adapter.stack_name}.N....)")
    return int(match[1]), match[2]


def _target(adapter: ModelAdapter, layer: int, path: str) -> MendTarget:
    adapter.check_layer(layer)
    try:
        target = layer_matrix(adapter, layer, path)
    except AttributeError:
        target = None
    if target is None:
        raise PruneCliError(f"layer {layer} of this {adapter.model_type} model has no weight matrix {path!r} "
                            "(an nn.Linear or Conv1D inside the decoder layer)")
    return target


def _edited_modules(adapter: ModelAdapter, sources: Sequence[Mapping[str, Any]],
                    layers: tuple[int, ...]) -> list[tuple[int, str]]:
    """(layer, module path) of every edited weight. Sources are read in order: `inner_params` names the modules
    outright; `layers` / `modules` replace the layers / the module paths of what the earlier sources gave (so
    `--layers` on LLaMA-3's gate/up default keeps gate and up). `layers` starts from the packaged layer rule."""
    modules: tuple[str, ...] = ()
    named: list[tuple[int, str]] | None = None
    for source in sources:
        if "inner_params" in source:
            named = [_module_of(adapter, n) for n in source["inner_params"]]
        elif "layers" in source or "modules" in source:
            if named is not None:
                layers, modules = tuple(dict.fromkeys(L for L, _ in named)), tuple(dict.fromkeys(p for _, p in named))
                named = None
            layers, modules = source.get("layers", layers), source.get("modules", modules)
    if named is None:
        named = [(L, p) for p in modules for L in layers]
    if not named or len(set(named)) != len(named):
        raise PruneCliError(f"the edited modules are empty or contain duplicates: {named}")
    return named


def resolve_ultraedit_hparams(adapter: ModelAdapter, file: str | Path | None = None, sets: Sequence[str] = (),
                              on_note: Callable[[str], None] | None = None) -> UltraEditHParams:
    """Packaged defaults < `--hparams FILE` < `--set key=value`, checked against the loaded model."""
    sources = _packaged_sources(adapter.family, adapter.model_type, adapter.num_layers)
    rule = {k: v for _, s in sources for k, v in s.items() if k in _LAYER_RULE}
    sources = [(where, {k: v for k, v in s.items() if k not in _LAYER_RULE}) for where, s in sources]
    if file is not None:
        check_hparams_file(file)
        sources.append((str(file), read_hparams_file(file)))
    sources.append(("--set", parse_set(sets)))
    ignored: list[str] = []
    known = [_known(raw, where, ignored) for where, raw in sources]
    last = round(float(rule["layer_fraction"]) * (adapter.num_layers - 1))
    named = _edited_modules(adapter, known, tuple(range(max(0, last - int(rule["num_edit_layers"]) + 1), last + 1)))
    values = {k: v for source in known for k, v in source.items() if k not in ("layers", "modules", "inner_params")}
    if ignored and on_note is not None:
        on_note(f"not used (prunecli derives or does not need them): {', '.join(sorted(set(ignored)))}")
    hp = UltraEditHParams(tuple(sorted({L for L, _ in named})), tuple(_target(adapter, L, p) for L, p in named),
                          **values)
    if not hp.lr > 0 or hp.batch_size_once < 1 or hp.token not in TOKENS:
        raise PruneCliError(f"UltraEdit needs lr > 0, batch_size_once >= 1 and token one of {', '.join(TOKENS)}; "
                            f"got lr={hp.lr!r}, batch_size_once={hp.batch_size_once!r}, token={hp.token!r}")
    return hp


# ------------------------------------------------------------------------------------------------ normaliser
@dataclass
class Normalizer:
    """UltraEdit's lifelong statistics of the rows [k, g] of one weight shape (float32, as officially)."""

    count: torch.Tensor  # [1]
    mean: torch.Tensor  # [in + out]
    sumsq: torch.Tensor  # [in + out]: S, the sum of squared deviations as the official update accumulates it
    std: torch.Tensor  # [in + out]

    @classmethod
    def empty(cls, width: int, device: torch.device) -> Normalizer:
        return cls(*(torch.zeros(n, device=device) for n in (1, width, width, width)))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> bool:
        """Merge a block of rows (the official order of float32 operations); False when it had a single row, whose
        unbiased variance does not exist and which then adds no within-block term."""
        m = rows.shape[0]
        total = self.count + m
        dlt = rows.mean(0) - self.mean
        spread = rows.var(0) if m > 1 else torch.zeros_like(self.mean)
        self.mean = self.mean + m * dlt / total
        self.sumsq = self.sumsq + (m * spread + self.count * m * dlt.pow(2) / total)
        self.std = (self.sumsq / (total - 1 + EPS)).sqrt()
        self.count = total
        return m > 1

    def standardize(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows - self.mean) / (self.std + EPS)


def _state_name(quantity: str, shape: str) -> str:
    return f"{STATE_PREFIX}{quantity}::{shape}"


def load_normalizers(ctx: EditContext, targets: Sequence[MendTarget], device: torch.device) -> dict[str, Normalizer]:
    """The normaliser of each edited weight shape from `ctx.carried` (new ones when a chain starts), checked."""
    carried = sorted({n.partition("::")[2] for n in ctx.carried if n.startswith(STATE_PREFIX)})
    out = {}
    for t in targets:
        shape, width = t.shape_key, t.in_features + t.out_features
        if shape in out:
            continue
        if shape not in carried:
            if not ctx.continues:
                out[shape] = Normalizer.empty(width, device)
                continue
            if not carried:
                raise PruneCliError(f"the previous delta carries no UltraEdit normaliser ({_state_name('mean', shape)})"
                                    ": it was not made by ultraedit (or lost its extra tensors), so its running "
                                    "statistics cannot continue; start a new chain without --delta")
            raise PruneCliError(f"the previous delta's UltraEdit normaliser is for weight shapes {', '.join(carried)}, "
                                f"not {shape} (in x out) of the modules edited now: it was made on another model or "
                                "for other modules; edit the same modules, or start a new chain without --delta")
        tensors = [ctx.carried.get(_state_name(q, shape)) for q in QUANTITIES]
        if any(x is None or tuple(x.shape) != (1, n) for x, n in zip(tensors, (1, width, width, width))):
            rows = {tuple(x.shape) for x in tensors if x is not None}
            raise PruneCliError(f"the previous delta's UltraEdit normaliser for {shape} is incomplete or has shapes "
                                f"{sorted(rows)} instead of one row of {width}: deltas of separate UltraEdit runs "
                                "composed with several --delta cannot be continued; continue one chain")
        out[shape] = Normalizer(*(x[0].to(device) for x in tensors))  # type: ignore[union-attr]
    return out


def store_normalizers(ctx: EditContext, normalizers: Mapping[str, Normalizer]) -> None:
    for shape, norm in normalizers.items():
        for q in QUANTITIES:
            ctx.carried[_state_name(q, shape)] = getattr(norm, q).detach().float().cpu().reshape(1, -1)


# ------------------------------------------------------------------------------------------------------ math
def ridge_factors(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a [out, N], b [in, N]) of Delta W = V^T (K K^T + I_N)^-1 K = ((K^T K + I)^-1 K^T V)^T from keys K
    [N, in] and values V [N, out]: an N x N solve in float64."""
    k = keys.double()
    gram = k @ k.T + torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    a = torch.linalg.solve(gram, values.to(k.device, torch.float64)).T
    return a.float(), keys.T.float()


def shift_factors(keys: torch.Tensor, grads: torch.Tensor, normalizer: Normalizer,
                  lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's shift from its step's rows: v_i = -lr |k_hat_i|^2 g_hat_i, then the ridge solve on raw keys."""
    k_hat, g_hat = normalizer.standardize(torch.cat([keys, grads], 1)).split([keys.shape[1], grads.shape[1]], 1)
    values = -lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
    return ridge_factors(keys, values)


# ----------------------------------------------------------------------------------------------- the editor
def token_mean_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """The cross-entropy of every answer token of the batch, averaged over tokens (not per request)."""
    logp = torch.log_softmax(logits[batch.rows, batch.positions].float(), dim=-1)
    return -logp.gather(1, batch.tokens[:, None]).mean()


def _token_rows(batch: TargetBatch, token: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences, positions) of the tokens whose rows UltraEdit keeps."""
    if token == "ans":
        return batch.rows, batch.positions
    return torch.nonzero(batch.attention_mask, as_tuple=True)  # type: ignore[return-value]


class UltraEditEditor(Editor):
    """Edits a batch per step by one forward/backward pass per sub-batch and a ridge solve (module docstring)."""

    method = "ultraedit"
    batched = True
    uses_stats = False

    def __init__(self) -> None:
        self._told_single_rows = False

    @classmethod
    def check_hparams_file(cls, path: Path) -> None:
        check_hparams_file(path)

    def resolve_hparams(self, model: torch.nn.Module, adapter: ModelAdapter,
                        on_note: Callable[[str], None] | None = None) -> UltraEditHParams:
        return resolve_ultraedit_hparams(adapter, self.inputs.hparams_file, self.inputs.overrides, on_note)

    def apply(self, model: torch.nn.Module, tokenizer, adapter: ModelAdapter,  # noqa: ANN001
              requests: Sequence[EditRequest], ctx: EditContext) -> tuple[list[LayerUpdate], list[RequestOutcome]]:
        hp: UltraEditHParams = ctx.hparams
        device = input_device(model)
        norms = load_normalizers(ctx, hp.targets, device)
        rows, initial = self._rows(model, tokenizer, requests, norms, ctx)
        shifts = {t.name: shift_factors(*rows[t.name], norms[t.shape_key], hp.lr) for t in hp.targets}
        updates = []
        for t in hp.targets:  # every shift is computed before the first is added
            a, b = ctx.restrain_update(t.name, *shifts[t.name])
            add_to_weight(model, t, a, b)
            updates.append(LayerUpdate(t.layer, a, b, weight=t.name))
        store_normalizers(ctx, norms)
        with torch.no_grad():
            batch = encode_targets(tokenizer, [r.text for r in requests], [r.target_new for r in requests], device)
            after = sequence_nll(model(**batch.inputs()).logits, batch).tolist()
        return updates, [RequestOutcome(a, i, 1) for a, i in zip(after, initial)]

    def _rows(self, model: torch.nn.Module, tokenizer, requests: Sequence[EditRequest],  # noqa: ANN001
              norms: Mapping[str, Normalizer], ctx: EditContext
              ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[float]]:
        """Per edited weight, the rows (K [N, in], G [N, out]) of the step's sub-batches, each sub-batch entering the
        normalisers as it is read; and each request's mean answer NLL before the step."""
        hp: UltraEditHParams = ctx.hparams
        lengths = [sum(map(len, encode_pair(tokenizer, r.text, r.target_new))) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])  # longest first, as the official loader
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {t.name: [] for t in hp.targets}
        initial = [0.0] * len(requests)
        starts = range(0, len(order), hp.batch_size_once)
        for done, start in enumerate(starts):
            picked = order[start:start + hp.batch_size_once]
            batch = encode_targets(tokenizer, [requests[i].text for i in picked],
                                   [requests[i].target_new for i in picked], input_device(model))
            seen: dict[str, torch.Tensor] = {}

            def loss(batch: TargetBatch = batch, seen: dict[str, torch.Tensor] = seen) -> torch.Tensor:
                logits = model(**batch.inputs()).logits
                seen["nll"] = sequence_nll(logits.detach(), batch)
                return token_mean_nll(logits, batch)

            _, factors = gradient_factors(model, hp.targets, loss, at=_token_rows(batch, hp.token))
            for i, nll in zip(picked, seen["nll"].tolist()):
                initial[i] = nll
            for t in hp.targets:
                if not norms[t.shape_key].update(torch.cat(factors[t.name], 1)) and not self._told_single_rows:
                    self._told_single_rows = True
                    ctx.value_task.log("a sub-batch had a single row: it adds no within-block variance to the "
                                       "normaliser (the official code's would turn NaN); see editors/ultraedit.py")
                parts[t.name].append(factors[t.name])
            ctx.value_task.update(completed=done + 1, total=len(starts))
        rows = {name: (torch.cat([k for k, _ in p]), torch.cat([g for _, g in p])) for name, p in parts.items()}
        return rows, initial
