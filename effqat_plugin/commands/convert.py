"""``effqat convert SRC DST --to gptq|gptq_v2|bitblas|eqat|awq|compressed-tensors|gguf``: convert quantized checkpoints."""
from __future__ import annotations

import json
import logging

GGUF_TENSOR_TYPES = ("f16", "bf16", "f32", "q8_0")  # = converters.gguf_export.TENSOR_TYPES (not imported at start-up)
USES_GPTQMODEL = False  # the CLI then skips importing GPTQModel at start-up (see env.quiet_third_party_logs)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert",
        help="convert a quantized checkpoint (EQAT, GPTQ v1/v2, BitBLAS, AWQ, compressed-tensors) to another format",
        description="Convert an original EfficientQAT folder, a GPTQ v1/v2 folder or a BitBLAS folder "
                    "to another format, bit-exactly. The source format is detected from its tensors "
                    "and quantize_config.json.")
    p.add_argument("src", help="source folder (safetensors)")
    p.add_argument("dst", help="destination folder, or a .gguf file with --to gguf (must not exist "
                               "unless --overwrite)")
    p.add_argument("--to", required=True, choices=["gptq", "gptq_v2", "bitblas", "eqat", "awq", "compressed-tensors", "gguf"],
                   help="target format; compressed-tensors = pack-quantized asymmetric group, the layout vLLM "
                        "serves asymmetric weights from (in_features must be a multiple of the group); gguf = one llama.cpp file made by llama.cpp's converter, quantized "
                        "linears lossless (2/3-bit Q4_0, 4-bit Q5_0, 8-bit Q8_0)")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=None,
                   help="bits, when neither the folder config, the tensor shapes nor the folder name tell")
    p.add_argument("--group-size", type=int, default=None, help="group size (same rule as --bits)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--dry-run", action="store_true", help="check and report; write nothing")
    p.add_argument("--max-shard-size", default="4GB", help="output shard size cap (default 4GB)")
    p.add_argument("--v1-zeros", choices=["auto", "word", "field"], default="auto",
                   help="how to read GPTQ v1 zero points: auto (by meta.quantizer), word (GPTQModel's "
                        "word-wide convention), field (per-field, AutoGPTQ)")
    p.add_argument("--v1-encoding", choices=["signflip", "plain"], default="signflip",
                   help="how --to gptq stores zero points of 0: signflip (default: groups with zero 0 "
                        "are stored as (maxq-W, maxq, -s), same weights, read alike by GPTQModel and "
                        "per-field readers such as AutoGPTQ/exllama/vLLM) or plain (GPTQModel's word-wide "
                        "'zero - 1', which per-field readers misread)")
    p.add_argument("--embedding-type", choices=GGUF_TENSOR_TYPES, default="f16",
                   help="--to gguf: type of token_embd (default f16)")
    p.add_argument("--output-type", choices=GGUF_TENSOR_TYPES, default="f16",
                   help="--to gguf: type of the output head (default f16)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from effqat_plugin.converters import convert

    rep = convert(args.src, args.dst, to=args.to, bits=args.bits, group_size=args.group_size,
                  overwrite=args.overwrite, dry_run=args.dry_run, max_shard_size=args.max_shard_size,
                  v1_zeros=args.v1_zeros, v1_encoding=args.v1_encoding,
                  gguf_options={"embedding_type": args.embedding_type, "output_type": args.output_type})
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    if rep["target_format"] == "gguf":
        return _print_gguf(rep)
    what = "would convert" if rep.get("dry_run") else "converted"
    print(f"{what} {rep['source']} ({rep['source_format']}, w{rep['bits']}g{rep['group_size']}, "
          f"from {rep.get('inferred_from') or 'config'}) -> {rep['destination']} ({rep['target_format']}): "
          f"{rep['modules']} quantized modules")
    if rep["wider_modules"]:
        print(f"  {len(rep['wider_modules'])} module(s) stored wider (lossless) for the runtime: "
              f"+{rep['wider_extra_bytes']} bytes: {', '.join(sorted(rep['wider_modules']))}")
    if rep["target_format"] == "gptq" and rep["v1_borrow_fields"]:
        print(f"  v1 zero points: {rep['v1_borrow_fields']} of {rep['v1_total_fields']} fields borrow "
              "(GPTQModel reads them exactly; vLLM/exllama per-field readers would not) - drop --v1-encoding plain")
    if not rep.get("dry_run"):
        mb = rep["bytes_written"] / 1e6
        print(f"  wrote {len(rep['files'])} shard(s), {mb:.1f} MB in {rep['seconds']:.1f} s")
    return 0


def _print_gguf(rep: dict) -> int:
    what = "would convert" if rep.get("dry_run") else "converted"
    print(f"{what} {rep['source']} ({rep['source_format']}, w{rep['bits']}g{rep['group_size']}, "
          f"{rep['architecture']} -> llama.cpp {rep['gguf_arch']}) -> {rep['destination']}: "
          f"{rep['modules']} quantized modules")
    if rep.get("dry_run"):
        return 0
    types = ", ".join(f"{n} {t}" for t, n in sorted(rep["tensor_types"].items()))
    print(f"  quantized tensors (lossless): {types}")
    if rep["f32_fallback"]:
        print(f"  WARNING: {len(rep['f32_fallback'])} quantized tensor(s) fit no GGUF block type and were "
              f"written as F32 of their exact weights (larger file): {', '.join(rep['f32_fallback'])}")
    for name, t in (rep.get("type_fallback") or {}).items():
        print(f"  WARNING: {name} written as {t['written']}, not the asked {t['asked']} (rows not a multiple of 32)")
    print(f"  token_embd {rep['embedding_type']}, output {rep['output_type'] or 'tied to token_embd'}; "
          f"wrote {rep['bytes_written'] / 1e6:.1f} MB in {rep['seconds']:.1f} s")
    return 0
