"""Tiny quantized checkpoints that llama.cpp's converter accepts (SmolLM2's tokenizer, widths that
are multiples of 32), and GGUF readers for the tests. No tests here."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from effqat_plugin.converters import save_quantized

from test_converters_helpers import rand_qweight

TOKENIZER = Path(__file__).resolve().parent / "assets" / "smollm2_tokenizer"
VOCAB = 49152

_ARCH = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16),
}


def config_dir(tmp: Path, arch: str = "llama", **overrides) -> Path:
    """config.json + SmolLM2 tokenizer files (no weights)."""
    d = tmp / f"cfg-{arch}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2, torch_dtype="float16", hidden_act="silu", **_ARCH[arch])
    cfg.update(overrides)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in TOKENIZER.iterdir():
        if f.name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f, d / f.name)
    return d


def linears(arch: str, hidden=64, inter=128, heads=4, kv=2, head_dim=16) -> dict:
    q, k = heads * head_dim, kv * head_dim
    return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (k, hidden),
            "self_attn.v_proj": (k, hidden), "self_attn.o_proj": (hidden, q),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}


def tiny_model(bits: int, group: int, arch: str = "llama", seed: int = 0, layers: int = 2,
               shapes: dict | None = None):
    """(qweights, other tensors) of a tiny ``arch`` model with random codes / zeros / fp16 scales.
    Scales shrink with the code range so the fp16 activations stay finite."""
    gen = torch.Generator().manual_seed(seed + 7)
    qws, tensors = {}, {}
    tensors["model.embed_tokens.weight"] = (torch.randn(VOCAB, 64, generator=gen) * 0.5).to(torch.float16)
    tensors["lm_head.weight"] = (torch.randn(VOCAB, 64, generator=gen) * 0.1).to(torch.float16)
    tensors["model.norm.weight"] = (1 + 0.1 * torch.randn(64, generator=gen)).to(torch.float16)
    for i in range(layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{n}.weight"] = (1 + 0.1 * torch.randn(64, generator=gen)).to(torch.float16)
        if arch == "qwen3":
            for n in ("q_norm", "k_norm"):
                tensors[f"model.layers.{i}.self_attn.{n}.weight"] = (
                    1 + 0.1 * torch.randn(16, generator=gen)).to(torch.float16)
        for j, (name, (o, n)) in enumerate((shapes or linears(arch)).items()):
            qw = rand_qweight(o, n, bits, group, seed * 1000 + i * 10 + j)
            qw.scales = (qw.scales.float() * 8 / (1 << bits)).to(torch.float16)
            qws[f"model.layers.{i}.{name}"] = qw
    return qws, tensors


def write_tiny(tmp: Path, fmt: str, bits: int, group: int, arch: str = "llama", seed: int = 0,
               name: str | None = None, shapes: dict | None = None, fix=None, **config) -> tuple[Path, dict]:
    """Save a :func:`tiny_model` as a ``fmt`` folder; ``fix(qweights)`` edits it first, ``config``
    overrides config.json entries. Returns (folder, qweights)."""
    qws, tensors = tiny_model(bits, group, arch, seed, shapes=shapes)
    if fix is not None:
        fix(qws)
    d = tmp / (name or f"{arch}-{fmt}-w{bits}g{group}-s{seed}")
    save_quantized(d, fmt=fmt, qweights=qws, tensors=tensors,
                   config_dir_or_files=config_dir(tmp / (d.name + "-cfg"), arch, **config))
    return d, qws


_READ = {}


def read_gguf(path: Path):
    """({name: (type name, raw ndarray as stored, logical shape)}, {key: field}) of a GGUF file via
    gguf's reader (which parses the 49k-token vocabulary in Python, seconds: cached per file)."""
    import gguf
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _READ:
        r = gguf.GGUFReader(str(path))
        tensors = {t.name: (t.tensor_type.name, np.array(t.data), [int(x) for x in reversed(t.shape)])
                   for t in r.tensors}
        _READ[key] = (tensors, {f.name: f for f in r.fields.values()})
    return _READ[key]
