"""Memory and disk a run will need, from the model's config alone (no weights loaded).

The terms follow what the code keeps resident (see ``streaming.py``, ``block_ap.py``, ``e2e_qp.py``):

* Block-AP, host: the modules outside the decoder layers in their source dtype, one decoder layer in
  its source dtype, the two activation streams (N x T x hidden each; fp32 on CPU, the autocast dtype
  on CUDA) unless they are memory-mapped files (``--offload-streams``), and the process itself.
  On CPU the layer in training also lives in host memory.
* Block-AP, compute device: one layer's fp32 master weights, gradients and two AdamW moments
  (16 bytes per parameter), its fp32 dequantized copy for propagation (4) (``LAYER_TRAIN_BYTES``,
  checked against the CPU measurement), and the training batch's
  activations (the usual transformer-layer estimate, ``b*T*h*(34 + 5*heads*T/h)`` bytes in 16-bit, without
  the attention-matrix term on CUDA where SDPA's fused kernels never store it).
* E2E-QP: the packed model (``bits`` per weight plus a 16-bit scale and a ``bits`` zero per group),
  the 16-bit non-layer modules, fp32 master step sizes with gradients and AdamW moments, and
  checkpointed activations (one hidden state per layer boundary plus one layer's activations).
* E2E-QP distillation (``--e2e-distill``): the fp model's top-k next-token log-probabilities of every
  Block-AP calibration token (``teacher.TeacherLogits``: int32 ids and fp16 log-probs), made when the
  fp stream leaves the last layer and kept in host memory until E2E-QP ends.
* Saving: host holds one layer's packed tensors; disk gets the packed checkpoint.
* GGUF runs (``--gguf-type``, :func:`gguf_sizes`): every tensor's type by llama.cpp's preset rules
  (``gguf_presets.tensor_types`` on the converter's names for a dense decoder), the file's tensor bytes
  from gguf's block sizes, and E2E-QP's form of the grids (``quantizer.KGridFrozenWeight``: q packed
  at ``quantizer.code_bits`` per weight, int8 sc / m per sub-block, fp32 d / dmin per block with
  gradient and two AdamW moments) in place of the packed uniform model; Block-AP's work folder holds
  q as int8 (``resume``).
* Sampling the self-generated samples (``model_sampler``): the whole model in the sampling dtype
  (fp32 on CPU, the checkpoint's 16-bit dtype on CUDA) plus the KV cache of a batch of 64, on the
  compute device; with a cap (``--sample-memory``) what does not fit is offloaded by accelerate (to
  host memory on CUDA, to disk on CPU) and read back at every decoding step. Its time is an estimate
  from the bytes each step reads and the FLOPs it does (``SAMPLE_RATES``), not a measurement.

These are estimates; ``scripts/bench_memory.py`` measures the real peak on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
# Fitted to scripts/bench_memory.py on CPU (streamed quantize, 12 layers, hidden 1024 and 2048: peak
# RSS 1.33 and 2.28 GiB): 26 bytes per layer parameter between the two, i.e. the two 16-bit host
# copies counted below (4) plus 22 for the layer in training: fp32 master weights, gradients and two
# AdamW moments (16), the fp32 dequantized copy used for propagation (4) and fake-quant temporaries;
# the intercept, 1.0 GiB, is the process with its libraries imported (measured alone: 0.97 GiB).
# Not yet measured on CUDA.
PROCESS_BASE = 1.0 * GiB
LAYER_TRAIN_BYTES = 22

# Rough rates for the sampling-time estimate (bytes/s read per decoding step, FLOP/s), per device.
# CPU: scripts/bench_sampling.py on the 2-core development machine, one thread, a 121M-parameter
# random Llama in fp32, 16 x 128 tokens, least loaded run: whole 13.1 s (38 GFLOP/s, or 4.8 GB/s of
# weights read per step), offloaded with 164 of 486 MB resident 25.2 s (3.4 GB/s for the offloaded
# part, from the page cache; a cold disk is slower, hence 2); 2-3x slower when the machine is busy. CUDA: conservative fractions of an H100-class card's HBM
# bandwidth and bf16 throughput, PCIe for host-offloaded layers. Not measured on CUDA.
SAMPLE_RATES = {"cpu": {"flops": 30e9, "resident_bw": 5e9, "offload_bw": 2e9},
                "cuda": {"flops": 100e12, "resident_bw": 1.5e12, "offload_bw": 12e9}}
SAMPLE_BATCH = 64  # data.sample_from_model's batch: the KV cache is sized for it


def teacher_bytes(tokens: int, topk: int) -> int:
    """Host bytes of the distillation teacher: ``topk`` (int32 id, fp16 log-prob) pairs per token."""
    return tokens * topk * (4 + 2)


def decode_cache_bytes(batch: int, seq_len: int, layers: int, kv_heads: int, head_dim: int, vocab: int,
                       elem: int) -> int:
    """Decoding memory besides the weights: keys and values of every layer for ``batch`` sequences of
    ``seq_len`` tokens (``elem`` bytes each), plus the step's fp32 logits and probabilities."""
    return batch * seq_len * layers * 2 * kv_heads * head_dim * elem + 2 * batch * vocab * 4


# Public configs of the models the README plans for (so no download is needed to plan them).
PRESETS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, dtype="float16"),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, dtype="bfloat16"),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, dtype="float16"),
}


@dataclass
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    src_bytes: int
    head_dim: int = 0           # 0: hidden / heads
    arch: str = "llama"         # config.json's model_type (llama.cpp's preset rules read a few archs)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg) -> "Shape":
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        dtype = str(get("dtype") or get("torch_dtype") or "float16")
        heads = int(get("num_attention_heads"))
        return cls(hidden=int(get("hidden_size")), inter=int(get("intermediate_size")),
                   layers=int(get("num_hidden_layers")), heads=heads,
                   kv_heads=int(get("num_key_value_heads") or heads), vocab=int(get("vocab_size")),
                   tied=bool(get("tie_word_embeddings", False)),
                   src_bytes=4 if "32" in dtype else 2, head_dim=int(get("head_dim") or 0),
                   arch=str(get("model_type") or "llama"))

    @property
    def linear_shapes(self) -> dict:
        """{GGUF tensor name suffix: (out, in)} of one decoder layer's linears."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
                "ffn_gate": (self.inter, h), "ffn_up": (self.inter, h), "ffn_down": (h, self.inter)}

    @property
    def linear_params_per_layer(self) -> int:
        return sum(o * i for o, i in self.linear_shapes.values())

    @property
    def layer_params(self) -> int:
        return self.linear_params_per_layer + 2 * self.hidden

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def activations(self, batch: int, seq: int, elem_bytes: int = 2, scores: bool = True) -> int:
        """Saved activations of one layer; ``scores=False`` for fused attention (SDPA flash / memory-
        efficient kernels on CUDA), which never materializes the heads x T x T attention matrix."""
        h = self.hidden
        per_token = 34 + (5 * self.heads * seq / h if scores else 0)
        return int(batch * seq * h * per_token * elem_bytes / 2)


def gguf_tensors(shape: Shape) -> dict:
    """{GGUF tensor name: torch-order shape} of the F16 file llama.cpp's converter writes for a dense
    decoder of ``shape`` (norms included: they take part in the preset's counters only by name)."""
    h = shape.hidden
    t = {"token_embd.weight": (shape.vocab, h), "output_norm.weight": (h,)}
    if not shape.tied:
        t["output.weight"] = (shape.vocab, h)
    for i in range(shape.layers):
        t[f"blk.{i}.attn_norm.weight"] = (h,)
        t[f"blk.{i}.ffn_norm.weight"] = (h,)
        for name, dims in shape.linear_shapes.items():
            t[f"blk.{i}.{name}.weight"] = dims
    return t


def gguf_sizes(shape: Shape, preset: str) -> dict:
    """A GGUF run at ``preset`` ("Q2_K" ... "Q6_K"): each tensor's type, the file's tensor bytes (the
    header and tokenizer come on top), bits per weight over the layers' linears, and the bytes of
    their frozen forms: ``frozen_bytes`` in Block-AP's work folder (int8 q), ``e2e_bytes`` in E2E-QP
    (packed q; the embeddings stay in the source dtype there, as in every run)."""
    import numpy as np

    from .converters.gguf_export import row_bytes
    from .gguf_presets import hparams_from_hf_config, tensor_types
    from .kernels.packing import packed_rows
    from .quantizer import code_bits, kgrid

    tensors = gguf_tensors(shape)
    hp = hparams_from_hf_config({"num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
                                 "num_key_value_heads": shape.kv_heads})
    choices = tensor_types(preset, shape.arch, tensors, hp)

    file_bytes = linear_bytes = linear_params = frozen = e2e_codes = e2e_steps = 0
    counts: dict = {}
    for name, dims in tensors.items():
        qtype = choices[name].type if name in choices else "F32"   # 1-D norms stay F32
        b = int(np.prod(dims[:-1])) * row_bytes(qtype, dims[-1])
        file_bytes += b
        if name.startswith("blk.") and name in choices:
            n = int(np.prod(dims))
            linear_bytes, linear_params = linear_bytes + b, linear_params + n
            counts[qtype] = counts.get(qtype, 0) + 1
            try:
                g = kgrid(qtype)
            except ValueError:   # F16 or IQ4_NL: E2E-QP keeps its rows and their fp32 decode (BlockRowsLinear)
                frozen, e2e_codes = frozen + b, e2e_codes + b + 4 * n
                continue
            fields = n // g.group * (2 if g.asymmetric else 1)           # int8 sc (and m)
            frozen += n + fields                                          # int8 q in the work folder
            e2e_codes += dims[0] * packed_rows(dims[1], code_bits(qtype)) * 4 + fields   # packed q
            e2e_steps += n // g.block * (2 if g.asymmetric else 1)       # d (and dmin)
    return {"preset": preset, "file_bytes": file_bytes, "linear_bytes": linear_bytes,
            "bpw": 8 * linear_bytes / linear_params, "types": counts,
            "fallbacks": sum(c.fallback for n, c in choices.items() if n.startswith("blk.")),
            "frozen_bytes": frozen, "e2e_bytes": e2e_codes, "e2e_steps": e2e_steps,
            "tensors": {n: c.type for n, c in choices.items()}}


def sample_phase(shape: Shape, n: int, seq_len: int, device: str = "cuda", cap=None) -> dict:
    """Memory and estimated seconds of drawing ``n`` x ``seq_len`` self-generated tokens (see the module
    docstring); ``cap``: bytes the model may use on the compute device (None: it fits whole)."""
    cpu = device == "cpu"
    elem = 4 if cpu else shape.src_bytes
    params = shape.layers * shape.layer_params + shape.outside_params
    weights = params * elem
    batch = max(1, min(n, SAMPLE_BATCH))
    kv = decode_cache_bytes(batch, seq_len, shape.layers, shape.kv_heads, shape.hidden // shape.heads,
                            shape.vocab, elem)
    resident = weights if cap is None else max(0, min(weights, int(cap) - kv))
    offloaded = weights - resident
    rate = SAMPLE_RATES["cpu" if cpu else "cuda"]
    steps = -(-n // SAMPLE_BATCH) * max(0, seq_len - 1)
    step = max(2 * params * batch / rate["flops"], resident / rate["resident_bw"] + offloaded / rate["offload_bw"])
    on_device = resident + kv
    return {"host": PROCESS_BASE + (on_device if cpu else offloaded), "device": 0 if cpu else on_device,
            "disk": offloaded if cpu else 0, "placement": "offload" if offloaded else "whole",
            "seconds": steps * step, "tokens": n * seq_len}


def plan(shape: Shape, bits: int, group_size: int, n_samples: int, seq_len: int, block_batch: int = 2,
         e2e_samples: int = 4096, e2e_seq_len: int = 4096, e2e_batch: int = 1, device: str = "cuda",
         offload_streams: bool = False, self_generated: int = 0, sample_cap=None, distill_topk: int = 0,
         gguf_type: str | None = None) -> dict:
    """Bytes per phase: {phase: {"host": b, "device": b, "disk": b}} plus totals for reference; with
    ``self_generated`` samples also the sampling phase ("sample", with its estimated seconds); with
    ``distill_topk`` > 0 (E2E-QP distillation) the teacher's host bytes in Block-AP's and E2E-QP's;
    with ``gguf_type`` (a llama.cpp preset; ``bits`` and ``group_size`` are then unused) the GGUF
    file ("gguf": :func:`gguf_sizes`) in place of the packed checkpoint."""
    cpu = device == "cpu"
    src = shape.src_bytes
    group = group_size if group_size > 0 else shape.hidden
    lp = shape.linear_params_per_layer
    outside = shape.outside_params * src
    stream_elem = 4 if cpu else 2
    streams = 2 * n_samples * seq_len * shape.hidden * stream_elem
    layer_train = LAYER_TRAIN_BYTES * shape.layer_params + shape.activations(block_batch, seq_len, 4 if cpu else 2,
                                                                        scores=cpu)
    # the resident layer plus its transient host copy (deepcopy before the move to the device)
    teacher = teacher_bytes(n_samples * seq_len, distill_topk)  # made at Block-AP's end, beside the streams
    block_host = PROCESS_BASE + outside + 2 * shape.layer_params * src + (0 if offload_streams else streams) + teacher
    block_dev = 0
    if cpu:
        block_host += layer_train
    else:
        block_dev = layer_train + 2 * block_batch * seq_len * shape.hidden * 4
    work = shape.layers * (lp * 1 + 2 * (lp // group) * 2)  # uint8 codes + fp16 scales + uint8 zeros per layer
    packed_per_layer = lp * bits / 8 + (lp / group) * (16 + bits) / 8
    packed = int(shape.layers * packed_per_layer)
    scales = shape.layers * lp // group
    e2e_model = packed + outside + shape.layers * 2 * shape.hidden * src
    gguf = gguf_sizes(shape, gguf_type) if gguf_type else None
    if gguf:
        packed, scales, work = gguf["file_bytes"], gguf["e2e_steps"], gguf["frozen_bytes"]
        e2e_model = gguf["e2e_bytes"] + outside + shape.layers * 2 * shape.hidden * src
    e2e_train = scales * 16 + shape.layers * e2e_batch * e2e_seq_len * shape.hidden * 2 \
        + shape.activations(e2e_batch, e2e_seq_len, 4 if cpu else 2, scores=cpu)
    if cpu:
        e2e = {"host": PROCESS_BASE + e2e_model + e2e_train + teacher, "device": 0, "disk": 0}
    else:
        e2e = {"host": PROCESS_BASE + e2e_model + teacher, "device": e2e_model + e2e_train, "disk": 0}
    extra = {"sample": sample_phase(shape, self_generated, seq_len, device, sample_cap)} if self_generated else {}
    if gguf:
        extra["gguf"] = gguf
    return {
        **extra,
        "params": shape.layers * shape.layer_params + shape.outside_params,
        "checkpoint_16bit": (shape.layers * shape.layer_params + shape.outside_params) * 2,
        "block_ap": {"host": block_host, "device": block_dev,
                     "disk": work + (streams if offload_streams else 0), "streams": streams,
                     "teacher": teacher},
        "e2e_qp": e2e,
        # one layer read back from the work folder (1-byte codes) and its packing temporaries (int64)
        "save": {"host": PROCESS_BASE + outside + 9 * lp // 1, "device": 0,
                 "disk": packed if gguf else packed + outside},
    }
