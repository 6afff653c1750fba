"""NAS while editing: each editor's targets against a float64 reference of the rescale-or-drop rule (ROME's whole
value, MEMIT's MLP output inside the residual target), the anchor measured by `prunecli anchor` against a plain
forward pass, and `edit --nas` recording and refusing anchors from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from editing_helpers import RECORDS, REQUESTS, TINY_SETS, write_requests
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.core.checkpoint import Checkpoint
from prunecli.core.delta import Delta
from prunecli.editors.base import EditContext
from prunecli.editors.keys import subject_keys
from prunecli.editors.memit import residual_targets, value_site
from prunecli.editors.nas import Anchor, anchored, rescale, target_norms
from prunecli.editors.prompts import encode_subject_prompt
from prunecli.editors.registry import resolve_hparams
from prunecli.editors.rome import RomeEditor
from prunecli.editors.tracing import record
from prunecli.editors.value import optimize_values
from prunecli.models.adapters import resolve_adapter
from prunecli.models.loading import load_model

runner = CliRunner()
LAYER = 1
FACTS = [{**r, "ground_truth": "Paris"} for r in RECORDS]


def _setup(path: Path, method: str):
    model, tok, _ = load_model(path)
    model.requires_grad_(False)
    adapter = resolve_adapter(model)
    hp = resolve_hparams(method, adapter.family, adapter.num_layers, sets=[*TINY_SETS, f"layers=[{LAYER}]"])
    return model, tok, adapter, hp


def test_rescale_gives_the_anchored_targets_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    v0, shift = torch.randn(5, 7, generator=g), 3 * torch.randn(5, 7, generator=g)
    shift[0] *= 10  # far above the others: dropped
    anchor = float((v0 + shift).double().norm(dim=1).median())
    new, dropped = rescale(v0, shift, anchor, "memit")
    target = v0.double() + new.double()
    expected, expected_dropped = anchored(v0.double(), v0.double() + shift.double(), anchor, 2.0)
    assert dropped == expected_dropped.tolist() and dropped[0]
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)
    assert float(new[0].abs().max()) < 1e-6  # dropped: no shift at all
    kept = [i for i, d in enumerate(dropped) if not d]
    torch.testing.assert_close(target[kept].norm(dim=1), torch.full((len(kept),), anchor, dtype=torch.float64))
    cos = torch.nn.functional.cosine_similarity(target[kept], (v0 + shift).double()[kept])
    torch.testing.assert_close(cos, torch.ones_like(cos))  # same direction as v0 + shift
    _, rome_dropped = rescale(v0, shift, anchor, "rome")
    assert rome_dropped == anchored(v0, v0 + shift, anchor, 5.0)[1].tolist()


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
def test_rome_target_is_its_whole_value_rescaled(request: pytest.FixtureRequest, fixture: str) -> None:
    """W' k* = anchored(W k*, W k* + delta) with ROME's bound (5 anchors), from the same k* and delta as the plain
    edit (the editor is deterministic)."""
    path = request.getfixturevalue(fixture)
    model, tok, adapter, hp = _setup(path, "rome")
    req = REQUESTS[0]
    keys, _ = subject_keys(model, tok, adapter.projection(LAYER), [req], [""])
    (value,) = optimize_values(model, tok, adapter, LAYER, adapter.projection(LAYER), [req], [""], hp)
    w0 = adapter.weight_matrix(LAYER).double()
    k = keys[0].double()
    v0 = w0 @ k
    for scale, drops in ((1.5, False), (0.1, True)):  # an anchor below |v*| / 5 drops the edit
        anchor = scale * float((v0 + value.delta.double()).norm())
        model, tok, adapter, hp = _setup(path, "rome")
        _, (outcome,) = RomeEditor().apply(model, tok, adapter, [req], EditContext(hp, [""], anchor=anchor))
        assert outcome.dropped == drops
        expected, _ = anchored(v0[None], (v0 + value.delta.double())[None], anchor, 5.0)
        torch.testing.assert_close(adapter.weight_matrix(LAYER).double() @ k, expected[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
def test_memit_residual_target_carries_the_anchored_mlp_output(request: pytest.FixtureRequest, fixture: str) -> None:
    """z = (h - m0) + anchored(m0, m0 + delta): h the layer's output and m0 its MLP projection's output at the
    subject's last token of the bare prompt, read here by a plain forward pass."""
    model, tok, adapter, hp = _setup(request.getfixturevalue(fixture), "memit")
    requests = REQUESTS[:2]
    plain, _ = residual_targets(model, tok, adapter, LAYER, requests, EditContext(hp, [""]))
    h, m0 = [], []
    for r in requests:
        prompt = encode_subject_prompt(tok, "", r.prompt, r.subject)
        seen = record(model, {"h": (adapter.layer_module(LAYER), "output"), "m": (adapter.projection(LAYER), "output")},
                      input_ids=torch.tensor([prompt.ids]))
        h.append(seen["h"][0, prompt.subject_index].double())
        m0.append(seen["m"][0, prompt.subject_index].double())
    h_, m0_ = torch.stack(h), torch.stack(m0)
    delta = plain.double() - h_
    anchor = float((m0_ + delta).norm(dim=1).mean())
    z, outcomes = residual_targets(model, tok, adapter, LAYER, requests, EditContext(hp, [""], anchor=anchor))
    expected, dropped = anchored(m0_, m0_ + delta, anchor, 2.0)
    assert [o.dropped for o in outcomes] == dropped.tolist()
    torch.testing.assert_close(z.double(), h_ - m0_ + expected, rtol=1e-4, atol=1e-4)


def test_target_norms_are_the_mlp_output_plus_the_shift(llama_dir: Path) -> None:
    """The anchor's norms: |m0 + delta| with delta MEMIT's shift on the bare prompt, m0 the projection's output."""
    model, tok, adapter, hp = _setup(llama_dir, "memit")
    site = value_site(adapter, LAYER)
    norms = target_norms(model, tok, adapter, LAYER, site, REQUESTS, hp)
    values = optimize_values(model, tok, adapter, LAYER, site, REQUESTS, [""], hp)
    for r, v, n in zip(REQUESTS, values, norms):
        prompt = encode_subject_prompt(tok, "", r.prompt, r.subject)
        m = record(model, {"m": (adapter.projection(LAYER), "output")},
                   input_ids=torch.tensor([prompt.ids]))["m"][0, prompt.subject_index]
        assert float(n) == pytest.approx(float((m + v.delta).norm()), rel=1e-4)


def _cli(*args: object) -> dict:
    result = runner.invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_anchor_then_edit_records_the_anchor_and_the_dropped_edits(tmp_path: Path, llama_dir: Path) -> None:
    sets = [a for s in [*TINY_SETS, f"layers=[{LAYER}]"] for a in ("--set", s)]
    train = write_requests(tmp_path / "train.jsonl", FACTS * 3)
    requests = write_requests(tmp_path / "r.jsonl", FACTS)
    summary = _cli("anchor", llama_dir, "--method", "rome", *sets, "--records", train, "--count", 4,
                   "-o", tmp_path / "a.safetensors")
    anchor = Anchor.load(tmp_path / "a.safetensors")
    assert summary["n"] == 4 == len(anchor.norms) and summary["anchor"] == pytest.approx(anchor.value)
    assert anchor.layer == LAYER and anchor.method == "rome" and len(set(anchor.settings["indices"])) == 4
    edited = _cli("edit", llama_dir, "--requests", requests, "--method", "rome", *sets, "--nas",
                  tmp_path / "a.safetensors", "-o", tmp_path / "d.safetensors")
    op = Delta.load(tmp_path / "d.safetensors").history[0]
    assert op["nas"]["anchor"] == pytest.approx(anchor.value) and op["nas"]["drop_at"] == 5.0
    assert op["nas_dropped"] == edited["nas_dropped_records"]

    # An anchor far below every target drops every edit: each is recorded and changes nothing.
    tiny = Anchor(torch.tensor([1e-6]), LAYER, anchor.weight, anchor.fingerprint, "rome", {})
    tiny.save(tmp_path / "tiny.safetensors")
    result = runner.invoke(app, ["edit", str(llama_dir), "--requests", str(requests), "--method", "rome", *sets,
                                 "--nas", str(tmp_path / "tiny.safetensors"), "-o", str(tmp_path / "none.safetensors")])
    assert "NAS dropped the change of record 0" in result.output
    none = Delta.load(tmp_path / "none.safetensors")
    assert none.history[0]["nas_dropped"] == [0, 1, 2]
    (entry,) = none.entries.values()
    assert float(entry.stored_update(torch.float64).abs().max()) == 0.0


@pytest.mark.parametrize("args, words", [
    (["--method", "ultraedit"], "--nas applies to the editors that optimise a target value"),
    (["--method", "rome", "--set", "layers=[2]"], "not rome at layer 2"),
])
def test_bad_anchors_are_one_line_and_nothing_is_written(tmp_path: Path, llama_dir: Path, args: list[str],
                                                         words: str) -> None:
    base = Checkpoint(llama_dir)
    weight = f"model.layers.{LAYER}.mlp.down_proj.weight"
    Anchor(torch.tensor([1.0, 2.0]), LAYER, weight, base.fingerprint(weight), "rome", {}).save(tmp_path / "a.st")
    requests = write_requests(tmp_path / "r.jsonl", FACTS)
    out = tmp_path / "d.safetensors"
    result = runner.invoke(app, ["edit", str(llama_dir), "--requests", str(requests), *args,
                                 "--set", "v_num_grad_steps=1", "--nas", str(tmp_path / "a.st"), "-o", str(out)])
    assert result.exit_code == 1 and not out.exists(), result.output
    assert words in result.output.strip().splitlines()[-1] and "Traceback" not in result.output


def test_anchor_refuses_editors_without_target_values(tmp_path: Path, llama_dir: Path) -> None:
    train = write_requests(tmp_path / "train.jsonl", FACTS)
    result = runner.invoke(app, ["anchor", str(llama_dir), "--method", "ultraedit", "--records", str(train),
                                 "-o", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 1 and "not ultraedit" in result.output
    assert not (tmp_path / "a.safetensors").exists()
