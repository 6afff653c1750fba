"""Find, load and check the tokenizer of a model: its own folder's, or the one `--tokenizer` names.

Folders holding only `config.json` + weights are common (`save_pretrained` of the model alone, training checkpoints,
merges). transformers 5 does not fail on them: for GPT-2 it returns an *empty* tokenizer (vocabulary of 1) that
encodes every text to nothing, and every later step then fails with a message about something else ("target
tokenizes to nothing", "fewer than 2 tokens", a reshape error). A tokenizer of another model fails later still, as an
IndexError in the embedding. So every command checks the tokenizer once, right after loading: it must encode ordinary
text, and its largest id must be below the model's embedding rows (fewer ids than rows, as with padded vocabularies,
is fine).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecli.errors import PruneCliError
from prunecli.models.builtin import BUILTIN_MODELS, resolve_model_path

TOKENIZER_FILES_HINT = "tokenizer.json, tokenizer.model or vocab.json + merges.txt"
TOKENIZER_FILE_NAMES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.tiktoken",
    "chat_template.jinja", "chat_template.json"})
"""Files `save_pretrained` of a tokenizer may write: the ones `apply --tokenizer` replaces in the output."""
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
                     "tokenizer.tiktoken")
SAMPLE_TEXT = "The Eiffel Tower is located in Paris, the capital of France."
"""Ordinary text every usable tokenizer of a language model encodes to known tokens."""


@dataclass(frozen=True)
class TokenizerSource:
    """Where a tokenizer comes from: the model's own folder, or what `--tokenizer` named (a folder, a tokenizer.json
    file, or a built-in model name resolved to its folder)."""

    path: Path
    given: str | None = None
    """The `--tokenizer` value as typed; None for the model's own folder."""

    def describe(self) -> str:
        if self.given is None:
            return str(self.path)
        return f"--tokenizer {self.given}" + ("" if str(self.path) == self.given else f" ({self.path})")

    def missing(self) -> PruneCliError:
        """The one line for a source without a usable vocabulary, naming the fix."""
        if self.given is None:
            return PruneCliError(f"{self.path} has no tokenizer files ({TOKENIZER_FILES_HINT}): copy them from the "
                                 "original model or pass --tokenizer")
        return PruneCliError(f"{self.describe()} has no tokenizer files ({TOKENIZER_FILES_HINT}): give a folder "
                             f"holding them, a tokenizer.json file or a built-in model name "
                             f"({', '.join(BUILTIN_MODELS)})")


def has_vocabulary_files(folder: Path) -> bool:
    """Whether a folder holds a file a tokenizer's vocabulary can be built from."""
    return (any((folder / name).is_file() for name in _VOCABULARY_FILES)
            or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()))


def tokenizer_source(model_path: Path, tokenizer: str | Path | None = None) -> TokenizerSource:
    """The model folder itself without `tokenizer`; else the folder, file or built-in model it names."""
    if tokenizer is None:
        return TokenizerSource(Path(model_path))
    given = str(tokenizer)
    path = resolve_model_path(given)
    if not path.exists():
        raise PruneCliError(f"--tokenizer {given}: no such folder or file, and not a built-in model name "
                            f"({', '.join(BUILTIN_MODELS)})")
    return TokenizerSource(path, given)


def load_tokenizer(source: TokenizerSource) -> Any:
    """Load the tokenizer and check that it encodes ordinary text: one clear line otherwise."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = source.path
    if path.is_file() and path.suffix != ".json":
        raise PruneCliError(f"{source.describe()}: a tokenizer file must be a tokenizers JSON file (tokenizer.json); "
                            "for tokenizer.model or vocab.json + merges.txt give their folder")
    try:
        if path.is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here; each is reported below
        # transformers raises for some architectures (LLaMA: "Couldn't instantiate the backend tokenizer") when the
        # folder has no vocabulary; that is the missing-files case, not a transformers problem.
        if path.is_dir() and not has_vocabulary_files(path):
            raise source.missing() from None
        raise PruneCliError(f"cannot load the tokenizer of {source.describe()}: {exc}") from None
    ids = tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    if not any(i != tok.unk_token_id for i in ids):
        if path.is_dir() and not has_vocabulary_files(path):
            raise source.missing()
        raise PruneCliError(f"the tokenizer of {source.describe()} cannot encode ordinary text ({SAMPLE_TEXT!r} "
                            f"gives {'no tokens' if not ids else 'only unknown tokens'}): pass a working one with "
                            "--tokenizer")
    return tok


def largest_id(tokenizer: Any) -> int:
    """The largest token id the tokenizer can produce (vocabulary and added tokens)."""
    return max(tokenizer.get_vocab().values())


def check_fits(tokenizer: Any, source: TokenizerSource, rows: int, model: str) -> None:
    """Every id must index an embedding row; a tokenizer smaller than the embedding (padded vocabulary) is fine."""
    top = largest_id(tokenizer)
    if top >= rows:
        raise PruneCliError(f"the tokenizer of {source.describe()} has ids up to {top} ({len(tokenizer)} tokens) but "
                            f"the model {model} has {rows} embedding rows: use the model's own tokenizer "
                            "(--tokenizer)")


def embedding_rows(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def config_vocab_size(config: dict[str, Any]) -> int | None:
    """The embedding rows a model config declares (multimodal configs keep them in `text_config`)."""
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


@contextmanager
def replacement_files(base_folder: Path, config: dict[str, Any], tokenizer: str | Path) -> Iterator[
        dict[str, Path | None]]:
    """The non-weight files that make a copy of `base_folder` carry `tokenizer` instead of its own: the base's
    tokenizer files left out, the given tokenizer's (as `save_pretrained` writes it) put in. The tokenizer is checked
    first (it must encode text and fit the embedding rows `config` declares). The files live until the block ends."""
    source = tokenizer_source(base_folder, tokenizer)
    tok = load_tokenizer(source)
    rows = config_vocab_size(config)
    if rows is not None:
        check_fits(tok, source, rows, str(base_folder))
    with tempfile.TemporaryDirectory(prefix="prunecli-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        files: dict[str, Path | None] = {p.name: None for p in base_folder.iterdir() if p.name in TOKENIZER_FILE_NAMES}
        files.update({p.name: p for p in Path(tmp).iterdir() if p.is_file()})
        yield files
