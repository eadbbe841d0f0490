"""Peak host memory of `effqat quantize` against model depth: is it flat in the number of layers?

Builds synthetic models from configs (bf16 safetensors written layer by layer into several shards, a
word-level tokenizer, a tiny text calibration file), runs `effqat quantize` on each as a child process
(under `nice -n 15`), and reports the kernel's peak RSS of each child (ru_maxrss from wait4), the
24-layer / 12-layer ratio, and the marginal cost: extra peak RSS per extra checkpoint byte between the
shallow and the deep model. Each named command (e.g. today's installed `effqat` and this checkout's)
runs on the same models in the same run, so the numbers sit side by side. A command line that
contains the word ``quantize`` gets the quantize arguments after it (so it can add options such as
``--in-memory``); otherwise ``quantize ...`` is appended.

    python scripts/bench_memory.py --hidden 1024 2048 --layers 12 24 \
        --cmd old=/work/main/.venv/bin/effqat --cmd new="$PWD/.venv/bin/python -m effqat_plugin.cli"

``--moe``: Qwen3-MoE-shaped models instead of Llamas (per-expert checkpoint tensors as the hub ships
them, ``--experts`` routed experts of width ``--expert-width``, top-2 routing), e.g.

    python scripts/bench_memory.py --moe --hidden 1024 --experts 16 --layers 12 24 \
        --cmd new="python -m effqat_plugin.cli" --cmd mem="python -m effqat_plugin.cli quantize --in-memory"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

WORDS = [f"w{i}" for i in range(500)]


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))


class _Shards:
    """A sharded bf16 checkpoint written shard by shard (never whole in memory): config + tokenizer
    first, ``write(k, tensors)`` puts shard ``k`` of ``n`` on disk at once, ``finish`` adds the final
    norm / head shard and the index and returns the checkpoint's bytes."""

    def __init__(self, path: Path, cfg, n: int, seed: int):
        path.mkdir(parents=True)
        cfg.save_pretrained(path)
        write_tokenizer(path)
        self.path, self.n, self.total, self.weight_map = path, n, 0, {}
        self.g = torch.Generator().manual_seed(seed)

    def rnd(self, *shape):
        return (torch.randn(*shape, generator=self.g) * 0.02).to(torch.bfloat16)

    def write(self, k: int, shard: dict) -> None:
        name = f"model-{k + 1:05d}-of-{self.n:05d}.safetensors"
        save_file(shard, str(self.path / name), metadata={"format": "pt"})
        for key, t in shard.items():
            self.weight_map[key] = name
            self.total += t.numel() * t.element_size()

    def finish(self, hidden: int) -> int:
        self.write(self.n - 1, {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                                "lm_head.weight": self.rnd(512, hidden)})
        (self.path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}))
        return self.total


def build_model(path: Path, hidden: int, layers: int, seed: int = 0) -> int:
    """A random bf16 Llama written one shard per few layers (never whole in memory); returns bytes."""
    from transformers import LlamaConfig

    inter = (int(hidden * 2.75) + 63) // 64 * 64
    heads = hidden // 64
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    per_shard = 3
    out = _Shards(path, cfg, 2 + -(-layers // per_shard), seed)
    rnd, write = out.rnd, out.write
    write(0, {"model.embed_tokens.weight": rnd(512, hidden)})
    for s in range(out.n - 2):
        shard = {}
        for i in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            p = f"model.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shard[p + f"self_attn.{name}.weight"] = rnd(hidden, hidden)
            shard[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
            shard[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
            shard[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
            shard[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            shard[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        write(s + 1, shard)
    return out.finish(hidden)


def build_moe_model(path: Path, hidden: int, layers: int, experts: int, width: int, seed: int = 0) -> int:
    """A random bf16 Qwen3-MoE (every layer sparse, ``experts`` routed experts of ``width``, per-expert
    tensors as the hub's Qwen3-30B-A3B stores them), one shard per layer; returns bytes."""
    from transformers import Qwen3MoeConfig

    heads, head_dim = hidden // 64, 64
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=hidden, intermediate_size=width * 2,
                         moe_intermediate_size=width, num_experts=experts, num_experts_per_tok=2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         head_dim=head_dim, max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    out = _Shards(path, cfg, layers + 2, seed)
    rnd, write = out.rnd, out.write
    kv = heads // 2 * head_dim
    write(0, {"model.embed_tokens.weight": rnd(512, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = {p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
                 p + "self_attn.k_proj.weight": rnd(kv, hidden), p + "self_attn.v_proj.weight": rnd(kv, hidden),
                 p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
                 p + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
                 p + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
                 p + "mlp.gate.weight": rnd(experts, hidden),
                 p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        for e in range(experts):
            q = p + f"mlp.experts.{e}."
            shard[q + "gate_proj.weight"] = rnd(width, hidden)
            shard[q + "up_proj.weight"] = rnd(width, hidden)
            shard[q + "down_proj.weight"] = rnd(hidden, width)
        write(i + 1, shard)
    return out.finish(hidden)


def write_calib(path: Path, n_lines: int = 64) -> None:
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")


def peak_rss(argv: list, env: dict, log_path: Path) -> tuple:
    """(peak RSS bytes of the child, seconds, exit code); stdout/stderr go to ``log_path``."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["nice", "-n", "15"] + argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, time.time() - t0, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--layers", type=int, nargs=2, default=[12, 24], metavar=("SHALLOW", "DEEP"))
    ap.add_argument("--cmd", action="append", default=None, metavar="NAME=COMMAND",
                    help="an effqat command line to measure (repeatable); default: this checkout")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="where models go (default: a temp folder, removed)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--moe", action="store_true", help="Qwen3-MoE-shaped models instead of Llamas")
    ap.add_argument("--experts", type=int, nargs="+", default=[16], help="--moe: routed experts per layer")
    ap.add_argument("--expert-width", type=int, default=512, help="--moe: intermediate size of one expert")
    args = ap.parse_args()
    cmds = {}
    for spec in args.cmd or [f"new={sys.executable} -m effqat_plugin.cli"]:
        name, _, line = spec.partition("=")
        cmds[name] = shlex.split(line)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-memory-"))
    calib = root / "calib.txt"
    root.mkdir(parents=True, exist_ok=True)
    write_calib(calib)
    rows = []
    try:
        shapes = [(h, e) for h in args.hidden for e in (args.experts if args.moe else [None])]
        for hidden, experts in shapes:
            for layers in args.layers:
                tag = f"h{hidden}-l{layers}" if experts is None else f"h{hidden}-e{experts}-l{layers}"
                model = root / (f"llama-{tag}" if experts is None else f"qwen3moe-{tag}")
                if not model.exists():
                    size = (build_model(model, hidden, layers) if experts is None
                            else build_moe_model(model, hidden, layers, experts, args.expert_width))
                else:
                    size = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
                for name, cmd in cmds.items():
                    out = root / f"out-{name}-{tag}"
                    shutil.rmtree(out, ignore_errors=True)
                    qargs = [str(model), str(out), "--bits", "2", "--group-size", "64",
                             "--calib", str(calib), "--n-samples", str(args.n_samples), "--seq-len",
                             str(args.seq_len), "--block-epochs", "1", "--e2e-epochs", "0", "--quiet",
                             "--device", "cpu", "--self-generated", "0"]
                    argv = cmd + qargs if "quantize" in cmd else cmd + ["quantize"] + qargs
                    rss, secs, rc = peak_rss(argv, env, root / f"log-{name}-{tag}.txt")
                    row = {"cmd": name, "hidden": hidden, "experts": experts, "layers": layers, "ckpt_bytes": size,
                           "peak_rss": rss, "seconds": round(secs, 1), "rc": rc}
                    rows.append(row)
                    print(f"{name:>6} {tag}: checkpoint {size / 2**30:.2f} GiB, peak RSS "
                          f"{rss / 2**30:.2f} GiB ({rss / size:.2f}x), {secs:.0f}s, rc {rc}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(str(out) + ".effqat-work", ignore_errors=True)
        shallow, deep = args.layers
        print(f"\n| cmd | hidden | experts | ckpt {shallow}L GiB | ckpt {deep}L GiB | peak RSS {shallow}L GiB | "
              f"peak RSS {deep}L GiB | {deep}L/{shallow}L | RAM bytes per added ckpt byte |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in cmds:
            for hidden, experts in shapes:
                def pick(n_layers):
                    return next((r for r in rows if r["cmd"] == name and r["hidden"] == hidden
                                 and r["experts"] == experts and r["layers"] == n_layers), None)
                a, b = pick(shallow), pick(deep)
                if not a or not b or a["rc"] or b["rc"]:
                    print(f"| {name} | {hidden} | {experts or '-'} | failed run (see logs in {root}) |")
                    continue
                print(f"| {name} | {hidden} | {experts or '-'} | {a['ckpt_bytes'] / 2**30:.2f} | {b['ckpt_bytes'] / 2**30:.2f} | "
                      f"{a['peak_rss'] / 2**30:.2f} | {b['peak_rss'] / 2**30:.2f} | "
                      f"{b['peak_rss'] / a['peak_rss']:.2f} | "
                      f"{(b['peak_rss'] - a['peak_rss']) / (b['ckpt_bytes'] - a['ckpt_bytes']):.3f} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
