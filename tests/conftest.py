"""Shared fixtures: tiny random checkpoints of each family, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

# Tiny-model tests drown in thread start-up on a 2-core machine (the fast suite ran 5x faster on one thread), so the
# suite runs single-threaded; subprocesses inherit the variables. Slow real-model tests may raise it for themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("PRUNECLI_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("ckpt") / "gpt2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("ckpt") / "qwen2")


@pytest.fixture(scope="session")
def llama_sharded_bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    return save_tiny_model("llama", tmp_path_factory.mktemp("ckpt") / "llama-sharded", dtype=torch.bfloat16,
                           shard_size="20KB")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


# The longest test files, longest first (measured on 2 cores: the study's smoke run ~200 s, the help examples ~170 s,
# the SmolLM2 editing acceptance ~190 s in all); other slow tests follow in file order.
LONGEST_FIRST = ("test_study.py", "test_help_examples.py", "test_editing_smollm2.py", "test_editing_gemma3.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, the longest at the very front: with one process per core (`-n auto`, pending tests stolen by
    idle workers: pyproject's `--dist worksteal`), a long test that starts last would run alone at the end while the
    other cores idle."""
    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        return (0 if item.get_closest_marker("slow") else 1,
                LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST))

    items.sort(key=rank)
