"""Shared fixtures: the tiny preset, written once per test session into a temporary folder."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402

SAMPLE = ROOT / "sample"
# published Qwen2-Audio predictions and the reference scripts' numbers on them (tests/data/.../README.md)
PREDICTIONS = ROOT / "tests" / "data" / "llaso-eval-predictions"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A copy of the tiny preset's random Whisper + Llama and tokenizer (same loading code as the real ones)."""
    return Path(shutil.copytree(M.TINY, tmp_path_factory.mktemp("preset") / "tiny"))


@pytest.fixture(scope="session")
def tiny_config(tiny_dir) -> M.ModelConfig:
    return M.ModelConfig(encoder=str(tiny_dir / "encoder"), llm=str(tiny_dir / "llm"))


@pytest.fixture
def make_tiny(tiny_config):
    """A fresh tiny model (projector drawn from `seed`); tests may train or modify it freely."""

    def make(seed: int = 0) -> M.LLaSO:
        torch.manual_seed(seed)
        return M.LLaSO.from_parts(tiny_config)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """On a busy 2-core machine two intra-op threads stall on every small op (the generation tests took 18 s instead
    of 2 s); one thread never does. Modules that run many small ops in-process use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
