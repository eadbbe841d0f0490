"""Process-level settings GPTQModel needs before its first import.

GPTQModel 7.7 asks for a 2-worker CPU pool at import time and fails on machines with <= 2 cores
unless ``GPTQMODEL_CPU_WORKERS`` is set first; users should not have to know that.
"""
from __future__ import annotations

import os


def prepare_runtime_env() -> None:
    cores = os.cpu_count() or 1
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, cores)))
    # Writing offload temp paths into saved metadata is noise for our checkpoints.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
