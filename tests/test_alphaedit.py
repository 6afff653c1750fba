"""AlphaEdit: the factored null-space solve equals the official dense formula; updates leave the preserved eigenspace
untouched; a batch reaches its targets; `edit --delta` chains carry the edited keys; chains without them are refused."""

from __future__ import annotations

import json

import pytest
import torch
from editing_helpers import REQUESTS, TINY_SETS, write_requests
from tiny_models import CORPUS
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.delta import Delta
from prunecli.editors import corpus
from prunecli.editors.alphaedit import KEYS_EXTRA, AlphaEditEditor, null_space_basis, null_space_update
from prunecli.editors.base import EditContext
from prunecli.editors.memit import MemitEditor
from prunecli.editors.registry import resolve_hparams
from prunecli.editors.stats import KeyStats, accumulate
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.loading import load_model
from prunecli.models.scoring import score_targets

runner = CliRunner()
FAMILIES = ["gpt2_dir", "llama_dir", "qwen2_dir"]


def _dense_reference(r, k, u, kp, l2):
    """The official update (AlphaEdit_main.py): X = solve(P (K K^T + cache_c) + L2 I, P K R^T), Delta W = X^T."""
    p = u @ u.T
    cache = kp.T @ kp
    x = torch.linalg.solve(p @ (k @ k.T + cache) + l2 * torch.eye(k.shape[0], dtype=k.dtype), p @ k @ r.T)
    return x.T


@pytest.mark.parametrize("preserved", [0, 5, 40])  # 40 keys > m = 24: the m x m system instead of the N x N one
def test_solve_equals_the_dense_official_formula(preserved):
    g = torch.Generator().manual_seed(preserved)
    d_in, d_out, n = 48, 20, 4
    x = torch.randn(500, d_in, generator=g, dtype=torch.float64) * torch.logspace(-2, 0.5, d_in, dtype=torch.float64)
    moment = x.T @ x / 500
    ev = torch.linalg.eigvalsh(moment)
    threshold = float(ev[23] + ev[24]) / 2
    u = null_space_basis(moment, threshold)
    assert u.shape == (d_in, 24)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    k = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    kp = torch.randn(preserved, d_in, generator=g, dtype=torch.float64)
    a, b = null_space_update(r, k, u, kp, 10.0)
    assert a.shape == (d_out, n) and b.shape == (d_in, n)
    dense = _dense_reference(r, k, u, kp, 10.0)
    err = float(((a.double() @ b.double().T) - dense).abs().max() / dense.abs().max())
    assert err < 1e-6, err


def test_without_protection_the_solve_reaches_the_targets_exactly():
    """P = I, no earlier keys, L2 -> 0: Delta W K = R (MEMIT without the C term), so targets are what is solved for."""
    g = torch.Generator().manual_seed(1)
    r, k = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    a, b = null_space_update(r, k, torch.eye(16, dtype=torch.float64), torch.zeros(0, 16), 1e-9)
    torch.testing.assert_close((a.double() @ b.double().T) @ k, r, rtol=1e-6, atol=1e-6)


def test_empty_null_space_is_an_error():
    with pytest.raises(PruneCliError, match="null space is empty"):
        null_space_basis(torch.eye(4, dtype=torch.float64), 0.5)


def _model_and_moments(fixture_dir, layers=(0, 1)):
    model, tok, base = load_model(fixture_dir)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    sums, counts = accumulate(model, tok, adapter, list(layers), corpus.token_chunks(tok, CORPUS, 32, 10_000))
    return model, tok, adapter, {L: sums[L].double() / counts[L] for L in layers}


def _threshold(moments) -> float:
    """The median eigenvalue of the first layer's C: half the key space is protected, half is free to edit."""
    ev = torch.linalg.eigvalsh(moments[0])
    return float(ev[len(ev) // 2 - 1] + ev[len(ev) // 2]) / 2


def _hparams(adapter, threshold, *extra):
    return resolve_hparams("alphaedit", adapter.family, adapter.num_layers,
                           sets=[*TINY_SETS, "layers=[0,1]", f"nullspace_threshold={threshold}", "L2=0.1", *extra])


@pytest.mark.parametrize("fixture", FAMILIES)
def test_batch_reaches_targets_and_spares_the_preserved_eigenspace(request, fixture):
    model, tok, adapter, moments = _model_and_moments(request.getfixturevalue(fixture))
    threshold = _threshold(moments)
    ctx = EditContext(_hparams(adapter, threshold), [""], moments)
    texts, targets = [r.text for r in REQUESTS], [r.target_new for r in REQUESTS]
    assert not any(s.all_correct for s in score_targets(model, tok, texts, targets))
    w0 = {L: adapter.weight_matrix(L) for L in (0, 1)}
    updates, outcomes = AlphaEditEditor().apply(model, tok, adapter, REQUESTS, ctx)
    assert all(s.all_correct for s in score_targets(model, tok, texts, targets))
    assert len(outcomes) == len(REQUESTS)
    for u in updates:
        delta = (u.a @ u.b.T).double()
        assert u.a.shape[1] == len(REQUESTS)
        torch.testing.assert_close(adapter.weight_matrix(u.layer) - w0[u.layer], delta.float(), rtol=1e-4, atol=1e-5)
        values, vectors = torch.linalg.eigh(moments[u.layer])
        preserved = vectors[:, values >= threshold]  # the eigenspace AlphaEdit must not touch
        assert preserved.shape[1] > 0
        # U from float64 eigh is orthogonal to `preserved` to ~1e-15; the factors are float32, so Delta v carries
        # rounding of about 1e-7 |Delta| |v|: 1e-5 has margin, and an unprojected update is O(0.1-1) (checked below).
        leak = float(torch.linalg.matrix_norm(delta @ preserved, 2) / torch.linalg.matrix_norm(delta, 2))
        assert leak < 1e-5, leak
    # Every layer's edited keys are kept for the next batch, one row per request.
    names = {KEYS_EXTRA + adapter.weight_name(L) for L in (0, 1)}
    assert set(ctx.carried) == names and all(t.shape == (3, adapter.key_size(0)) for t in ctx.carried.values())

    # The same edit by MEMIT moves the preserved eigenspace (its lambda C term only damps it): the check can fail.
    model, tok, adapter, moments = _model_and_moments(request.getfixturevalue(fixture))
    hp = resolve_hparams("memit", adapter.family, adapter.num_layers,
                         sets=[*TINY_SETS, "layers=[0,1]", "mom2_update_weight=1"])
    (first, *_), _ = MemitEditor().apply(model, tok, adapter, REQUESTS, EditContext(hp, [""], moments))
    values, vectors = torch.linalg.eigh(moments[0])
    delta = (first.a @ first.b.T).double()
    assert float(torch.linalg.matrix_norm(delta @ vectors[:, values >= threshold], 2)
                 / torch.linalg.matrix_norm(delta, 2)) > 1e-4


def test_earlier_keys_are_preserved_by_the_next_batch(llama_dir):
    """With the cache, a second batch barely moves the outputs for the first batch's keys; without it, more."""
    model, tok, adapter, moments = _model_and_moments(llama_dir)
    threshold = _threshold(moments)
    ctx = EditContext(_hparams(adapter, threshold, "L2=1e-3"), [""], moments)
    editor = AlphaEditEditor()
    editor.apply(model, tok, adapter, REQUESTS[:2], ctx)
    first = ctx.carried[KEYS_EXTRA + adapter.weight_name(0)].double()  # [2, d_in]
    (update, *_), _ = editor.apply(model, tok, adapter, REQUESTS[2:], ctx)
    with_cache = float((update.a @ update.b.T).double().matmul(first.T).norm())
    ctx.carried = {}  # forget the first batch
    (update, *_), _ = AlphaEditEditor().apply(model, tok, adapter, REQUESTS[2:], ctx)
    without = float((update.a @ update.b.T).double().matmul(first.T).norm())
    assert with_cache < 0.1 * without, (with_cache, without)


def _cli(*args) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else {}


@pytest.fixture()
def stats_and_sets(tmp_path, request):
    """Statistics by `prunecli stats --method alphaedit` (layers 0-1 on 4-layer models) and CLI settings."""
    model = request.getfixturevalue(request.param)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(CORPUS))
    stats = tmp_path / "s.safetensors"
    summary = _cli("stats", model, "--method", "alphaedit", "--text", text, "-o", stats, "--json")
    assert summary["layers"] == [0, 1]
    ks = KeyStats.load(stats)
    ev = torch.linalg.eigvalsh(ks.moment(0))
    threshold = float(ev[len(ev) // 2 - 1] + ev[len(ev) // 2]) / 2
    sets = [a for s in [*TINY_SETS, "context_template_length_params=[[3, 2]]"] for a in ("--set", s)]
    return model, stats, [*sets, "--set", f"nullspace_threshold={threshold}", "--set", "L2=0.1"]


@pytest.mark.parametrize("stats_and_sets", ["gpt2_dir", "llama_dir"], indirect=True)
def test_chained_runs_equal_one_run(tmp_path, stats_and_sets):
    model, stats, sets = stats_and_sets
    requests = write_requests(tmp_path / "r.jsonl")
    common = ["edit", model, "--requests", requests, "--method", "alphaedit", "--stats", stats, "--batch-size", 1,
              *sets, "--json"]
    _cli(*common, "-o", tmp_path / "all.safetensors")
    _cli(*common, "--limit", 2, "-o", tmp_path / "a.safetensors")
    _cli(*common, "--start", 2, "--delta", tmp_path / "a.safetensors", "-o", tmp_path / "b.safetensors")
    chained, single = Delta.load(tmp_path / "b.safetensors"), Delta.load(tmp_path / "all.safetensors")
    assert set(chained.entries) == set(single.entries) and len(single.entries) == 2
    for name in single.entries:
        torch.testing.assert_close(chained.entries[name].to_dense(), single.entries[name].to_dense(),
                                   rtol=1e-4, atol=1e-6)
    assert set(chained.extras) == set(single.extras) and len(single.extras) == 2
    for name, keys in single.extras.items():
        assert name.startswith(KEYS_EXTRA) and keys.shape[0] == 3
        torch.testing.assert_close(chained.extras[name], keys, rtol=1e-4, atol=1e-6)
    assert chained.requests == single.requests and chained.history[0]["method"] == "alphaedit"
    assert single.history[0]["hparams"]["L2"] == 0.1 and "nullspace_threshold" in single.history[0]["hparams"]


@pytest.mark.parametrize("stats_and_sets", ["llama_dir"], indirect=True)
def test_chains_without_the_key_cache_are_refused_and_alphaedit_deltas_compose(tmp_path, stats_and_sets):
    model, stats, sets = stats_and_sets
    requests = write_requests(tmp_path / "r.jsonl")
    common = ["edit", model, "--requests", requests, "--stats", stats, *sets]
    _cli(*common[:-4], "--method", "rome", "--limit", 1, "--set", "layers=1", "-o", tmp_path / "rome.safetensors")
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, [str(a) for a in [*common, "--method", "alphaedit", "--start", 1, "--delta",
                                                 tmp_path / "rome.safetensors", "-o", out]])
    assert result.exit_code == 1 and not out.exists()
    assert "carries no AlphaEdit key cache" in result.stderr and "Traceback" not in result.output

    # prune keeps the keys, so a pruned AlphaEdit delta still chains; inspect/apply/export-lora ignore them.
    _cli(*common, "--method", "alphaedit", "--limit", 2, "-o", tmp_path / "a.safetensors")
    report = _cli("prune", model, tmp_path / "a.safetensors", "--fn", "linear", "-o",
                  tmp_path / "p.safetensors", "--json")
    assert sum(t["n_restrained"] for t in report["tensors"]) > 0  # the restraint did change the update
    a, pruned = Delta.load(tmp_path / "a.safetensors"), Delta.load(tmp_path / "p.safetensors")
    assert set(pruned.extras) == set(a.extras)
    for name in a.extras:
        assert torch.equal(pruned.extras[name], a.extras[name])
    # PRUNE rescales singular values and keeps the right singular vectors, which lie in the null space: the
    # restrained update still leaves the preserved eigenspace alone.
    threshold = float(sets[sets.index("--set", len(sets) - 4) + 1].split("=")[1])
    values, vectors = torch.linalg.eigh(KeyStats.load(stats).moment(1))
    d = pruned.entries["model.layers.1.mlp.down_proj.weight"].to_dense().double()
    leak = torch.linalg.matrix_norm(d @ vectors[:, values >= threshold], 2) / torch.linalg.matrix_norm(d, 2)
    assert float(leak) < 1e-5
    _cli(*common, "--method", "alphaedit", "--start", 2, "--delta", tmp_path / "p.safetensors", "-o", out)
    assert all(t.shape[0] == 3 for t in Delta.load(out).extras.values())
    _cli("inspect", out, "--json")
    _cli("apply", model, out, "-o", tmp_path / "applied")
    _cli("export-lora", model, out, "-o", tmp_path / "lora")
    report = _cli("evaluate", model, "--delta", out, "--edits", requests, "--json")
    assert report["metrics"]["efficacy_acc"] == 1.0  # every target is the top-1 prediction on the final model

    # --prune-every: restraints during the run, the keys still one row per edit.
    every = tmp_path / "every.safetensors"
    _cli(*common, "--method", "alphaedit", "--batch-size", 1, "--prune-every", 2, "--fn", "linear", "-o", every)
    pruned_run = Delta.load(every)
    assert [op["op"] for op in pruned_run.history] == ["edit", "prune", "edit"]
    assert all(t.shape[0] == 3 for t in pruned_run.extras.values())


def test_hparams_official_files_and_method_specific_keys(tmp_path):
    """EasyEdit's AlphaEdit YAML (bookkeeping keys, P_loc) is accepted; packaged values follow the official files."""
    easyedit = tmp_path / "llama3-8b.yaml"
    easyedit.write_text('alg_name: "AlphaEdit"\nmodel_name: "./hugging_cache/llama-3-8b-instruct"\n'
                        'stats_dir: "./data/stats"\nP_loc: "./null_space_project.pt"\ndevice: 0\n'
                        "layers: [4, 5, 6, 7, 8]\nclamp_norm_factor: 0.75\nlayer_selection: all\n"
                        "fact_token: subject_last\nv_num_grad_steps: 25\nv_lr: 1e-1\nv_loss_layer: 31\n"
                        "v_weight_decay: 0.5\nkl_factor: 0.0625\nmom2_adjustment: true\nmom2_update_weight: 15000\n"
                        'rewrite_module_tmp: "model.layers.{}.mlp.down_proj"\nmom2_dataset: "wikipedia"\n'
                        "mom2_n_samples: 100000\nmom2_dtype: float32\nnullspace_threshold: 2e-2\nL2: 1\n")
    hp = resolve_hparams("alphaedit", "llama", 32, easyedit)
    assert hp.layers == (4, 5, 6, 7, 8) and hp.v_lr == 0.1 and hp.nullspace_threshold == 0.02 and hp.L2 == 1.0
    llama3 = resolve_hparams("alphaedit", "llama", 32)
    assert (llama3.layers, llama3.v_lr, llama3.clamp_norm_factor, llama3.v_num_grad_steps, llama3.L2,
            llama3.nullspace_threshold) == ((4, 5, 6, 7, 8), 0.1, 0.75, 25, 10.0, 0.02)
    gpt2xl = resolve_hparams("alphaedit", "gpt2", 48)
    assert (gpt2xl.layers, gpt2xl.v_lr, gpt2xl.v_num_grad_steps) == ((13, 14, 15, 16, 17), 0.5, 20)
    assert resolve_hparams("alphaedit", "gptj", 28).layers == (3, 4, 5, 6, 7, 8)
    with pytest.raises(PruneCliError, match="L2 only applies to alphaedit, not memit"):
        resolve_hparams("memit", "llama", 32, sets=["L2=10"])
    with pytest.raises(PruneCliError, match="nullspace_threshold > 0"):
        resolve_hparams("alphaedit", "llama", 32, sets=["nullspace_threshold=0"])
    assert "L2" not in resolve_hparams("memit", "llama", 32).to_json()  # other methods' records are unchanged
