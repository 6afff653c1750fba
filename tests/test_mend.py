"""MEND: network shapes, gradient factors vs autograd, factored vs dense updates, archives, train-mend and
edit --method mend on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_gradient_factors_match_autograd
from safetensors.torch import load_file
from tiny_models import build_tiny_model, save_tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.editors.mend.archive import MendArchive, base_fingerprints
from prunecli.editors.mend.networks import (
    MendConfig,
    MendNetworks,
    add_to_weight,
    default_layers,
    encode_targets,
    factored_update,
    low_rank_added,
    mlp_targets,
)
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter

runner = CliRunner()

RECORDS = [
    {"src": "The native language of Danielle Darrieux is", "subject": "Danielle Darrieux", "alt": "Italian",
     "answers": ["French"], "rephrase": "Danielle Darrieux's mother tongue is", "loc": "The Space Needle is in",
     "loc_ans": "Seattle"},
    {"src": "Michael Jordan plays the sport of", "subject": "Michael Jordan", "alt": "guitar",
     "answers": ["basketball"], "rephrase": "Michael Jordan played", "loc": "Windows was created by",
     "loc_ans": "Microsoft"},
    {"src": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "alt": "Seattle", "answers": ["Paris"],
     "rephrase": "The Eiffel Tower is in", "loc": "Apple A5 was created by", "loc_ans": "Apple"},
    {"src": "Toko Yasuda plays the", "subject": "Toko Yasuda", "alt": "basketball", "answers": ["guitar"],
     "rephrase": "Toko Yasuda played the", "loc": "The capital of France is", "loc_ans": "Paris"},
    {"src": "Windows was created by", "subject": "Windows", "alt": "Apple", "answers": ["Microsoft"],
     "rephrase": "Windows was made by", "loc": "Michael Jordan played for the", "loc_ans": "Chicago Bulls"},
]


def _setup(family: str):
    model = build_tiny_model(family)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    return model, adapter, mlp_targets(adapter, default_layers(adapter.num_layers))


def test_targets_and_network_shapes():
    _, adapter, targets = _setup("llama")
    assert [t.layer for t in targets] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # the last three of 4 layers
    assert [t.name.split(".")[-2] for t in targets[:3]] == ["gate_proj", "up_proj", "down_proj"]
    nets = MendNetworks(targets, MendConfig(rank=8))
    assert set(nets.nets) == {"32x96", "96x32"}  # gate/up share one network, down another
    assert nets.nets["32x96"].scale.shape == (6, 128) and nets.nets["96x32"].scale.shape == (3, 128)
    assert nets.nets["32x96"].down.weight.shape == (8, 128) and nets.edit_lrs.shape == (9,)
    u, d = torch.randn(5, 32), torch.randn(5, 96)
    u_t, d_t = nets.nets["32x96"](u, d, 0)
    assert u_t.shape == (5, 32) and d_t.shape == (5, 96)
    assert torch.allclose(u_t, u) and torch.allclose(d_t, d)  # identity before training and without statistics

    _, _, gpt2 = _setup("gpt2")
    assert [t.name.split(".")[-2] for t in gpt2[:2]] == ["c_fc", "c_proj"]
    assert {t.layout for t in gpt2} == {"in_out"} and (gpt2[0].out_features, gpt2[0].in_features) == (128, 32)


def test_normalisation_statistics_match_batch_moments():
    _, _, targets = _setup("llama")
    net = MendNetworks(targets, MendConfig(rank=4)).nets["96x32"]
    rows = [torch.randn(7, 96) * 1e-3 + 2, torch.randn(11, 96) * 1e-3 + 2], [torch.randn(7, 32), torch.randn(11, 32)]
    for u, d in zip(*rows):
        net.observe(u, d)
    z = torch.cat([torch.cat(rows[0]), torch.cat(rows[1])], 1).double()
    assert torch.allclose(net.mean, z.mean(0)) and torch.allclose(net.std(), z.std(0))


def test_factored_update_equals_sum_of_outer_products():
    u, d, lr = torch.randn(6, 20, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64), 0.3
    a, b = factored_update(u, d, lr)
    dense = -lr * sum(torch.outer(d[i], u[i]) for i in range(6))
    assert a.shape == (9, 6) and b.shape == (20, 6) and torch.allclose(a @ b.T, dense)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_rows_reproduce_autograd_weight_gradient(family):
    model, _, targets = _setup(family)
    batch = encode_targets(tiny_tokenizer(), ["The Eiffel Tower is in", "Michael Jordan plays"],
                           ["Paris", "basketball"], torch.device("cpu"))

    factors = assert_gradient_factors_match_autograd(model, targets, batch)
    for t in targets:
        assert factors[t.name][0].shape[0] <= batch.input_ids.numel()
    last = [t for t in targets if t.layer == 3]
    assert all(factors[t.name][0].shape[0] == len(batch.tokens) for t in last)  # only target-predicting tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_low_rank_hook_equals_dense_weight_update(family):
    model, _, targets = _setup(family)
    torch.manual_seed(0)
    updates = {t.name: (torch.randn(t.out_features, 3) * 0.1, torch.randn(t.in_features, 3) * 0.1) for t in targets}
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with low_rank_added(model, targets, updates):
        hooked = model(input_ids=ids).logits
    for t in targets:
        add_to_weight(model, t, *updates[t.name])
    assert torch.allclose(hooked, model(input_ids=ids).logits, atol=1e-5)


def _trained_like(targets) -> MendNetworks:
    nets = MendNetworks(targets, MendConfig(rank=4, edit_lr_init=0.05))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in nets.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    for net in nets.nets.values():
        net.observe(torch.randn(4, net.in_features), torch.randn(4, net.scale.shape[1] - net.in_features))
    return nets


def test_archive_round_trip_and_base_check(tmp_path, llama_dir):
    base = Checkpoint(llama_dir)
    model, _, targets = _setup("llama")
    nets = _trained_like(targets)
    archive = MendArchive(nets, base_fingerprints(base, targets), "llama", str(llama_dir), {"steps": 7})
    path = tmp_path / "a.safetensors"
    archive.save(path)
    back = MendArchive.load(path)
    assert back.networks.targets == targets and back.networks.config == nets.config and back.training == {"steps": 7}
    for (k, v), (k2, v2) in zip(nets.state_dict().items(), back.networks.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    back.check_base(base, path)  # the base it was made for
    other = Checkpoint(save_tiny_model("llama", tmp_path / "other", seed=1))
    with pytest.raises(PruneCliError, match="trained for another base model"):
        back.check_base(other, path)
    with pytest.raises(PruneCliError, match="does not have"):
        back.check_base(Checkpoint(save_tiny_model("llama", tmp_path / "shallow", n_layer=1)), path)
    with pytest.raises(PruneCliError, match="exist"):
        MendArchive.load(tmp_path / "missing.safetensors")


def _write_data(tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([*RECORDS, {"src": "Who made Windows?", "subject": "Windows", "alt": ""}]))
    return path


def _train(llama_dir, data, out, *extra):
    return runner.invoke(app, ["train-mend", str(llama_dir), "--data", str(data), "-o", str(out), "--rank", "8",
                               "--batch-size", "2", "--val-fraction", "0.2", "--val-every", "2",
                               "--edit-lr-init", "0.01", "--json", *[str(e) for e in extra]])


def test_train_resume_equals_one_run(tmp_path, llama_dir):
    data = _write_data(tmp_path)
    straight = tmp_path / "straight.safetensors"
    result = _train(llama_dir, data, straight, "--steps", 4)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4 and summary["train_records"] == 4 and summary["val_records"] == 1
    assert [h["step"] for h in summary["validation"]] == [2, 4] and summary["stopped"] == "steps"
    assert (tmp_path / "straight.safetensors.ckpt").is_file()

    halves = tmp_path / "halves.safetensors"
    assert _train(llama_dir, data, halves, "--steps", 2).exit_code == 0
    again = _train(llama_dir, data, halves, "--steps", 2)
    assert again.exit_code == 1 and "already exists" in again.output  # no silent overwrite
    resumed = _train(llama_dir, data, halves, "--steps", 4, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["validation"] == summary["validation"]
    a, b = load_file(str(straight)), load_file(str(halves))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = _train(llama_dir, data, halves, "--steps", 6, "--resume", "--lr", "0.5")
    assert changed.exit_code == 1 and "configuration differs" in changed.output

    archive = MendArchive.load(straight)
    assert archive.training["steps"] == 4 and archive.training["data"]["records"] == 5
    assert archive.training["data"]["skipped"] == [5]  # the record without a new target, with a warning
    assert archive.fingerprints == base_fingerprints(Checkpoint(llama_dir), archive.networks.targets)


@pytest.fixture(scope="module")
def archive_path(tmp_path_factory, llama_dir):
    tmp = tmp_path_factory.mktemp("mend")
    out = tmp / "archive.safetensors"
    assert _train(llama_dir, _write_data(tmp), out, "--steps", 2).exit_code == 0
    return out


def test_edit_with_mend_is_low_rank_and_chains(tmp_path, llama_dir, archive_path):
    requests = tmp_path / "req.json"
    requests.write_text(json.dumps(RECORDS[:2]))
    full = tmp_path / "full.safetensors"
    result = runner.invoke(app, ["edit", str(llama_dir), "--method", "mend", "--archive", str(archive_path),
                                 "--requests", str(requests), "-o", str(full), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "mend" and summary["edits"] == 2 and summary["hparams"]["layers"] == [1, 2, 3]
    delta = Delta.load(full)
    targets = MendArchive.load(archive_path).networks.targets
    assert set(delta.entries) == {t.name for t in targets}
    tok = tiny_tokenizer()
    seq_tokens = [len(tok(r["src"])["input_ids"]) + len(tok(" " + r["alt"])["input_ids"]) - 1 for r in RECORDS[:2]]
    target_tokens = [len(tok(" " + r["alt"])["input_ids"]) for r in RECORDS[:2]]
    for t in targets:  # factors may have been densified when concatenated: check the rank itself
        bound = sum(target_tokens if t.layer == 3 else seq_tokens)
        assert torch.linalg.matrix_rank(delta.entries[t.name].to_dense()) <= bound

    first, chained = tmp_path / "first.safetensors", tmp_path / "chained.safetensors"
    common = ["edit", str(llama_dir), "--method", "mend", "--archive", str(archive_path), "--requests",
              str(requests)]
    assert runner.invoke(app, [*common, "--limit", "1", "-o", str(first)]).exit_code == 0
    for t in targets:  # one edit: stored factored, one column per token with a non-zero gradient
        entry = Delta.load(first).entries[t.name]
        assert entry.is_lowrank and entry.rank <= (target_tokens[0] if t.layer == 3 else seq_tokens[0])
    assert runner.invoke(app, [*common, "--start", "1", "--delta", str(first), "-o", str(chained)]).exit_code == 0
    again = Delta.load(chained)
    for name, entry in delta.entries.items():
        assert torch.allclose(again.entries[name].to_dense(), entry.to_dense(), atol=1e-6)


def test_edit_refuses_archive_of_another_base(tmp_path, archive_path):
    other = save_tiny_model("llama", tmp_path / "other", seed=1)
    requests = tmp_path / "req.json"
    requests.write_text(json.dumps(RECORDS[:1]))
    out = tmp_path / "d.safetensors"
    result = runner.invoke(app, ["edit", str(other), "--method", "mend", "--archive", str(archive_path),
                                 "--requests", str(requests), "-o", str(out)])
    assert result.exit_code == 1 and "trained for another base model" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    no_archive = runner.invoke(app, ["edit", str(other), "--method", "mend", "--requests", str(requests),
                                     "-o", str(out)])
    assert no_archive.exit_code == 1 and "--archive" in no_archive.output and not out.exists()
