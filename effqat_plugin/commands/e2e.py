"""`effqat e2e QUANT_DIR OUT_DIR --data ...`: E2E-QP (train the step sizes end to end) on a quantized folder.

QUANT_DIR is any folder our converters read (effqat / GPTQModel output, an original EfficientQAT
folder, GPTQ v1/v2, BitBLAS); OUT_DIR gets the same format back with the trained scales (fp16),
written atomically. Runs in one process or under ``accelerate launch`` / ``torchrun`` (DDP, FSDP):

    effqat e2e QUANT OUT --data train.jsonl --format pretrain --seq-len 4096 --batch-size 32 --micro-batch-size 1
    accelerate launch -m effqat_plugin.cli e2e QUANT OUT --data alpaca.jsonl --format instruction
    accelerate launch --multi_gpu --num_processes 2 -m effqat_plugin.cli e2e ... --device cpu   # CPU processes (gloo)

The global batch (--batch-size) is split into --micro-batch-size per process x gradient accumulation, and
the loss is token-weighted over the whole global batch, so the result does not depend on the split.

Resumable: a state (trainable tensors + AdamW moments + step) is written to ``OUT_DIR.partial`` every
``--save-every`` steps; ``--resume`` continues from it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil

from effqat_plugin.commands.quantize import positive_int

log = logging.getLogger("effqat.e2e")


def add_parser(sub) -> None:
    p = sub.add_parser("e2e", help="E2E-QP: train the step sizes of a quantized checkpoint end to end",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("quant_dir", help="quantized folder (effqat/GPTQ v1/v2, original EQAT, BitBLAS)")
    p.add_argument("out_dir", help="output folder, same format as QUANT_DIR (must not exist unless --overwrite)")
    p.add_argument("--data", required=True,
                   help="training data: .txt / .jsonl / .json / .parquet / .safetensors ('input_ids') file, or a "
                        "`datasets` name (needs a reachable hub)")
    p.add_argument("--format", dest="data_format", choices=["pretrain", "instruction"], default="pretrain",
                   help="pretrain: pack text into --seq-len rows, loss on all tokens; instruction: source/target "
                        "records, loss on target tokens only (default: pretrain)")
    p.add_argument("--eval-data", default=None, help="held-out data (same format); default: the last "
                                                     "--val-samples rows of --data")
    p.add_argument("--val-samples", type=int, default=None,
                   help="rows of --data held out for evaluation when --eval-data is not given "
                        "(default: 1/16 of the data, at most 64; 0 = no evaluation)")
    p.add_argument("--dataset-config", default=None, help="`datasets` config name")
    p.add_argument("--split", default="train", help="`datasets` split (default: train)")
    p.add_argument("--n-samples", type=int, default=None, help="use at most this many training rows/records")
    p.add_argument("--seq-len", type=int, default=4096, help="pretrain: tokens per packed row (default 4096)")
    p.add_argument("--source-len", type=int, default=384, help="instruction: max source tokens (default 384)")
    p.add_argument("--target-len", type=int, default=128, help="instruction: max target tokens (default 128)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-auto-epochs", type=positive_int, default=4, metavar="N",
                   help="--lr-preset auto with fewer steps than the paper's 128: repeat the data up to N epochs "
                        "while held-out loss falls by > 1%% an epoch, keeping the one with the lowest held-out "
                        "loss (1 = never repeat)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the paper's 2e-5 at w2 / 1e-5 at w3-w4, raised by --lr-preset auto "
                        "when there are fewer steps than the paper's 128)")
    p.add_argument("--lr-preset", choices=["auto", "paper"], default="auto")
    p.add_argument("--batch-size", type=int, default=32, help="global batch: sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward pass and process (default: batch / processes); the rest is "
                        "gradient accumulation")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=0.3)
    p.add_argument("--train-zeros", action="store_true", help="also train the zero points (fp32 master copy)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                   help="default: no on CPU, bf16 on CUDA")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (under accelerate launch; experimental)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: before/after)")
    p.add_argument("--save-every", type=int, default=50, help="write resumable state every N steps (0: off)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR.partial when it holds a state")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many optimizer steps in total, keeping the state for --resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR (and discard OUT_DIR.partial)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(args) -> int:
    import torch

    from effqat_plugin.e2e_data import default_val_samples, load_e2e_data
    from effqat_plugin.e2e_qp import E2EOptions, E2EQP, E2ESettings, read_state, report_dict
    from effqat_plugin.runtime import resolve_runtime

    logging.basicConfig(level=logging.INFO if _is_main() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    quant_dir, out_dir = os.path.normpath(args.quant_dir), os.path.normpath(args.out_dir)
    if not os.path.isdir(quant_dir):
        raise FileNotFoundError(f"quantized folder not found: {quant_dir}")
    if os.path.abspath(quant_dir) == os.path.abspath(out_dir):
        raise ValueError("OUT_DIR must differ from QUANT_DIR")
    if os.path.exists(out_dir) and not args.overwrite:
        raise FileExistsError(f"output folder {out_dir} exists; pass --overwrite to replace it")
    for name in ("epochs", "batch_size", "seq_len", "source_len", "target_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ValueError("--micro-batch-size must be >= 1")
    state_dir = out_dir + ".partial"
    has_state = read_state(state_dir) is not None
    if has_state and not args.resume:
        if not args.overwrite:
            raise FileExistsError(f"{state_dir} holds the state of an earlier run; pass --resume to continue it "
                                  "or --overwrite to start over")
        if _is_main():
            shutil.rmtree(state_dir, ignore_errors=True)

    rt = resolve_runtime(args.device, None)
    frozen_dtype = torch.float32 if rt.device.type == "cpu" else torch.bfloat16
    from effqat_plugin.loading import load_checkpoint

    ckpt = load_checkpoint(quant_dir, frozen_dtype, args.train_zeros)
    model, fmt, src_qweights, tensors, qcfg = ckpt.model, ckpt.fmt, ckpt.qweights, ckpt.tensors, ckpt.quantize_config
    bits = int(qcfg.get("bits") or next(iter(src_qweights.values())).bits)
    from effqat_plugin.converters.format_base import declared_sym

    sym = declared_sym(qcfg)   # kept: E2E-QP trains step sizes only, unless --train-zeros
    if sym and args.train_zeros:
        raise ValueError(f"{quant_dir} is symmetric (every zero point 2^(b-1)); --train-zeros would move them")
    from effqat_plugin.evaluation import load_tokenizer_for

    tokenizer = load_tokenizer_for(quant_dir)
    kw = dict(fmt=args.data_format, seq_len=args.seq_len, source_len=args.source_len, target_len=args.target_len,
              split=args.split, dataset_config=args.dataset_config)
    train = load_e2e_data(args.data, tokenizer, n_samples=args.n_samples, **kw)
    if args.eval_data:
        val = load_e2e_data(args.eval_data, tokenizer, **kw)
    else:
        n_val = default_val_samples(len(train)) if args.val_samples is None else args.val_samples
        train, val = train.split(n_val)
    vocab = model.config.vocab_size
    hi = max(int(torch.as_tensor(r).max()) for r in train.input_ids)
    if hi >= vocab:
        raise ValueError(f"token id {hi} in --data is outside the model's vocabulary ({vocab})")

    settings = E2ESettings(bits=bits, e2e_epochs=args.epochs, e2e_max_auto_epochs=args.max_auto_epochs,
                           e2e_batch_size=args.batch_size, e2e_lr=args.lr,
                           e2e_train_zeros=args.train_zeros, e2e_warmup_ratio=args.warmup_ratio,
                           e2e_max_grad_norm=args.max_grad_norm, lr_preset=args.lr_preset, seed=args.seed)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    opts = E2EOptions(micro_batch_size=args.micro_batch_size, gradient_checkpointing=args.gradient_checkpointing,
                      mixed_precision=args.mixed_precision, fsdp=args.fsdp, eval_every=args.eval_every,
                      state_dir=state_dir, save_every=args.save_every, resume=args.resume,
                      stop_after=args.stop_after, pad_token_id=0 if pad is None else int(pad))
    if rt.device.type != "cpu":
        model.to(rt.device)
    # the share of the auto raise the checkpoint's Block-AP lr search ended on (1.0 if none ran)
    meta_in = qcfg.get("meta") if isinstance(qcfg.get("meta"), dict) else {}
    block = (meta_in.get("eqat") or {}).get("block_ap") if isinstance(meta_in.get("eqat"), dict) else None
    lr_fraction = float((block or {}).get("lr_fraction") or 1.0)
    trainer = E2EQP(model, settings, rt, show_progress=not args.quiet, options=opts, lr_fraction=lr_fraction)
    report = trainer.run(train, val)
    acc = trainer.accelerator
    line = {"out_dir": out_dir, "format": fmt, "bits": bits, "data_format": args.data_format,
            "train_rows": len(train), "val_rows": 0 if val is None else len(val), "steps": report.steps,
            "total_steps": report.total_steps, "completed": report.completed, "world_size": report.world_size,
            "epochs": report.epochs_run, "planned_epochs": report.epochs}
    if not report.completed:
        line["state"] = state_dir
        line["resume_with"] = "--resume"
        if acc.is_main_process:
            print(json.dumps(line))
        return 0

    gather = contextlib.nullcontext()
    if args.fsdp:  # collective: every rank takes part in gathering the sharded step sizes
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        gather = FSDP.summon_full_params(trainer.wrapped, writeback=False)
    with gather:
        qweights = {}
        for name in src_qweights:
            qw = trainer.trained_model.get_submodule(name).to_quantized_weight()
            qw.scales = qw.scales.to(torch.float16).cpu()
            qw.int_weight, qw.zeros = qw.int_weight.cpu(), qw.zeros.cpu()
            if qw.bias is not None:
                qw.bias = qw.bias.cpu()
            qweights[name] = qw
    if acc.is_main_process:
        from effqat_plugin.converters import save_quantized

        meta = dict(qcfg.get("meta") or {}) if isinstance(qcfg.get("meta"), dict) else {}
        meta["source_format"] = fmt
        meta["eqat_e2e"] = {
            "source": os.path.abspath(quant_dir),
            "data": args.data, "data_format": args.data_format, "eval_data": args.eval_data,
            "seq_len": args.seq_len if args.data_format == "pretrain" else None,
            "source_len": args.source_len if args.data_format == "instruction" else None,
            "target_len": args.target_len if args.data_format == "instruction" else None,
            "train_rows": len(train), "val_rows": 0 if val is None else len(val),
            "settings": {"epochs": args.epochs, "lr": report.lr, "lr_preset": args.lr_preset,
                         "global_batch_size": report.global_batch_size,
                         "micro_batch_size": report.micro_batch_size, "grad_accum_steps": report.grad_accum_steps,
                         "world_size": report.world_size, "warmup_ratio": args.warmup_ratio,
                         "max_grad_norm": args.max_grad_norm, "train_zeros": args.train_zeros,
                         "gradient_checkpointing": args.gradient_checkpointing,
                         "mixed_precision": report.mixed_precision, "fsdp": args.fsdp, "seed": args.seed},
            "report": report_dict(report),
        }
        save_quantized(out_dir, fmt=fmt, qweights=qweights, tensors=tensors, config_dir_or_files=quant_dir,
                       meta=meta, overwrite=args.overwrite, sym=sym)
        shutil.rmtree(state_dir, ignore_errors=True)
        if report.val_loss_before is not None and report.val_loss_after is not None:
            line.update(val_loss_before=round(report.val_loss_before, 5), val_loss_after=round(report.val_loss_after, 5),
                        val_ppl_before=round(math.exp(report.val_loss_before), 4),
                        val_ppl_after=round(math.exp(report.val_loss_after), 4))
        print(json.dumps(line))
    acc.wait_for_everyone()
    return 0
