"""Shared test setup: CPU-only, small threads, GPTQModel's worker-pool env set before its import."""
import os
import pathlib

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# GPTQModel's TORCH kernel torch.compiles its dequant on first use (~20 s per model on CPU);
# the tests check values, not compiled speed.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# Test models are tiny: one intra-op thread avoids oversubscription on 2-core CI (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[1]
STORIES260K = REPO / "effqat_plugin" / "assets" / "stories260k"


@pytest.fixture(scope="session")
def stories260k_dir() -> pathlib.Path:
    """The bundled real 260K-parameter Llama (read-only; copy before writing next to it)."""
    return STORIES260K
