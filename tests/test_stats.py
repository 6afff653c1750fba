"""Key statistics: one forward pass for all layers, padding excluded, token budget, validated reuse, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import CORPUS
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.editors import corpus
from prunecli.editors.stats import KeyStats, accumulate, collect_key_stats, load_moments
from prunecli.errors import PruneCliError
from prunecli.models.adapters import resolve_adapter
from prunecli.models.loading import load_model

TEXT = "\n\n".join(CORPUS[:5]) + "\n"


def _chunks(tokenizer, budget=10_000, seq_len=16):
    return list(corpus.token_chunks(tokenizer, CORPUS[:5], seq_len, budget))


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
def test_moments_equal_a_direct_per_sequence_computation(request, fixture):
    model, tok, _ = load_model(request.getfixturevalue(fixture))
    adapter = resolve_adapter(model)
    chunks = _chunks(tok)
    assert len({len(c) for c in chunks}) > 1  # batches below are padded
    sums, counts = accumulate(model, tok, adapter, [0, 2], chunks, batch_size=3)
    for layer in (0, 2):
        reference = torch.zeros(adapter.key_size(layer), adapter.key_size(layer), dtype=torch.float64)
        seen = []
        handle = adapter.projection(layer).register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0][0]))
        with torch.no_grad():
            for c in chunks:  # one unpadded sequence at a time
                model(input_ids=torch.tensor([c]))
        handle.remove()
        for keys in seen:
            reference += keys.double().T @ keys.double()
        assert counts[layer] == sum(len(c) for c in chunks)
        torch.testing.assert_close(sums[layer], reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_one_forward_pass_per_batch_and_stops_after_the_deepest_layer(llama_dir):
    model, tok, _ = load_model(llama_dir)
    adapter = resolve_adapter(model)
    chunks = _chunks(tok)
    calls, deep = [], []
    h1 = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)
    h2 = adapter.layer_module(3).register_forward_pre_hook(lambda m, args: deep.append(1))
    accumulate(model, tok, adapter, [0, 1, 2], chunks, batch_size=4)
    h1.remove()
    h2.remove()
    assert len(calls) == -(-len(chunks) // 4)
    assert deep == []  # layer 3 was never computed


def test_token_budget_is_exact(llama_dir):
    _, tok, _ = load_model(llama_dir)
    chunks = list(corpus.token_chunks(tok, CORPUS, seq_len=16, budget=50))
    assert sum(len(c) for c in chunks) == 50 and max(len(c) for c in chunks) <= 16


def test_text_file_paragraphs_and_local_dataset(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a b\nc\n\n\n d e \n")
    assert list(corpus.text_file(f).texts) == ["a b c", "d e"]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"id": i, "body": f"text {i}"}) for i in range(3)) + "\n")
    ds = corpus.dataset(str(j), column="body")
    assert list(ds.texts) == ["text 0", "text 1", "text 2"] and ds.description.endswith(":train:body")
    assert list(corpus.dataset(str(j)).texts) == ["text 0", "text 1", "text 2"]  # the only string column
    with pytest.raises(PruneCliError, match="no column 'nope'"):
        list(corpus.dataset(str(j), column="nope").texts)


def _stats(path, fixture_dir, layers=(0, 1)):
    model, tok, base = load_model(fixture_dir)
    adapter = resolve_adapter(model)
    stats = collect_key_stats(model, tok, base, adapter, layers, _chunks(tok), "test corpus", batch_size=4)
    stats.save(path)
    return model, base, adapter, stats


def test_save_load_and_validated_moments(tmp_path, llama_dir, gpt2_dir):
    path = tmp_path / "s.safetensors"
    _, base, adapter, stats = _stats(path, llama_dir)
    loaded = KeyStats.load(path)
    assert loaded.corpus == "test corpus" and loaded.dtype == "float64" and loaded.tokens == stats.tokens
    assert loaded.layers[1]["module"] == "model.layers.1.mlp.down_proj"
    moments = load_moments(KeyStats.load(path), base, adapter, [1])
    torch.testing.assert_close(moments[1], stats.sums[1] / stats.counts[1])
    with pytest.raises(PruneCliError, match="cover layers \\[0, 1\\], not layer 3"):
        load_moments(KeyStats.load(path), base, adapter, [3])
    # Statistics of the llama model used for another (same-shaped keys would not help: fingerprints differ).
    _, other_base, other_adapter, _ = _stats(tmp_path / "g.safetensors", gpt2_dir)
    with pytest.raises(PruneCliError, match="computed on another model"):
        load_moments(KeyStats.load(path), other_base, other_adapter, [1])


def test_not_a_stats_file(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(f))
    with pytest.raises(PruneCliError, match="not a prunecli statistics file"):
        KeyStats.load(f)


runner = CliRunner()


def test_cli_stats_json_and_refusals(tmp_path, llama_dir):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out = tmp_path / "s.safetensors"
    args = ["stats", str(llama_dir), "--layers", "0,2", "--text", str(text), "--tokens", "60", "--seq-len", "16",
            "-o", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == [0, 2] and summary["tokens"] == 60 and summary["dtype"] == "float64"
    assert summary["modules"] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert summary["tokens_per_second"] > 0 and out.is_file()
    again = runner.invoke(app, args)  # output exists
    assert again.exit_code == 1 and "already exists" in again.stderr
    for bad, message in [(["--layers", "9"], "out of range"), (["--method", "rome", "--layers", "1"], "exactly one"),
                         (["--layers", "1", "--accum-dtype", "float16"], "--accum-dtype must be"),
                         (["--layers", "1", "--dtype", "float64"],
                          "the dtype of the accumulated sums is --accum-dtype")]:
        target = tmp_path / "bad.safetensors"
        r = runner.invoke(app, ["stats", str(llama_dir), *bad, "--text", str(text), "-o", str(target)])
        assert r.exit_code == 1 and message in r.stderr and not target.exists(), r.output


def test_cli_stats_method_layers_and_float32(tmp_path, gpt2_dir):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out = tmp_path / "s.safetensors"
    result = runner.invoke(app, ["stats", str(gpt2_dir), "--method", "memit", "--text", str(text), "--tokens", "40",
                                 "--accum-dtype", "float32", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    from prunecli.editors.registry import default_values

    assert json.loads(result.stdout)["layers"] == default_values("memit", "gpt2", 4)["layers"]
    assert KeyStats.load(out).dtype == "float32"
