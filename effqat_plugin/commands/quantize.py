"""`effqat quantize MODEL_DIR OUT_DIR`: EfficientQAT through GPTQModel, GPTQ checkpoint out."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil

DEFAULT_SAMPLES = 256
DEFAULT_SEQ_LEN = 256


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="run Block-AP + E2E-QP and save a checkpoint GPTQModel loads",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="fp16/fp32 HF model folder or hub id")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--format", dest="save_format", default="gptq",
                   choices=["gptq", "gptq_v2", "eqat", "bitblas", "compressed-tensors", "gguf"],
                   help="checkpoint layout; compressed-tensors (pack-quantized, asymmetric group) is what vLLM "
                        "serves asymmetric weights from, and needs every in_features a multiple of --group-size; "
                        "gguf: one llama.cpp file (OUT ends in .gguf) trained on llama.cpp's own block types "
                        "(--gguf-type; --bits / --group-size do not apply)")
    p.add_argument("--gguf-type", default=None, metavar="PRESET",
                   help="--format gguf: llama.cpp's preset (Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K); "
                        "each tensor gets the type llama-quantize gives it (README: llama.cpp presets)")
    p.add_argument("--no-gguf-imatrix", dest="gguf_imatrix", action="store_false",
                   help="--format gguf: start from llama.cpp's fit without the layer's importance matrix (then an "
                        "untrained run is exactly llama-quantize without --imatrix)")
    add_training_arguments(p)
    p.add_argument("--e2e-data", metavar="FILE", default=None,
                   help="E2E-QP trains on this file (same formats as --calib, --seq-len tokens per sample, "
                        "all of it) instead of the Block-AP calibration, e.g. larger or other-domain text")
    p.add_argument("--kernel", choices=["auto", "reference", "triton", "cuda"], default=None,
                   help="E2E-QP kernel backend (default: EFFQAT_KERNEL env or auto)")
    p.add_argument("--work-dir", default=None,
                   help="Block-AP progress folder (default OUT_DIR.effqat-work); a re-run of the same "
                        "command resumes after the last finished layer; removed after a successful save")
    p.add_argument("--offload-streams", metavar="DIR", default=None,
                   help="keep Block-AP's two activation streams (samples x seq_len x hidden each) in "
                        "memory-mapped files in DIR instead of RAM")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model through GPTQModel.load (fp32) instead of streaming its decoder "
                        "layers from the shards one at a time; the same result, host memory grows with the model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def add_training_arguments(p) -> None:
    """The Block-AP / E2E-QP settings `effqat quantize` and `effqat pipeline`'s quantize stage share, so
    the two commands train the same model from the same arguments and defaults."""
    p.add_argument("--bits", type=int, default=2, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true",
                   help="symmetric: every group's zero point fixed at 2^(bits-1) and never trained (Block-AP and "
                        "E2E-QP train weights / step sizes only); GPTQ output says sym: true, which GPTQModel's "
                        "and vLLM's symmetric kernels (Marlin, 4/8-bit) take")
    p.add_argument("--calib", help="calibration data: .txt, .jsonl ('text'), .parquet, or .safetensors "
                                   "with int64 'input_ids' [N, T]; default: sampled from the model itself")
    p.add_argument("--n-samples", type=int, default=DEFAULT_SAMPLES, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per calibration sequence")
    p.add_argument("--block-epochs", type=int, default=2)
    p.add_argument("--block-batch-size", type=int, default=2)
    p.add_argument("--block-quant-lr", type=float, default=None, help="Block-AP lr for s and z")
    p.add_argument("--block-weight-lr", type=float, default=None, help="Block-AP lr for weights and norms")
    p.add_argument("--block-early-stop", type=int, default=0, help="patience in epochs (0 = off)")
    p.add_argument("--block-loss", choices=["mse", "channel_rms", "token_relative"], default="mse",
                   help="Block-AP's loss against the fp layer output, also its held-out score: mse (the paper's); "
                        "channel_rms: each channel divided by its fp RMS; token_relative: each token's error "
                        "relative to its fp norm (for residual streams with a few huge dimensions)")
    p.add_argument("--e2e-epochs", type=int, default=1, help="E2E-QP epochs over the calibration data (0 = off)")
    p.add_argument("--e2e-max-auto-epochs", type=positive_int, default=4, metavar="N",
                   help="--lr-preset auto with fewer E2E-QP steps than the paper's 128: repeat the data up to N "
                        "epochs while held-out loss falls by > 1%% an epoch, keeping the one with the lowest "
                        "held-out loss (1 = never repeat)")
    p.add_argument("--self-generated", "--e2e-self-generated", type=self_generated_arg, default="auto", metavar="N|auto",
                   help="Block-AP and E2E-QP also train on N sequences the fp model writes itself (sampled once, "
                        "seed + 2, on the compute device, or offloaded by accelerate when the model does not fit). "
                        "auto: as many as the calibration's training samples when --calib is given, else 0")
    p.add_argument("--no-block-self-generated", dest="block_self_generated", action="store_false",
                   help="the self-generated samples train E2E-QP only, not Block-AP (half Block-AP's time; "
                        "on SmolLM2 w2g64 it costs 49.1 instead of 42.6 wikitext-2 ppl)")
    add_self_generated_source_arguments(p)
    p.add_argument("--e2e-lr", type=float, default=None)
    p.add_argument("--e2e-distill", type=unit_interval, default=0.0, metavar="W",
                   help="share of E2E-QP's loss that is distillation from the fp model's next-token "
                        "distribution (its top 64, kept from Block-AP) instead of the data's next tokens: "
                        "0 = the paper's loss, 1 = distillation only; needs E2E-QP to train on Block-AP's "
                        "samples (no --e2e-data, no --no-block-self-generated)")
    p.add_argument("--e2e-batch-size", type=int, default=4)
    p.add_argument("--train-zeros", action="store_true", help="E2E-QP also trains zero points")
    p.add_argument("--lr-preset", choices=["auto", "paper"], default="auto",
                   help="auto: paper rates scaled up when there are fewer steps than the paper's; paper: as published")
    add_lr_search_argument(p)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)


def add_self_generated_source_arguments(p) -> None:
    """Where the --self-generated samples come from (``effqat_plugin.self_generated``)."""
    from effqat_plugin.model_sampler import DTYPE_CHOICES

    p.add_argument("--self-generated-from", metavar="FILE", default=None,
                   help="take the self-generated samples from FILE (a .safetensors with int 'input_ids' [N, "
                        "--seq-len], e.g. from `effqat sample`) instead of sampling them; all N with auto")
    p.add_argument("--self-generated-dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype the fp model samples in (the self-generated samples, and the calibration "
                        "without --calib); auto: the checkpoint's own on CUDA, float32 on CPU")


def lr_search_fractions(text: str):
    """'0.25,0.5,1' -> (0.25, 0.5, 1.0); 'off' -> ()."""
    if text.strip().lower() in ("off", "none", "0", ""):
        return ()
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma separated fractions such as 0.25,0.5,1, or off")


def _int_at_least(text: str, minimum: int):
    """``text`` as an integer if it is one and >= ``minimum``, else None."""
    try:
        n = int(text)
    except ValueError:
        return None
    return n if n >= minimum else None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    n = _int_at_least(text, 1)
    if n is None:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return x


def self_generated_arg(text: str):
    """'auto' or a count >= 0 (checked by argparse, before any model is loaded)."""
    if text.strip().lower() == "auto":
        return "auto"
    n = _int_at_least(text, 0)
    if n is None:
        raise argparse.ArgumentTypeError(f"--self-generated must be a count >= 0 or 'auto', got {text!r}")
    return n


def add_lr_search_argument(p) -> None:
    p.add_argument("--block-lr-search", type=lr_search_fractions, default=(0.25, 0.5, 1.0), metavar="FRACTIONS",
                   help="lr preset auto below the paper's token budget: fractions of the raise tried on layer 0; "
                        "the lowest held-out loss picks the rates of every layer ('off' = always the full raise)")


def gguf_settings(args, save_format: str) -> dict:
    """``--format gguf``'s config fields: the preset, and the bit width the lr rules use for it
    (its main type's: Q2_K 2, Q3_K 3, Q4_K and wider 4). Checked before any model is loaded."""
    preset = getattr(args, "gguf_type", None)
    if save_format != "gguf":
        if preset:
            raise ValueError("--gguf-type applies to --format gguf only")
        return {}
    from effqat_plugin.gguf_presets import PRESETS

    if not preset:
        raise ValueError(f"--format gguf needs --gguf-type, one of {', '.join(PRESETS)}")
    preset = preset.upper()
    if preset not in PRESETS:
        raise ValueError(f"--gguf-type {args.gguf_type}: not a preset effqat trains; use one of {', '.join(PRESETS)}")
    if args.sym:
        raise ValueError("--sym does not apply to --format gguf (each llama.cpp type fixes its own grid)")
    return {"gguf_type": preset, "gguf_imatrix": bool(getattr(args, "gguf_imatrix", True)),
            "bits": min(int(preset[1]), 4)}


def config_from_args(args, save_format: str, e2e_epochs: int | None = None, kernel_backend: str | None = None):
    """The EQATConfig of the training arguments (``add_training_arguments``); validates bits / group."""
    from effqat_plugin import EQATConfig

    gguf = gguf_settings(args, save_format)
    return EQATConfig(
        bits=gguf.pop("bits", args.bits), group_size=args.group_size, sym=args.sym, save_format=save_format,
        **gguf,
        block_epochs=args.block_epochs, block_batch_size=args.block_batch_size,
        block_quant_lr=args.block_quant_lr, block_weight_lr=args.block_weight_lr,
        block_early_stop=args.block_early_stop, block_lr_search=args.block_lr_search,
        block_loss=getattr(args, "block_loss", "mse"),
        e2e_epochs=args.e2e_epochs if e2e_epochs is None else e2e_epochs,
        e2e_max_auto_epochs=args.e2e_max_auto_epochs, e2e_lr=args.e2e_lr, block_self_generated=args.block_self_generated,
        e2e_distill=getattr(args, "e2e_distill", 0.0),
        e2e_batch_size=args.e2e_batch_size, e2e_train_zeros=args.train_zeros, lr_preset=args.lr_preset,
        seed=args.seed, compute_device=args.device, kernel_backend=kernel_backend)


def train(run, args, cfg, model_dir: str, ids, e2e_ids=None, offload_dir=None, sample_file=None):
    """Block-AP, then E2E-QP on ``e2e_ids`` (default: the calibration's training split), both also on
    the self-generated samples (``effqat_plugin.self_generated.resolve``: ``--self-generated`` drawn from
    the model, or ``--self-generated-from``, already checked as ``sample_file``), on ``run`` (a streamed
    or in-memory quantization); the sample counts, their source, and why they were skipped when they
    were, end up in the run's meta. Returns the :class:`SelfGenerated` used."""
    from effqat_plugin import self_generated
    from effqat_plugin.eqat_run import split_calibration
    from effqat_plugin.streamed_run import InMemoryQuantization

    train_ids = split_calibration(ids, cfg.block_val_samples)[0]
    loaded = run.model if isinstance(run, InMemoryQuantization) else None
    extra = self_generated.resolve(args, cfg, local_model_dir(model_dir), train_ids.shape[0], ids.shape[1],
                                   loaded=loaded, sample_file=sample_file)
    if extra.skipped:
        logging.getLogger("effqat").warning(extra.warning())
    run.block_ap(ids, offload_dir=offload_dir, e2e_data=e2e_ids, self_generated=extra.ids)
    if getattr(run, "calibration_source", None):
        run.result.extra["calibration_source"] = run.calibration_source
    if extra.record:
        run.result.extra["self_generated_source"] = extra.record
    if extra.skipped:
        run.result.extra["self_generated_skipped"] = extra.skipped
    return extra


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.exists(args.out_dir) and not args.overwrite:
        raise FileExistsError(f"output folder {args.out_dir} exists; pass --overwrite to replace it")
    if args.calib and not os.path.isfile(args.calib):
        raise FileNotFoundError(f"calibration file not found: {args.calib}")
    if args.e2e_data and not os.path.isfile(args.e2e_data):
        raise FileNotFoundError(f"E2E-QP data file not found: {args.e2e_data}")
    cfg = config_from_args(args, args.save_format, kernel_backend=args.kernel)  # before the model is loaded
    if cfg.e2e_distill > 0 and cfg.e2e_epochs > 0 and (args.e2e_data or not args.block_self_generated):
        raise ValueError("--e2e-distill takes the fp model's logits from Block-AP's samples, so E2E-QP must train "
                         "on those: drop --e2e-data / --no-block-self-generated")
    if cfg.save_format == "gguf":
        from pathlib import Path

        from effqat_plugin.converters.gguf_export import check_gguf_destination

        check_gguf_destination(Path(local_model_dir(args.model_dir)), Path(args.out_dir), args.overwrite)
        if args.in_memory:
            raise ValueError("--format gguf runs streamed; drop --in-memory")
    sample_file = None
    if args.self_generated_from:  # checked against the model's config before anything is loaded
        from effqat_plugin.self_generated import checked_file

        sample_file = checked_file(args.self_generated_from, local_model_dir(args.model_dir), args.seq_len,
                                   args.self_generated)
    work_dir = args.work_dir or os.path.normpath(args.out_dir) + ".effqat-work"
    ids, run = streamed_quantization(args.model_dir, cfg, work_dir, args.calib, args.n_samples, args.seq_len,
                                     args.seed, show_progress=not args.quiet, in_memory=args.in_memory,
                                     sample_dtype=args.self_generated_dtype)
    check_writable(run, cfg)
    e2e_ids = None
    if args.e2e_data and args.e2e_epochs > 0:
        from effqat_plugin.data import load_token_file

        e2e_ids = load_token_file(args.e2e_data, run.tokenizer, seq_len=args.seq_len)
    extra = train(run, args, cfg, args.model_dir, ids, e2e_ids, offload_dir=args.offload_streams,
                  sample_file=sample_file)
    report = run.finish(args.out_dir, overwrite=args.overwrite)
    shutil.rmtree(work_dir, ignore_errors=True)
    summary = {"eqat": run.result.meta(cfg)}
    e2e = summary["eqat"]["e2e_qp"]
    line = {"out_dir": args.out_dir, "format": args.save_format, "bits": args.bits, "group_size": args.group_size,
            "sym": bool(args.sym), "calibration": list(ids.shape)}
    if cfg.save_format == "gguf":
        line = {"out_dir": args.out_dir, "format": "gguf", "gguf_type": cfg.gguf_type,
                "calibration": list(ids.shape)}
    cal = summary["eqat"]["calibration"]   # what E2E-QP really trained on, as recorded by the run
    if cfg.e2e_epochs > 0 and (e2e_ids is not None or cal["self_generated"]):
        line["e2e_data"] = [cal["e2e_samples"], cal["e2e_seq_len"]]
        line["self_generated"] = cal["self_generated"]
    if e2e and e2e.get("val_loss_after") is not None and e2e.get("distill"):
        # the held-out loss is the distillation mix, not a perplexity
        line["e2e_distill"] = e2e["distill"]
        line["val_loss_before_e2e"] = round(e2e["val_loss_before"], 4)
        line["val_loss"] = round(e2e["val_loss_after"], 4)
    elif e2e and e2e.get("val_loss_after") is not None:
        line["val_ppl_before_e2e"] = round(math.exp(e2e["val_loss_before"]), 3)
        line["val_ppl"] = round(math.exp(e2e["val_loss_after"]), 3)
    if extra.skipped:
        line["warning"] = extra.warning()
    if e2e:
        line["e2e_epochs"] = e2e.get("epochs_run")   # trained, of e2e["epochs"] planned (meta.eqat.e2e_qp)
        if e2e.get("best_epoch") == 0 and e2e.get("completed", True) and e2e.get("val_loss_after") is not None:
            line["e2e_kept"] = "Block-AP's step sizes: no E2E-QP epoch lowered the held-out loss"
    if report:
        line["save_report"] = report
    print(json.dumps(line, default=str))
    return 0


def check_writable(run, cfg) -> None:
    """Refuse, before any training, a save format that cannot hold this model's linears (e.g.
    compressed-tensors when an in_features is not a multiple of the group), with the format's own
    rules (``converters.convert.decide``), so hours of Block-AP never end in a refused save. Runs on
    the streamed path, whose linears are known up front (on the meta device)."""
    names = getattr(run, "quantized_names", None)
    if not names or cfg.save_format == "gguf":   # a GGUF run's types were planned when it was set up
        return
    from effqat_plugin.converters.convert import decide
    from effqat_plugin.converters.format_base import ModuleSpec
    from effqat_plugin.converters.registry import get_format
    from effqat_plugin.qweight import QuantFormatError, n_groups_for

    specs = []
    for name in names:
        m = run.model.get_submodule(name)
        if cfg.group_size > m.in_features:
            return  # refused elsewhere with its own message (group larger than in_features)
        specs.append(ModuleSpec(name=name, in_features=m.in_features, out_features=m.out_features,
                                n_groups=n_groups_for(m.in_features, cfg.group_size), bits=cfg.bits,
                                group_size=cfg.group_size))
    try:
        decide(get_format(cfg.save_format), specs, cfg.bits, cfg.group_size, "effqat", sym=cfg.sym)
    except QuantFormatError as e:
        raise ValueError(f"--format {cfg.save_format} cannot hold this model (nothing was trained): {e}") from None


def streamed_quantization(model_dir, cfg, work_dir, calib, n_samples, seq_len, seed, show_progress=True,
                          in_memory=False, sample_dtype="auto"):
    """Calibration ids and a :class:`StreamedQuantization` for ``model_dir`` (layers streamed from its
    shards, dense and MoE alike; the folder is checked before anything runs), or with ``in_memory`` an
    :class:`InMemoryQuantization` (the whole model through ``GPTQModel.load``). Without ``calib`` the
    data-free default samples from the model itself (``model_sampler``: whole on the compute device
    in ``sample_dtype``, or offloaded, freed before Block-AP)."""
    from effqat_plugin.data import load_token_file
    from effqat_plugin.evaluation import load_tokenizer_for
    from effqat_plugin.layout import definition_for
    from effqat_plugin.runtime import resolve_runtime
    from effqat_plugin.streamed_run import InMemoryQuantization, StreamedQuantization
    from transformers import AutoConfig

    model_dir = local_model_dir(model_dir)
    definition_for(AutoConfig.from_pretrained(model_dir).model_type)  # clear error for unknown archs
    if in_memory:
        logging.getLogger("effqat").info("--in-memory: loading the whole model through GPTQModel.load (fp32)")
        run = InMemoryQuantization(model_dir, cfg, work_dir, show_progress=show_progress)
        tokenizer = run.tokenizer
    else:
        tokenizer = load_tokenizer_for(model_dir)
        run = StreamedQuantization(model_dir, cfg, work_dir, tokenizer=tokenizer, show_progress=show_progress)
    if calib:
        ids = load_token_file(calib, tokenizer, seq_len=seq_len, n_samples=n_samples)
    else:
        from effqat_plugin import model_sampler

        device = resolve_runtime(cfg.compute_device, cfg.amp_dtype).device
        placement = model_sampler.plan_placement(model_dir, n_samples, seq_len, device, sample_dtype)
        logging.getLogger("effqat").info("no --calib: sampling the calibration from the model itself")
        loaded = run.model if in_memory and model_sampler.matches(run.model, placement) else None
        ids, record = model_sampler.draw(model_dir, n_samples, seq_len, seed, placement, loaded=loaded,
                                         offload_root=os.path.dirname(os.path.abspath(work_dir)))
        run.calibration_source = {"source": "sampled", **record}  # train() puts it in meta.eqat
    return ids, run


def local_model_dir(model_dir: str) -> str:
    """``model_dir`` itself, or the local snapshot of a hub id (downloaded once, weights included)."""
    if os.path.isdir(model_dir):
        return model_dir
    if os.path.exists(model_dir) or model_dir.count("/") != 1:
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_dir, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line for the user
        raise FileNotFoundError(f"model folder not found and hub download of {model_dir!r} failed: "
                                f"{type(e).__name__}: {e}") from None
