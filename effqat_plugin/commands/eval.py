"""`effqat eval MODEL_DIR --data FILE`: perplexity of an fp, EQAT, GPTQ or BitBLAS folder."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model folder on token data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--data", required=True,
                   help=".txt, .jsonl ('text'), .parquet, or .safetensors with int64 'input_ids' [N, T]")
    p.add_argument("--seq-len", type=int, default=256, help="context length for text data")
    p.add_argument("--n-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runtime", choices=["effqat", "gptqmodel"], default="effqat",
                   help="run quantized folders on effqat's kernels, or (GPTQ) through GPTQModel's TORCH backend")
    p.set_defaults(func=run)


def run(args) -> int:
    from effqat_plugin.data import load_token_file
    from effqat_plugin.evaluation import perplexity
    from effqat_plugin.loading import load_for_eval
    from effqat_plugin.runtime import resolve_runtime

    model = load_for_eval(args.model_dir, args.runtime)
    tokenizer = None
    if not args.data.endswith(".safetensors"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = load_token_file(args.data, tokenizer, seq_len=args.seq_len, n_samples=args.n_samples)
    ppl = perplexity(model, ids, args.batch_size, resolve_runtime("cpu"))
    print(json.dumps({"model": args.model_dir, "data": args.data, "samples": ids.shape[0],
                      "seq_len": ids.shape[1], "perplexity": round(ppl, 4)}))
    return 0
