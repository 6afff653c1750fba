"""Perplexity with the output layer applied in chunks: the same value as from full logits, bounded memory."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import CORPUS, build_tiny_model, tiny_tokenizer

from prunecli.evaluation import perplexity
from prunecli.evaluation.perplexity import evaluate_perplexity, sliding_windows


def _reference(model, ids: list[int], window: int, stride: int) -> float:
    """exp(mean NLL) from the model's full logits, one window per forward pass."""
    nll = []
    with torch.no_grad():
        for w in sliding_windows(len(ids), window, stride):
            logits = model(input_ids=torch.tensor([ids[w.begin:w.end]])).logits[0]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            for t in range(w.first_scored, w.end):
                nll.append(-float(logprobs[t - 1 - w.begin, ids[t]]))
    return math.exp(sum(nll) / len(nll))


def _gemma3_softcapped():  # a tiny Gemma-3 with final logit soft-capping (the output layer does more than lm_head)
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                           sliding_window=16, final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=0,
                           eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("make", [lambda: build_tiny_model("llama"), lambda: build_tiny_model("gpt2"),
                                  _gemma3_softcapped], ids=["llama", "gpt2", "gemma3-softcap"])
def test_chunked_equals_full_logits(make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make()
    text = tmp_path / "t.txt"
    text.write_text(" ".join(CORPUS))
    ids = list(tiny_tokenizer()(text.read_text())["input_ids"])[:300]
    monkeypatch.setattr(perplexity, "LOGIT_BYTES", 12 * len(tiny_tokenizer()) * 7)  # 7 positions per chunk
    got = evaluate_perplexity(model, tiny_tokenizer(), text, window=64, stride=40, max_tokens=300, batch_size=3)
    value = got.groups[0].metrics["perplexity"].value
    assert value == pytest.approx(_reference(model, ids, 64, 40), rel=1e-6)


def test_unknown_output_transform_falls_back_to_full_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose logits we do not reproduce (a soft-cap the config does not announce) is still scored right."""
    model = _gemma3_softcapped()
    text = tmp_path / "t.txt"
    text.write_text(" ".join(CORPUS))
    ids = list(tiny_tokenizer()(text.read_text())["input_ids"])[:200]
    reference = _reference(model, ids, 64, 40)
    monkeypatch.setattr(perplexity.OutputHead, "__call__",
                        lambda self, hidden: self.head(hidden).float())  # our head forgets the cap
    got = evaluate_perplexity(model, tiny_tokenizer(), text, window=64, stride=40, max_tokens=200)
    assert got.groups[0].metrics["perplexity"].value == pytest.approx(reference, rel=1e-6)


@pytest.mark.slow
def test_large_vocabulary_memory_is_bounded(tmp_path: Path) -> None:
    """A 262k-vocabulary model: 4,096 tokens need 4.3 GB of fp32 logits at once; chunked scoring stays far below.

    The figure is the scoring's own: the child's peak RSS (`VmHWM`, which, unlike `ru_maxrss`, is not inherited from
    the pytest worker that started it) is reset after the model is built, so only what scoring adds is measured.
    """
    script = textwrap.dedent("""
        import re, sys, torch
        from pathlib import Path
        from transformers import AutoModelForCausalLM, LlamaConfig
        from prunecli.evaluation.perplexity import evaluate_perplexity

        def mib(field):
            return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024

        torch.set_num_threads(1)
        cfg = LlamaConfig(vocab_size=262144, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                          tie_word_embeddings=True)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        class Ids:
            def __call__(self, text):
                return {"input_ids": [int(x) * 37 % 262144 for x in text.split()]}
        path = Path(sys.argv[1])
        path.write_text(" ".join(str(i) for i in range(4096)))
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, from here on the scoring's peak
        before = mib("VmRSS")
        evaluate_perplexity(model, Ids(), path, window=1024, stride=768)
        print(mib("VmHWM") - before)
    """)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.txt")], capture_output=True, text=True,
                         check=True)
    grown_mib = int(out.stdout.split()[-1])
    # One batch of full fp32 logits alone is 4,096 MiB (1,024 positions x 262,144 words x 4 bytes); chunked
    # scoring adds about 560 MiB (two 256 MiB chunks: fp32 logits and their float64 log-softmax).
    assert grown_mib < 2048, f"scoring raised the peak RSS by {grown_mib} MiB"
