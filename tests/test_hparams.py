"""Hyper-parameters: packaged defaults per family and depth, EasyEdit files, --set overrides, validation."""

from __future__ import annotations

import json

import pytest

from prunecli.editors.hparams import parse_set
from prunecli.editors.registry import default_values, resolve_hparams
from prunecli.errors import PruneCliError


def test_known_depths_use_published_layers():
    assert default_values("rome", "gpt2", 48)["layers"] == [17]
    assert default_values("memit", "gpt2", 48)["layers"] == [13, 14, 15, 16, 17]
    assert default_values("rome", "llama", 32)["layers"] == [5]


def test_small_model_defaults():
    """SmolLM2-135M (30 layers) keeps the published MEMIT; Gemma-3-270M (18) preserves earlier edits' keys and retries
    edits that did not take (chosen on CounterFact records 200-249 and 300-349, see memit.yaml)."""
    smollm2 = resolve_hparams("memit", "llama", 30)
    assert smollm2.layers == (3, 4, 5, 6, 7) and smollm2.mom2_update_weight == 2000
    assert smollm2.prior_edit_weight is None
    gemma3 = resolve_hparams("memit", "llama", 18)
    assert gemma3.layers == (1, 2, 3, 4, 5) and gemma3.mom2_update_weight == 500 and gemma3.prior_edit_weight == 10
    assert gemma3.retry_rounds == 1 and smollm2.retry_rounds is None


def test_other_depths_follow_the_fraction_rule():
    # ROME: round(0.2 x (L - 1)); MEMIT/AlphaEdit: 5 consecutive layers ending at round(0.25 x (L - 1)), cut at 0.
    rome = default_values("rome", "llama", 4)["layers"]
    memit = default_values("memit", "llama", 4)["layers"]
    assert len(rome) == 1 and 0 <= rome[0] < 4
    assert memit == list(range(memit[0], memit[-1] + 1)) and memit[-1] < 4  # consecutive, in range
    assert len(default_values("memit", "gpt2", 24)["layers"]) == 5
    assert rome == [1] and memit == [0, 1]  # round(0.6) = 1; round(0.75) = 1, only layers 0-1 exist below it
    assert default_values("rome", "gpt2", 24)["layers"] == [5]  # round(4.6)
    assert default_values("memit", "gpt2", 24)["layers"] == [2, 3, 4, 5, 6]  # ending at round(5.75) = 6
    assert default_values("alphaedit", "llama", 4)["layers"] == [0, 1]


def test_easyedit_file_with_yaml11_floats(tmp_path):
    f = tmp_path / "rome.yaml"
    f.write_text("alg_name: ROME\nmodel_name: gpt2-xl\nlayers: [2]\nfact_token: subject_last\nv_num_grad_steps: 20\n"
                 "v_lr: 5e-1\nv_loss_layer: 3\nv_weight_decay: 1e-3\nclamp_norm_factor: 4\nkl_factor: 0.0625\n"
                 "mom2_adjustment: false\ncontext_template_length_params: [[5, 10], [10, 10]]\n"
                 "rewrite_module_tmp: 'transformer.h.{}.mlp.c_proj'\nstats_dir: ./data/stats\n")
    notes = []
    hp = resolve_hparams("rome", "gpt2", 4, f, on_note=notes.append)
    assert hp.v_lr == 0.5 and isinstance(hp.v_lr, float)
    assert hp.v_weight_decay == 1e-3 and hp.layers == (2,) and hp.mom2_adjustment is False
    assert hp.context_template_length_params == ((5, 10), (10, 10))
    assert "rewrite_module_tmp" in notes[0] and "stats_dir" in notes[0]


def test_json_file_and_set_overrides(tmp_path):
    f = tmp_path / "h.json"
    f.write_text(json.dumps({"layers": [1, 2], "mom2_update_weight": 100}))
    hp = resolve_hparams("memit", "llama", 4, f, ["mom2_update_weight=5e3", "layers=0-2", "kl_factor=0"])
    assert hp.layers == (0, 1, 2) and hp.mom2_update_weight == 5000.0 and hp.kl_factor == 0.0
    assert resolve_hparams("memit", "llama", 4, sets=["layers=[1,3]"]).layers == (1, 3)
    assert resolve_hparams("memit", "llama", 4, sets=["layers=1,2"]).layers == (1, 2)


@pytest.mark.parametrize("sets, message", [
    (["bogus=1"], "unknown hyper-parameter 'bogus'"),
    (["layers=[1,2]"], "ROME edits exactly one layer"),
    (["layers=9"], "out of range: the model has 4 layers"),
    (["v_lr=fast"], "hyper-parameter v_lr"),
    (["mom2_adjustment=maybe"], "expected true or false"),
    (["v_num_grad_steps=0"], "v_num_grad_steps=0"),
    (["fact_token=last"], "fact_token 'last' is not supported"),
    (["noequals"], "key=value"),
])
def test_bad_values_are_clear_errors(sets, message):
    with pytest.raises(PruneCliError, match=message):
        resolve_hparams("rome", "llama", 4, sets=sets)


def test_file_for_another_method_is_refused(tmp_path):
    f = tmp_path / "memit.yaml"
    f.write_text("alg_name: MEMIT\nlayers: [1, 2]\n")
    with pytest.raises(PruneCliError, match="MEMIT hyper-parameters, but the method is rome"):
        resolve_hparams("rome", "llama", 4, f)


def test_unknown_method_and_one_without_hyper_parameters():
    with pytest.raises(PruneCliError, match="unknown editing method 'rosie'"):
        default_values("rosie", "llama", 4)
    with pytest.raises(PruneCliError, match="mend has no hyper-parameters of its own"):
        default_values("mend", "llama", 4)


def test_parse_set_reads_yaml_values():
    assert parse_set(["a=1", "b=[1, 2]", "c=false", "d=5e-1"]) == {"a": 1, "b": [1, 2], "c": False, "d": "5e-1"}
