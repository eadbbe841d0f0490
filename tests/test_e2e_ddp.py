"""E2E-QP across processes for real: 2 CPU processes (gloo, launched with torchrun) give the same step
sizes as 1 process with the same global batch. This file is also the worker script torchrun runs."""
import json
import os
import socket
import subprocess
import sys

import torch
from e2e_helpers import tiny_packed_llama

GLOBAL_BATCH = 4
N_TRAIN, N_VAL, SEQ = 12, 4, 16




def data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (N_TRAIN + N_VAL, SEQ), generator=g)
    return ids[:N_TRAIN], ids[N_TRAIN:]


def train(micro_batch_size: int):
    from effqat_plugin.e2e_qp import E2EOptions, E2EQP, E2ESettings
    from effqat_plugin.runtime import resolve_runtime

    model = tiny_packed_llama()
    tr, va = data()
    settings = E2ESettings(bits=2, e2e_epochs=2, e2e_max_auto_epochs=1, e2e_batch_size=GLOBAL_BATCH, e2e_lr=5e-3)
    trainer = E2EQP(model, settings, resolve_runtime("cpu"), show_progress=False,
                    options=E2EOptions(micro_batch_size=micro_batch_size))
    report = trainer.run(tr, va)
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".scales")}
    return report, scales


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, micro_batch_size: int):
    out = tmp_path / f"ddp-mb{micro_batch_size}"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(out), str(micro_batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    from safetensors.torch import load_file

    return json.loads((out / "report.json").read_text()), load_file(str(out / "scales.safetensors"))


def test_two_gloo_processes_match_one_process(tmp_path):
    ref_report, ref = train(micro_batch_size=GLOBAL_BATCH)
    assert ref_report.world_size == 1 and ref_report.grad_accum_steps == 1 and ref_report.steps == 6
    # 2 processes x micro 2, and 2 processes x micro 1 x 2 accumulation steps: same global batch of 4
    for mb, accum in ((2, 1), (1, 2)):
        rep, got = _launch(tmp_path, mb)
        assert rep["world_size"] == 2 and rep["grad_accum_steps"] == accum and rep["steps"] == 6
        assert got.keys() == ref.keys()
        changed = 0
        for name, s in ref.items():
            torch.testing.assert_close(got[name], s, rtol=1e-5, atol=1e-6, msg=name)
            changed += int(not torch.equal(s, tiny_packed_llama().get_submodule(name[:-7]).scales))
        assert changed == len(ref)  # every step-size tensor trained
        assert abs(rep["val_loss_after"] - ref_report.val_loss_after) < 1e-5
        assert abs(rep["val_loss_before"] - ref_report.val_loss_before) < 1e-5
        assert abs(rep["train_loss"] - ref_report.train_loss) < 1e-5


def test_accelerate_launch_cli_two_processes_matches_one(tmp_path, stories260k_dir):
    """The user's command: `accelerate launch --multi_gpu --num_processes 2 -m effqat_plugin.cli e2e ...
    --device cpu` (accelerate's CPU multi-process route is its torchrun launcher + gloo)."""
    from transformers import AutoModelForCausalLM

    from effqat_plugin.cli import main
    from effqat_plugin.converters import load_quantized, save_quantized
    from effqat_plugin.data import save_token_file
    from effqat_plugin.quantizer import rtn_quantize

    fp = AutoModelForCausalLM.from_pretrained(str(stories260k_dir), dtype=torch.float32)
    qw = {n: rtn_quantize(m.weight.data, 2, 64) for n, m in fp.named_modules()
          if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    pre = tuple(n + "." for n in qw)
    tensors = {k: v.half() for k, v in fp.state_dict().items() if not k.startswith(pre) and k != "lm_head.weight"}
    quant, data = tmp_path / "q", tmp_path / "train.safetensors"
    save_quantized(quant, fmt="gptq_v2", qweights=qw, tensors=tensors, config_dir_or_files=str(stories260k_dir))
    save_token_file(str(data), torch.randint(3, 512, (20, 32), generator=torch.Generator().manual_seed(0)))
    common = ["--data", str(data), "--seq-len", "32", "--batch-size", "4", "--val-samples", "4", "--quiet",
              "--device", "cpu", "--max-auto-epochs", "1"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["e2e", str(quant), str(tmp_path / "one"), *common]) == 0
    finally:
        torch.set_num_threads(n)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "effqat_plugin.cli", "e2e", str(quant),
           str(tmp_path / "two"), *common, "--micro-batch-size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["world_size"] == 2 and line["completed"] and line["format"] == "gptq_v2"
    one, two = load_quantized(str(tmp_path / "one"))[1], load_quantized(str(tmp_path / "two"))[1]
    for k in one:  # fp16 on disk: equal up to one fp16 rounding step
        torch.testing.assert_close(two[k].scales.float(), one[k].scales.float(), rtol=1e-3, atol=0)
    assert any(not torch.equal(one[k].scales, qw[k].scales) for k in qw)


if __name__ == "__main__":  # torchrun worker: python -m torch.distributed.run ... test_e2e_ddp.py OUT MB
    from dataclasses import asdict

    out_dir, mb = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    report, scales = train(mb)
    if int(os.environ.get("RANK", "0")) == 0:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in scales.items()}, os.path.join(out_dir, "scales.safetensors"))
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(asdict(report), f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
