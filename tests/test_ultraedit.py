"""UltraEdit: the lifelong normaliser and the ridge solve against dense float64 references; an edit on the tiny model
of every family (input and output projections, Conv1D orientation); the shifts all computed on the model before the
step; chains through delta files equal to one run bit for bit; refusals; hyper-parameters (packaged per family,
EasyEdit's own files); and every delta command on deltas of MLP input projections."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from editing_helpers import RECORDS
from tiny_models import CORPUS, FAMILIES, build_tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta, DeltaEntry
from prunecli.editors.base import EditContext
from prunecli.editors.registry import check_file, file_method
from prunecli.editors.ultraedit import (
    EPS,
    Normalizer,
    UltraEditEditor,
    check_hparams_file,
    resolve_ultraedit_hparams,
    ridge_factors,
    shift_factors,
)
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.placement import read_tensor
from prunecli.models.scoring import score_targets
from prunecli.models.tokens import encode_pair
from prunecli.requests import EditRequest

runner = CliRunner()
EASYEDIT = sorted((Path(__file__).parent / "data" / "easyedit" / "ultraedit").glob("*.yaml"))
# A fourth request of another length, so that ordering by length and sub-batches are exercised.
RECORDS4 = [*RECORDS, {"prompt": "Windows was made by {}", "subject": "the Space Needle", "target_new": "guitar"}]
REQUESTS4 = [EditRequest(i, r["prompt"], r["subject"], r["target_new"]) for i, r in enumerate(RECORDS4)]
# Input and output projection of each family's MLP.
INPUT_PROJECTION = {"gpt2": "mlp.c_fc", "gptj": "mlp.fc_in", "gpt_neox": "mlp.dense_h_to_4h"}


def _modules(model) -> str:
    adapter = resolve_adapter(model)
    return f"modules=[{INPUT_PROJECTION.get(adapter.family, 'mlp.up_proj')},{adapter.projection_path}]"


# ------------------------------------------------------------------------------------------ dense references
def _closed_form(blocks: list[torch.Tensor]) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the official recursion accumulates, in closed form (float64): S = sum_b m_b s2_b (unbiased s2, 0 for a
    single row) + sum_b m_b (xbar_b - mu)^2, the Chan et al. merge with m s2 as each block's own term."""
    x = torch.cat(blocks)
    mu = x.mean(0)
    s = sum(b.shape[0] * (b.var(0) if b.shape[0] > 1 else 0) + b.shape[0] * (b.mean(0) - mu) ** 2 for b in blocks)
    return x.shape[0], mu, s, (s / (x.shape[0] - 1 + EPS)).sqrt()


def test_normaliser_follows_the_official_recursion_and_guards_single_rows():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(m, 6, generator=g, dtype=torch.float64) * c + c for m, c in ((3, 1.0), (7, 3.0), (1, -2.0),
                                                                                       (5, 0.5))]
    norm = Normalizer.empty(6, torch.device("cpu"))
    assert [norm.update(b.float()) for b in blocks] == [True, True, False, True]  # the single row is reported
    n, mu, s, std = _closed_form(blocks)
    assert float(norm.count) == n and norm.count.dtype == torch.float32
    torch.testing.assert_close(norm.mean.double(), mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.sumsq.double(), s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.std.double(), std, rtol=1e-5, atol=1e-5)
    # m s2 is not the textbook (m - 1) s2: the std differs from the rows' own, and so does another grouping's.
    assert not torch.allclose(norm.std.double(), torch.cat(blocks).std(0), rtol=1e-3)
    regrouped = Normalizer.empty(6, torch.device("cpu"))
    regrouped.update(torch.cat(blocks).float())
    assert not torch.allclose(regrouped.std, norm.std, rtol=1e-3)
    x = torch.randn(4, 6, generator=g)
    torch.testing.assert_close(norm.standardize(x), (x - norm.mean) / (norm.std + EPS))


@pytest.mark.parametrize("rows", [5, 40])  # fewer and more rows than the 16 key dimensions
def test_ridge_factors_equal_the_official_dense_solve(rows):
    g = torch.Generator().manual_seed(rows)
    k = torch.randn(rows, 16, generator=g, dtype=torch.float64)
    v = torch.randn(rows, 9, generator=g, dtype=torch.float64)
    a, b = ridge_factors(k.float(), v)
    assert a.shape == (9, rows) and b.shape == (16, rows)
    k32 = k.float().double()
    dense = torch.linalg.solve(k32.T @ k32 + torch.eye(16, dtype=torch.float64), k32.T @ v).T  # official [in, out].T
    err = float(((a.double() @ b.double().T) - dense).abs().max() / dense.abs().max())
    assert err < 1e-5, err


def test_shift_is_the_official_value_and_solve():
    g = torch.Generator().manual_seed(3)
    keys, grads = torch.randn(12, 10, generator=g) * 2 + 1, torch.randn(12, 7, generator=g) * 1e-3
    norm = Normalizer.empty(17, torch.device("cpu"))
    for part in (slice(0, 5), slice(5, 12)):
        norm.update(torch.cat([keys[part], grads[part]], 1))
    a, b = shift_factors(keys, grads, norm, lr=0.5)
    z = (torch.cat([keys, grads], 1).double() - norm.mean.double()) / (norm.std.double() + EPS)
    k_hat, g_hat = z[:, :10], z[:, 10:]
    v = -0.5 * (k_hat**2).sum(-1, keepdim=True) * g_hat
    k = keys.double()
    dense = torch.linalg.solve(k.T @ k + torch.eye(10, dtype=torch.float64), k.T @ v).T
    torch.testing.assert_close(a.double() @ b.double().T, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max()))


# --------------------------------------------------------------------------------------- on the tiny models
def _edit(model, requests, *sets):
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    hp = resolve_ultraedit_hparams(adapter, sets=["lr=1e-2", "layers=[1,2]", _modules(model), *sets])
    ctx = EditContext(hp, [""])
    updates, outcomes = UltraEditEditor().apply(model, tiny_tokenizer(), adapter, requests, ctx)
    return hp, ctx, updates, outcomes


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_moves_its_targets_up_on_every_family(family):
    model = build_tiny_model(family)
    tok = tiny_tokenizer()
    texts, targets = [r.text for r in REQUESTS4], [r.target_new for r in REQUESTS4]
    before = [s.nll for s in score_targets(model, tok, texts, targets)]
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp, ctx, updates, outcomes = _edit(model, REQUESTS4)
    after = [s.nll for s in score_targets(model, tok, texts, targets)]
    assert sum(after) < sum(before) - 1.0, (before, after)
    assert [o.initial_loss for o in outcomes] == pytest.approx(before, abs=1e-4)
    assert [o.loss for o in outcomes] == pytest.approx(after, abs=1e-4)
    assert len(updates) == 4 and {u.weight for u in updates} == {t.name for t in hp.targets}
    answer_tokens = sum(len(encode_pair(tok, r.text, r.target_new)[1]) for r in REQUESTS4)
    for u, t in zip(updates, hp.targets):
        assert u.a.shape == (t.out_features, answer_tokens) and u.b.shape == (t.in_features, answer_tokens)
        assert t.layout == ("in_out" if family == "gpt2" else "out_in")
        change = read_tensor(model, t.name) - stored[t.name]  # the stored weight moved by D in its own layout
        torch.testing.assert_close(change, DeltaEntry.lowrank(u.a, u.b, t.layout).stored_update(), rtol=1e-4,
                                   atol=1e-6)
    untouched = [n for n in stored if n not in {t.name for t in hp.targets}]
    assert all(torch.equal(stored[n], read_tensor(model, n)) for n in untouched)
    shapes = {t.shape_key for t in hp.targets}
    assert len(shapes) == 2 and set(ctx.carried) == {f"ultraedit.{q}::{s}" for q in ("count", "mean", "sumsq", "std")
                                                     for s in shapes}


def _rows_on(model, targets, requests):
    """Reference rows (k, g) of one sub-batch by plain hooks and retain_grad: token-mean answer cross-entropy."""
    tok = tiny_tokenizer()
    pairs = [encode_pair(tok, r.text, r.target_new) for r in requests]
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    at = []
    for i, (p, t) in enumerate(pairs):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
        at += [(i, len(p) - 1 + j, t[j]) for j in range(len(t))]
    seen = {}
    hooks = [model.get_submodule(t.module_name).register_forward_hook(
        lambda m, args, out, name=t.name: seen.__setitem__(name, (args[0], out))) for t in targets]
    model.requires_grad_(True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    for _, out in seen.values():
        out.retain_grad()
    rows, pos, tokens = (torch.tensor(c) for c in zip(*at))
    torch.nn.functional.cross_entropy(logits[rows, pos], tokens).backward()
    for h in hooks:
        h.remove()
    model.requires_grad_(False)
    return {name: (x[rows, pos].detach(), out.grad[rows, pos]) for name, (x, out) in seen.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_shift_comes_from_the_model_before_the_step(family):
    """Reference: requests longest first in sub-batches of 2, rows read on the unedited model, one normaliser update
    per sub-batch and module in the configured order, then every module's shift (none added in between)."""
    model = build_tiny_model(family)
    reference_model = copy.deepcopy(model)
    hp, ctx, updates, _ = _edit(model, REQUESTS4, "batch_size_once=2")
    tok = tiny_tokenizer()
    order = sorted(REQUESTS4, key=lambda r: -sum(map(len, encode_pair(tok, r.text, r.target_new))))
    assert [r.index for r in order] != [r.index for r in REQUESTS4]  # the order does change
    norms = {t.shape_key: Normalizer.empty(t.in_features + t.out_features, torch.device("cpu")) for t in hp.targets}
    rows = {t.name: [] for t in hp.targets}
    for part in (order[:2], order[2:]):
        found = _rows_on(reference_model, hp.targets, part)
        for t in hp.targets:
            norms[t.shape_key].update(torch.cat(found[t.name], 1))
            rows[t.name].append(found[t.name])
    for u, t in zip(updates, hp.targets):
        keys, grads = (torch.cat(x) for x in zip(*rows[t.name]))
        a, b = shift_factors(keys, grads, norms[t.shape_key], hp.lr)
        expected = a @ b.T
        torch.testing.assert_close(u.a @ u.b.T, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    for shape, norm in norms.items():
        torch.testing.assert_close(ctx.carried[f"ultraedit.mean::{shape}"][0], norm.mean, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the CLI
def _cli(*args) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else {}


def _refused(*args) -> str:
    """Exit 1 with one `error:` line, the last (the command's own log lines, e.g. loading, may come before it)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    return lines[-1]


def _requests(path: Path) -> Path:
    """The four requests in CounterFact form: an edit takes when P(new) > P(true), and the tiny models give the true
    object ~1e-3 (a uniform guess over 400 tokens is 2.5e-3)."""
    path.write_text("\n".join(json.dumps({**r, "ground_truth": "Paris"}) for r in RECORDS4) + "\n")
    return path


def _sets(model_dir: Path, *extra: str) -> list[str]:
    from prunecli.models.loading import load_model

    modules = _modules(load_model(model_dir)[0])
    return [a for s in ["lr=1e-2", "layers=[1,2]", modules, *extra] for a in ("--set", s)]


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_chained_runs_equal_one_run_bit_for_bit(tmp_path, request, fixture):
    model = request.getfixturevalue(fixture)
    common = ["edit", model, "--requests", _requests(tmp_path / "r.jsonl"), "--method", "ultraedit", "--batch-size", 2,
              *_sets(model), "--json"]
    single = _cli(*common, "-o", tmp_path / "all.safetensors")
    assert single["failed_edits"] == 0 and single["hparams"]["lr"] == 0.01
    _cli(*common, "--limit", 2, "-o", tmp_path / "a.safetensors")
    _cli(*common, "--start", 2, "--delta", tmp_path / "a.safetensors", "-o", tmp_path / "b.safetensors")
    one, chained = Delta.load(tmp_path / "all.safetensors"), Delta.load(tmp_path / "b.safetensors")
    assert set(chained.entries) == set(one.entries) and len(one.entries) == 4
    answer_tokens = sum(len(encode_pair(tiny_tokenizer(), r.text, r.target_new)[1]) for r in REQUESTS4)
    for name, entry in one.entries.items():
        assert entry.is_lowrank and entry.rank == answer_tokens  # factors of both steps, side by side
        assert torch.equal(chained.entries[name].a, entry.a) and torch.equal(chained.entries[name].b, entry.b)
    assert set(chained.extras) == set(one.extras) and len(one.extras) == 8  # 4 quantities x 2 weight shapes
    for name, value in one.extras.items():
        assert torch.equal(chained.extras[name], value)
        if name.startswith("ultraedit.count::"):  # layers 1 and 2 share each shape's normaliser
            assert float(value) == 2 * answer_tokens
    assert chained.requests == one.requests and chained.history[0]["method"] == "ultraedit"
    assert chained.history[0]["hparams"]["inner_params"] == single["hparams"]["inner_params"]


def test_refusals_and_statistics_not_used(tmp_path, llama_dir):
    requests = _requests(tmp_path / "r.jsonl")
    common = ["edit", llama_dir, "--requests", requests, "--method", "ultraedit", "--batch-size", 2,
              *_sets(llama_dir, "modules=[mlp.down_proj]")]  # one weight shape: 96x32 (in x out)
    out = tmp_path / "out.safetensors"
    _cli(*common, "--limit", 2, "-o", tmp_path / "a.safetensors")
    _cli("apply", llama_dir, tmp_path / "a.safetensors", "-o", tmp_path / "applied")
    _cli("diff", llama_dir, tmp_path / "applied", "-o", tmp_path / "diff.safetensors")  # the same edit, no state
    err = _refused(*common, "--start", 2, "--delta", tmp_path / "diff.safetensors", "-o", out)
    assert "carries no UltraEdit normaliser" in err and not out.exists()
    err = _refused(*common, "--start", 2, "--delta", tmp_path / "a.safetensors", "--set", "modules=[mlp.up_proj]",
                   "-o", out)
    assert "normaliser is for weight shapes 96x32, not 32x96" in err and not out.exists()
    _cli(*common, "--start", 2, "--limit", 2, "-o", tmp_path / "other.safetensors")  # a second chain from the base
    err = _refused(*common, "--start", 2, "--delta", tmp_path / "a.safetensors", "--delta",
                   tmp_path / "other.safetensors", "-o", out)
    assert "separate UltraEdit runs" in err and not out.exists()

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(CORPUS))
    stats = tmp_path / "s.safetensors"
    err = _refused("stats", llama_dir, "--method", "ultraedit", "--text", text, "-o", stats)
    assert "ultraedit uses no key statistics" in err and not stats.exists()
    _cli("stats", llama_dir, "--layers", 1, "--text", text, "-o", stats)
    result = runner.invoke(app, [str(a) for a in [*common, "--stats", stats, "-o", out]])
    assert result.exit_code == 0 and "--stats is not used: ultraedit needs no key statistics" in result.stderr
    assert "stats" not in Delta.load(out).history[0]


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_every_delta_command_handles_input_projections(tmp_path, request, fixture):
    model = request.getfixturevalue(fixture)
    delta_path = tmp_path / "d.safetensors"
    _cli("edit", model, "--requests", _requests(tmp_path / "r.jsonl"), "--method", "ultraedit", "--batch-size", 4,
         *_sets(model), "-o", delta_path)
    delta, base = Delta.load(delta_path), Checkpoint(model)
    inputs = [n for n in delta.entries if n.split(".")[-2] in ("up_proj", "c_fc")]
    assert len(inputs) == 2 and len(delta.entries) == 4
    for name, entry in delta.entries.items():
        assert entry.layout == base.layout(name) and entry.stored_shape == tuple(base.info(name).shape)

    shapes = {t["name"]: t["shape"] for t in _cli("inspect", delta_path, "--json")["tensors"]}
    assert all(shapes[n] == list(delta.entries[n].shape) for n in inputs)
    report = _cli("inspect", model, "--delta", delta_path, "--json")["tensors"]
    assert {t["name"] for t in report if t["delta"]} == set(delta.entries)

    # prune: the restraint of each entry is measured against its own base matrix; scale-free strength 1.5 halves
    # every singular value (all are below sigma_max(W) here), so D' = D / 2 exactly, input projections included.
    pruned = _cli("prune", model, delta_path, "--fn", "scale-free", "--strength", 1.5, "-o",
                  tmp_path / "p.safetensors", "--json")
    for t in pruned["tensors"]:
        w = base.get(t["name"]).double()
        assert t["sigma_max_base"] == pytest.approx(float(torch.linalg.matrix_norm(w, 2)), rel=1e-6)
    p = Delta.load(tmp_path / "p.safetensors")
    assert set(p.extras) == set(delta.extras)
    for name, entry in delta.entries.items():
        torch.testing.assert_close(p.entries[name].to_dense(), entry.to_dense() / 2, rtol=1e-4, atol=1e-7)

    _cli("apply", model, delta_path, "-o", tmp_path / "applied")
    applied = Checkpoint(tmp_path / "applied")
    for name, entry in delta.entries.items():
        torch.testing.assert_close(applied.get(name), base.get(name) + entry.stored_update(), rtol=1e-6, atol=1e-6)

    _cli("diff", model, tmp_path / "applied", "-o", tmp_path / "diff.safetensors")
    diffed = Delta.load(tmp_path / "diff.safetensors")
    assert set(diffed.entries) == set(delta.entries)
    for name, entry in delta.entries.items():
        torch.testing.assert_close(diffed.entries[name].to_dense(), entry.to_dense(), rtol=1e-4, atol=1e-6)

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _cli("export-lora", model, delta_path, "-o", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert {n.removesuffix(".weight") for n in delta.entries} == set(config["target_modules"])
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model),
                                            tmp_path / "lora").merge_and_unload().state_dict()
    for name, entry in delta.entries.items():
        torch.testing.assert_close(merged[name], base.get(name) + entry.stored_update(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- hyper-parameters
def _adapter(family: str, layers: int):
    return resolve_adapter(build_tiny_model(family, n_layer=layers))


def _names(stack: str, path: str, layers) -> list[str]:
    return [f"{stack}.{L}.{path}" for L in layers]


def test_packaged_defaults_per_family():
    official = {
        ("gptj", 28): _names("transformer.h", "mlp.fc_out", range(18, 27)),
        ("mistral", 32): _names("model.layers", "mlp.down_proj", (29, 30)),
        ("llama", 32): (_names("model.layers", "mlp.gate_proj", range(11, 16))
                        + _names("model.layers", "mlp.up_proj", range(18, 25))),
        ("qwen2", 28): (_names("model.layers", "mlp.gate_proj", range(18, 27))
                        + _names("model.layers", "mlp.up_proj", range(18, 27))),
        ("gpt2", 12): _names("transformer.h", "mlp.c_proj", range(3, 12)),  # the layer rule: 9 layers ending at 11
    }
    for (family, depth), names in official.items():
        hp = resolve_ultraedit_hparams(_adapter(family, depth))
        assert hp.to_json()["inner_params"] == names, family
        assert (hp.lr, hp.batch_size_once, hp.token, hp.context_template_length_params) == (1e-6, 10, "ans", ())
        assert hp.layers == tuple(sorted({int(n.split(".")[-3]) for n in names}))
    # --layers keeps the modules: LLaMA-3's gate and up projections, now at layers 2-3.
    hp = resolve_ultraedit_hparams(_adapter("llama", 32), sets=["layers=2-3"])
    assert hp.to_json()["inner_params"] == (_names("model.layers", "mlp.gate_proj", (2, 3))
                                            + _names("model.layers", "mlp.up_proj", (2, 3)))


def test_shipped_models_defaults():
    """SmolLM2-135M (llama, 30 layers) and Gemma-3-270M (gemma3_text, 18 layers), as chosen in ultraedit.yaml."""
    for (family, depth), module, layers, lr in [(("llama", 30), "mlp.down_proj", range(20, 29), 5e-4),
                                                (("gemma3_text", 18), "mlp.up_proj", range(8, 17), 3e-5)]:
        hp = resolve_ultraedit_hparams(_adapter(family, depth))
        assert hp.to_json()["inner_params"] == _names("model.layers", module, layers)
        assert (hp.lr, hp.batch_size_once, hp.token) == (lr, 10, "ans")


@pytest.mark.parametrize("path", EASYEDIT, ids=[p.stem for p in EASYEDIT])
def test_easyedit_files_load_as_they_are(path):
    user = yaml.safe_load(path.read_text())
    assert file_method(path) == "ultraedit"
    check_hparams_file(path)  # bookkeeping keys, no model needed
    stand_in = {"llama3-8b-instruct": ("llama", 32), "mistral-7b": ("mistral", 32), "qwen2.5-7b": ("qwen2", 28),
                "gpt-j-6B": ("gptj", 28), "gemma-3-27b": ("gemma3_text", 62)}.get(path.stem.split("_", 1)[1])
    if stand_in is None:  # phi-4: prunecli has no adapter for phi3 models
        return
    adapter = _adapter(*stand_in)
    notes = []
    hp = resolve_ultraedit_hparams(adapter, path, on_note=notes.append)
    expected = [f"{adapter.stack_name}.{n.split('layers.')[-1].split('h.')[-1]}" for n in user["inner_params"]]
    assert hp.to_json()["inner_params"] == expected
    assert (hp.lr, hp.batch_size_once, hp.token) == (1e-6, 10, "mask")
    assert len(notes) == 1 and "editor_batch_size" in notes[0] and "tokenizer_name" in notes[0]


def test_hyperparameter_errors(tmp_path):
    adapter = _adapter("llama", 4)
    for sets, message in [(["colour=1"], "unknown UltraEdit hyper-parameter 'colour'"),
                          (["token=every"], "token one of ans, mask"),
                          (["lr=0"], "lr > 0"),
                          (["layers=9"], "layer 9 is out of range"),
                          (["modules=[mlp.act_fn]"], "no weight matrix 'mlp.act_fn'"),
                          (["inner_params=[model.layers.1.mlp.up_proj]", "layers=1"], "give one of the two"),
                          (["inner_params=[model.embed_tokens]"], "not a module of this model's decoder layers"),
                          (["modules=[mlp.up_proj,mlp.up_proj]"], "contain duplicates")]:
        with pytest.raises(PruneCliError, match=message):
            resolve_ultraedit_hparams(adapter, sets=sets)
    memit = tmp_path / "memit.yaml"
    memit.write_text("alg_name: MEMIT\nlayers: [1]\n")
    with pytest.raises(PruneCliError, match="holds MEMIT hyper-parameters, but the method is ultraedit"):
        check_file("ultraedit", memit)
    # A file without --method selects UltraEdit by its alg_name, and its bookkeeping keys are noted, not used.
    mine = tmp_path / "mine.yaml"
    mine.write_text("alg_name: ULTRAEDIT\nhalf: true\ninner_params: [model.layers.2.mlp.gate_proj]\nlr: 1e-2\n")
    summary = _cli("edit", _tiny_dir(tmp_path), "--requests", _requests(tmp_path / "r.jsonl"), "--hparams", mine,
                   "--batch-size", 4, "-o", tmp_path / "d.safetensors", "--json")
    assert summary["method"] == "ultraedit" and summary["hparams"]["inner_params"] == ["model.layers.2.mlp.gate_proj"]
    assert math.isclose(summary["hparams"]["lr"], 1e-2)


def _tiny_dir(tmp_path: Path) -> Path:
    from tiny_models import save_tiny_model

    return save_tiny_model("llama", tmp_path / "llama")
