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


_QUIET = False


def third_party_stdout():
    """Context for calls into GPTQModel that ``print`` (e.g. ``from_quantized``): swallows their stdout
    once :func:`quiet_third_party_logs` ran, passes it through otherwise (``--verbose``, library use)."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO()) if _QUIET else contextlib.nullcontext()


def quiet_third_party_logs(imports_gptqmodel: bool = True) -> None:
    """Keep GPTQModel's banner / INFO lines and torch's import-time warnings out of effqat's output
    (``effqat ... --verbose`` skips this). Call before gptqmodel is imported: its start-up banner is
    logged at import. Errors still show; effqat's own ``effqat.*`` loggers are untouched.
    ``imports_gptqmodel=False`` (commands that never use it: convert, plan) skips importing it here
    just to swallow its import-time prints, which costs seconds of start-up."""
    import contextlib
    import io
    import logging

    global _QUIET
    _QUIET = True
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # logbar prints a blank line at import
            from logbar import LogBar  # GPTQModel's logger (a logging.Logger subclass writing to stdout)

        LogBar.shared().setLevel(logging.ERROR)
    except ImportError:  # pragma: no cover - gptqmodel always brings logbar
        pass
    import torch  # noqa: F401  (its logging setup runs at import; adjust levels afterwards)

    # gguf / hf-to-gguf: llama.cpp's converter logs every tensor and vocab step at INFO (effqat
    # convert --to gguf prints its own summary)
    for name in ("gguf", "hf-to-gguf", "torch", "torch.utils._pytree", "torch.utils.cpp_extension", "transformers", "accelerate",
                 "auto_round", "tokenicer", "tokenicer.tokenicer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # "generated new fontManager" (INFO, once per fresh matplotlib cache) when a report is plotted
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import warnings

    # transformers 5.x deprecation notice for the KV-cache argument name (raised inside torch's Module call)
    warnings.filterwarnings("ignore", message=r".*past_key_values.* is deprecated", category=FutureWarning)
    if imports_gptqmodel:
        with contextlib.redirect_stdout(io.StringIO()):  # stray prints during GPTQModel's import
            import gptqmodel  # noqa: F401
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
