"""`effqat sample MODEL OUT --n N --seq-len T`: a run's self-generated samples, drawn once, reused.

The samples do not depend on the bit width or group size, and drawing them is the one step of the
default recipe that needs the whole fp model; this command draws them with the sampler and the seed
rule ``effqat quantize`` uses (``model_sampler.draw``, seed ``eqat_run.self_generated_seed(--seed)``),
so ``quantize --seed S --self-generated-from OUT`` trains exactly as ``quantize --seed S
--self-generated N`` would, for any number of quantizations, or on a machine where the model does
not fit (sample it on one where it does).
"""
from __future__ import annotations

import argparse
import json
import os

from .quantize import DEFAULT_SEQ_LEN, local_model_dir, positive_int

USES_GPTQMODEL = False  # the CLI then skips importing GPTQModel at start-up (see env.quiet_third_party_logs)


def gib(text: str) -> int:
    """argparse type: a positive size in GiB, as bytes."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a size in GiB > 0, got {text!r}")
    return int(value * 2**30)


def add_parser(sub) -> None:
    from effqat_plugin.model_sampler import DTYPE_CHOICES

    p = sub.add_parser("sample", help="draw the self-generated samples quantize trains on, into a file "
                                      "for --self-generated-from", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="fp HF model folder or hub id")
    p.add_argument("out", help="output .safetensors file (must not exist unless --overwrite)")
    p.add_argument("--n", type=positive_int, required=True, help="sequences to draw")
    p.add_argument("--seq-len", type=positive_int, default=DEFAULT_SEQ_LEN,
                   help="tokens per sequence: the --seq-len of the runs that will use the file")
    p.add_argument("--seed", type=int, default=0,
                   help="the --seed of the runs that will use the file (drawn with its seed + 2, as quantize does)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto: the checkpoint's own dtype on CUDA, float32 on CPU (as quantize's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--max-memory", type=gib, default=None, metavar="GIB",
                   help="memory the model may use on the device (default: 90%% of the free device memory, "
                        "half the free host memory on CPU); the rest is offloaded by accelerate")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from effqat_plugin import __version__
    from effqat_plugin.eqat_run import self_generated_seed
    from effqat_plugin.model_sampler import draw, plan_placement, vocab_size_of
    from effqat_plugin.runtime import resolve_runtime
    from effqat_plugin.sample_file import write_sample_file

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"{args.out}: the output must be a .safetensors file")
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"output file {args.out} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder of the output file not found: {folder}")
    model_dir = local_model_dir(args.model)
    device = resolve_runtime(args.device).device
    placement = plan_placement(model_dir, args.n, args.seq_len, device, args.dtype, args.max_memory)
    ids, record = draw(model_dir, args.n, args.seq_len, self_generated_seed(args.seed), placement,
                       offload_root=folder)
    metadata = {"model": args.model, "vocab_size": vocab_size_of(model_dir), "seed": args.seed, "sampler_seed": record["seed"],
                "dtype": record["dtype"], "placement": record["placement"], "device": record["device"],
                "sampler": f"effqat:{__version__} data.sample_from_model, from BOS at temperature 1"}
    digest = write_sample_file(args.out, ids, metadata, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "samples": list(ids.shape), "sha256": digest, **record}))
    return 0
