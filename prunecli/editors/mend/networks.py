"""MEND (Mitchell et al. 2022): a trained network turns the fine-tuning gradient of an edit into a weight update.

For a weight W (math orientation [out, in], y = W x) the gradient of a loss over a token sequence is a sum of outer
products, grad W = sum_i delta_i u_i^T, where u_i is the layer's input at token i and delta_i the gradient of the
loss with respect to its output there. MEND never forms grad W: a gradient-transform network g maps each token's
(u_i, delta_i) to pseudo-activations u~_i and pseudo-deltas delta~_i, and the edit is

    Delta W = -lr_W * sum_i delta~_i u~_i^T

with a learned learning rate lr_W per edited weight. So the update is stored factored, as every delta here is:
a = -lr_W [delta~_1 .. delta~_T] ([out, T]), b = [u~_1 .. u~_T] ([in, T]), D = a b^T. GPT-2's Conv1D computes
y = x W with W stored [in, out]; its input and output are still u and y, so the factors are the same and only the
delta entry's layout differs.

The network (paper section 3.1): the concatenation z = [u; delta] is normalised per dimension with running mean and
standard deviation gathered during training (the raw deltas are ~1e-6 and vary by layer), then shifted and scaled by
a per-weight (mode) vector, then passed through a residual low-rank MLP z + W2 relu(W1 z + b1) + b2 with W2 = 0 at
initialisation (so an untrained network is normalised gradient descent). Weights of the same shape share one
network and differ only by their scale/shift mode, as in the paper.

Which weights: all matrices of the MLP of the chosen layers (LLaMA: gate, up and down projections; GPT-2: c_fc and
c_proj), by default the last three layers, as in the paper's and EasyEdit's MEND configurations. Only tokens whose
input and output gradient are both non-zero count (pads and the tokens after the last target have zero gradient),
so the rank of an update is at most the number of tokens of the edit sequence; for the last layer, at most the
number of target tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunecli.core.checkpoint import Layout
from prunecli.editors.prompts import right_pad
from prunecli.errors import PruneCliError
from prunecli.models.adapters import ModelAdapter
from prunecli.models.placement import add_to_tensor, input_device
from prunecli.models.tokens import encode_pair, pad_id
from prunecli.requests import EditRequest


# ------------------------------------------------------------------------------------------------ edited weights
@dataclass(frozen=True)
class MendTarget:
    """One edited weight: its parameter name, layer, storage layout and math shape (out, in)."""

    name: str
    layer: int
    layout: Layout
    out_features: int
    in_features: int

    @property
    def shape_key(self) -> str:
        """Weights with the same key share one gradient-transform network."""
        return f"{self.in_features}x{self.out_features}"

    @property
    def module_name(self) -> str:
        return self.name.removesuffix(".weight")


def _matrix_layout(module: nn.Module) -> Layout | None:
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D: y = x W + b
        return "in_out"
    return None


def layer_matrix(adapter: ModelAdapter, layer: int, path: str) -> MendTarget | None:
    """The weight of module `path` (e.g. "mlp.gate_proj") of decoder layer `layer`; None when that module is not
    an nn.Linear or Conv1D. A missing module raises AttributeError."""
    module = adapter.layer_module(layer).get_submodule(path)
    layout = _matrix_layout(module)
    if layout is None:
        return None
    w = module.weight
    out_f, in_f = (w.shape[0], w.shape[1]) if layout == "out_in" else (w.shape[1], w.shape[0])
    return MendTarget(f"{adapter.stack_name}.{layer}.{path}.weight", layer, layout, int(out_f), int(in_f))


def mlp_targets(adapter: ModelAdapter, layers: Sequence[int]) -> list[MendTarget]:
    """Every weight matrix of the MLP of each layer in `layers` (in the module's own order)."""
    mlp_path = adapter.projection_path.rpartition(".")[0]
    targets = []
    for layer in layers:
        mlp = adapter.layer_module(layer).get_submodule(mlp_path)
        for child_name, _ in mlp.named_children():
            target = layer_matrix(adapter, layer, f"{mlp_path}.{child_name}")
            if target is not None:
                targets.append(target)
    if not targets:
        raise PruneCliError(f"found no weight matrices in the MLP of layers {list(layers)}")
    return targets


def default_layers(num_layers: int, count: int = 3) -> list[int]:
    """The last `count` layers (the paper edits the MLPs of the last three blocks)."""
    return list(range(max(0, num_layers - count), num_layers))


# ------------------------------------------------------------------------------------------------ the network
@dataclass(frozen=True)
class MendConfig:
    """Architecture of the gradient-transform networks and the initial per-weight edit learning rate."""

    rank: int = 256  # hidden width of the low-rank residual MLP (the paper uses 1920 on GPT-2 XL / GPT-J)
    edit_lr_init: float = 1e-4

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "edit_lr_init": self.edit_lr_init}


class GradientTransform(nn.Module):
    """g: (u [n, in], delta [n, out], mode) -> (u~, delta~), shared by all weights of one shape."""

    def __init__(self, in_features: int, out_features: int, rank: int, n_modes: int) -> None:
        super().__init__()
        width = in_features + out_features
        self.in_features = in_features
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(width, dtype=torch.float64))
        self.scale = nn.Parameter(torch.ones(n_modes, width))
        self.shift = nn.Parameter(torch.zeros(n_modes, width))
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @torch.no_grad()
    def observe(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Merge a batch of rows into the running mean / variance (Chan et al.'s parallel Welford update)."""
        z = torch.cat([u, delta], dim=-1).double()
        n = z.shape[0]
        if n == 0:
            return
        batch_mean = z.mean(0)
        batch_m2 = ((z - batch_mean) ** 2).sum(0)
        total = self.count + n
        diff = batch_mean - self.mean
        self.mean += diff * n / total
        self.m2 += batch_m2 + diff**2 * self.count * n / total
        self.count.fill_(total)

    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt().clamp_min(1e-30)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], dim=-1).double()
        z = ((z - self.mean) / self.std()).float()
        z = z * self.scale[mode] + self.shift[mode]
        z = z + self.up(torch.relu(self.down(z)))
        return z[:, : self.in_features], z[:, self.in_features:]


class MendNetworks(nn.Module):
    """One GradientTransform per weight shape, and one learned edit learning rate per edited weight."""

    def __init__(self, targets: Sequence[MendTarget], config: MendConfig) -> None:
        super().__init__()
        self.targets = list(targets)
        self.config = config
        modes: dict[str, list[str]] = {}
        for t in self.targets:
            modes.setdefault(t.shape_key, []).append(t.name)
        self.mode = {name: names.index(name) for names in modes.values() for name in names}
        first = {t.shape_key: t for t in reversed(self.targets)}
        self.nets = nn.ModuleDict({key: GradientTransform(first[key].in_features, first[key].out_features,
                                                          config.rank, len(names)) for key, names in modes.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.targets),), config.edit_lr_init))

    def observe(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for t in self.targets:
            self.nets[t.shape_key].observe(*factors[t.name])

    def updates(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per weight, the factors (a [out, n], b [in, n]) of Delta W = -lr sum_i delta~_i u~_i^T."""
        out = {}
        for i, t in enumerate(self.targets):
            u, delta = factors[t.name]
            u_t, delta_t = self.nets[t.shape_key](u, delta, self.mode[t.name])
            out[t.name] = factored_update(u_t, delta_t, self.edit_lrs[i])
        return out


def factored_update(u: torch.Tensor, delta: torch.Tensor, lr: torch.Tensor | float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with a b^T = -lr * sum_i delta_i u_i^T, from rows u [n, in] and delta [n, out]."""
    return -lr * delta.T, u.T


# ------------------------------------------------------------------------------------------------ model plumbing
@dataclass(frozen=True)
class TargetBatch:
    """Right-padded prompt + target sequences and where each target token is predicted."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] sequence of each target token
    positions: torch.Tensor  # [N] position whose logits predict it
    tokens: torch.Tensor  # [N] the target token ids
    weights: torch.Tensor  # [N] 1 / (target length of its sequence)
    n: int = 0

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def encode_targets(tokenizer, prompts: Sequence[str], targets: Sequence[str],  # noqa: ANN001 - HF tokenizer
                   device: torch.device) -> TargetBatch:
    """Tokenise pairs the way `prunecli evaluate` scores them (`encode_pair`), padded into one batch."""
    seqs, rows, positions, tokens, weights = [], [], [], [], []
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        prompt_ids, target_ids = encode_pair(tokenizer, prompt, target)
        seqs.append(prompt_ids + target_ids)
        for j, tok in enumerate(target_ids):
            rows.append(row)
            positions.append(len(prompt_ids) - 1 + j)
            tokens.append(tok)
            weights.append(1.0 / len(target_ids))
    ids, mask = right_pad(seqs, pad_id(tokenizer), device)

    def tensor(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return TargetBatch(ids, mask, tensor(rows, torch.long), tensor(positions, torch.long), tensor(tokens, torch.long),
                       tensor(weights, torch.float32), len(seqs))


def sequence_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """[B] mean target-token NLL of each sequence."""
    logp = torch.log_softmax(logits[batch.rows, batch.positions].float(), dim=-1)
    token_nll = -logp.gather(1, batch.tokens[:, None])[:, 0] * batch.weights
    return torch.zeros(batch.n, device=logits.device).index_add(0, batch.rows, token_nll)


def sequence_correct(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """[B] booleans: every target token is the argmax (zsRE-style top-1 accuracy of the whole target)."""
    hit = (logits[batch.rows, batch.positions].argmax(-1) == batch.tokens).float()
    wrong = torch.zeros(batch.n, device=logits.device).index_add(0, batch.rows, 1.0 - hit)
    return wrong == 0


def gradient_factors(model: nn.Module, targets: Sequence[MendTarget], loss_fn: Callable[[], torch.Tensor],
                     at: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Run `loss_fn()` (a forward pass of `model`) and return the loss and, per target weight, the rows
    (u [n, in], delta [n, out]) of its gradient sum_i delta_i u_i^T, keeping tokens where both are non-zero, or
    with `at` = (sequences, positions) the rows of exactly those tokens, in that order (UltraEdit's).

    The model's own parameters need no gradient: each target module's output is made to require one.
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def store(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
            if not out.requires_grad:
                out.requires_grad_(True)
            outputs[name] = out
        return store

    handles = [model.get_submodule(t.module_name).register_forward_hook(hook(t.name)) for t in targets]
    try:
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, [outputs[t.name] for t in targets])
    finally:
        for h in handles:
            h.remove()
    factors = {}
    for t, g in zip(targets, grads):
        if at is not None:
            index = tuple(i.to(g.device) for i in at)
            factors[t.name] = (inputs[t.name][index].float(), g[index].float())
            continue
        u = inputs[t.name].reshape(-1, t.in_features).float()
        delta = g.reshape(-1, t.out_features).float()
        keep = (u != 0).any(-1) & (delta != 0).any(-1)
        factors[t.name] = (u[keep], delta[keep])
    return float(loss.detach()), factors


@contextlib.contextmanager
def low_rank_added(model: nn.Module, targets: Sequence[MendTarget],
                   updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, each target module computes y + a (b^T x): the edited model, differentiable in (a, b),
    without forming the dense update."""

    def hook(a: torch.Tensor, b: torch.Tensor) -> Callable[..., torch.Tensor]:
        def add(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return out + ((x.to(b.dtype) @ b) @ a.T).to(out.dtype)
        return add

    handles = [model.get_submodule(t.module_name).register_forward_hook(hook(*updates[t.name])) for t in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def add_to_weight(model: nn.Module, target: MendTarget, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add D = a b^T (math orientation) to the stored weight (offloaded ones too), in fp32, cast back to its dtype."""
    d = (a @ b.T).float()
    add_to_tensor(model, target.name, d if target.layout == "out_in" else d.T)


def edit_factors(model: nn.Module, tokenizer, networks: MendNetworks,  # noqa: ANN001
                 requests: Sequence[EditRequest]) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The gradient rows of the edit loss (sum over requests of each one's mean target NLL on its edit prompt).

    A sum, not a mean, over requests: each token's delta then has the same scale whatever the batch size, which the
    normalisation statistics (gathered in training) rely on.
    """
    device = input_device(model)
    batch = encode_targets(tokenizer, [r.text for r in requests], [r.target_new for r in requests], device)
    return gradient_factors(model, networks.targets, lambda: sequence_nll(model(**batch.inputs()).logits, batch).sum())
