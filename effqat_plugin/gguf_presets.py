"""Per-tensor GGUF types of llama.cpp's K-quant presets (Q2_K ... Q6_K), predicted without llama.cpp.

effqat trains each linear on the grid llama.cpp will store it in, so it must know, before training,
which ggml type ``llama-quantize MODEL.gguf OUT.gguf Q4_K_M`` gives every tensor: the presets give
some tensors more bits (attn_v, ffn_down, attn_output in some layers; output and tied embeddings
Q6_K), bump a few for GQA / 8-expert / 70B models, and fall back to a 32-block type when a row width
(ne[0], the linear's in_features) is not a multiple of 256.

Source: llama.cpp as vendored by llama-cpp-python==0.3.36, ``src/llama-quant.cpp``:
``tensor_get_category`` (name -> category), ``tensor_allows_quantization`` (which tensors are
quantized), ``llama_tensor_get_type_impl`` (the preset rules), ``tensor_type_fallback`` (width
fallback), ``init_quantize_state_counters`` + ``weight_name_comparer`` in ``src/llama-model-loader.h``
(counter order), and the per-arch ``load_arch_hparams`` in ``src/models/*.cpp`` (LLM_TYPE_70B). The
rules are restated here as tables and small logic; tests/test_gguf_presets.py checks them against
``llama_cpp.llama_model_quantize`` itself.

Mirrored: the preset rules for Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K without an imatrix and
without user options, including the attn_v / ffn_down counters and ``use_more_bits``, n_gqa >= 4,
n_expert == 8, the 70B bump, Falcon's own rules, tied embeddings, and the width fallbacks (at this
version Q2_K/Q3_K fall back to Q4_0, not IQ4_NL; Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; a width
that is not even a multiple of 32 -> F16).

NOT mirrored: user overrides (--output-tensor-type, --token-embedding-type, --tensor-type, --pure,
--leave-output-tensor, --prune-layers), imatrix-dependent choices (none apply to these presets),
the IQ*/TQ*/Q2_K_S/MXFP4 presets, and GLM5-next's Q8_0 floor for its attn_q_a/attn_q_b tensors.
A fused attn_qkv tensor (phi3) follows the attn_v rules: at this version llama.cpp's attn_v branch
also catches ATTENTION_QKV, so its separate attn_qkv branch is never reached for these presets.

Only tensors llama-quantize quantizes get an entry: 2-D/3-D (ggml counts trailing size-1 dims out)
names ending in "weight" that are not norms, routers (ffn_gate_inp), positional / token-type
embeddings or the small tensors llama.cpp leaves alone. Everything else (1-D norms, biases, routers)
keeps the type the converter wrote (F32 for 1-D) and is left out of the result.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

__all__ = ["PRESETS", "TypeChoice", "tensor_types", "hparams_from_hf_config", "quantizes", "category",
           "use_more_bits", "BLOCK_SIZE"]


@dataclass(frozen=True)
class Preset:
    default: str        # ggml type of every tensor no rule changes (llama_ftype_get_default_type)
    ftype: str          # the llama_ftype constant (llama_cpp.<ftype>)


PRESETS: dict[str, Preset] = {
    "Q2_K": Preset("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K"),
    "Q3_K_S": Preset("Q3_K", "LLAMA_FTYPE_MOSTLY_Q3_K_S"),
    "Q3_K_M": Preset("Q3_K", "LLAMA_FTYPE_MOSTLY_Q3_K_M"),
    "Q3_K_L": Preset("Q3_K", "LLAMA_FTYPE_MOSTLY_Q3_K_L"),
    "Q4_K_S": Preset("Q4_K", "LLAMA_FTYPE_MOSTLY_Q4_K_S"),
    "Q4_K_M": Preset("Q4_K", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    "Q5_K_S": Preset("Q5_K", "LLAMA_FTYPE_MOSTLY_Q5_K_S"),
    "Q5_K_M": Preset("Q5_K", "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    "Q6_K": Preset("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K"),
}

# ggml block sizes (ggml_blck_size) of every type a rule or fallback can give
BLOCK_SIZE = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256,
              "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "F16": 1}
# tensor_type_fallback: a 256-block type on a width that is not a multiple of 256
WIDTH_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# tensor_get_category: first match wins (exact names, then substrings, in this order)
_EXACT = {"output.weight": "output", "token_embd.weight": "token_embd",
          "per_layer_token_embd.weight": "token_embd"}
_SUBSTR = (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
           ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
           ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
           ("ffn_down", "ffn_down"))
_ATTN_V_LIKE = {"attn_v", "attn_qkv", "attn_kv_b"}   # category_is_attn_v

# tensor_allows_quantization: names containing these stay as they are (arch-independent list)
_KEEP_SUBSTR = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
                "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
                "mm.a.code_embd") + tuple(f"time_mix_{s}.weight" for s in (
                    "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
                    "decay_w1", "decay_w2", "lerp_fused"))
_KEEP_EXACT = {"position_embd.weight", "token_types.weight"}   # LLM_TN POS_EMBD / TOKEN_TYPES

# load_arch_hparams: (arch, n_layer) that make LLM_TYPE_70B; llama needs GQA too (else it is 65B)
_TYPE_70B = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
# HF model_type names whose GGUF architecture is another name
_ARCH_ALIAS = {"mistral": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TypeChoice:
    type: str           # the ggml type llama.cpp writes, e.g. "Q4_K", "Q5_0", "Q8_0", "F16"
    preset_type: str    # what the preset's rules chose before the row-width fallback
    fallback: bool      # type != preset_type because the row width does not fit preset_type
    reason: str         # which rule chose preset_type (and the fallback, if any)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pattern for the extra-bits tensors: the first and last eighth, and every
    third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def category(name: str) -> str:
    """tensor_get_category: "output", "token_embd", "attn_v", ..., "ffn_down" or "other"."""
    if name in _EXACT:
        return _EXACT[name]
    for sub, cat in _SUBSTR:
        if sub in name:
            return cat
    return "other"


def _ne(shape, order: str) -> tuple[int, ...]:
    if order == "torch":
        return tuple(operator.index(x) for x in reversed(shape))
    if order == "gguf":
        return tuple(operator.index(x) for x in shape)
    raise ValueError(f"order must be 'torch' or 'gguf', got {order!r}")


def _n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing size-1 dimensions do not count."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def quantizes(name: str, shape, order: str = "torch") -> bool:
    """Whether llama-quantize (no --leave-output-tensor) quantizes this tensor at all."""
    ne = _ne(shape, order)
    if _n_dims(ne) < 2 or not name.endswith("weight") or name in _KEEP_EXACT:
        return False
    return not any(s in name for s in _KEEP_SUBSTR)


def _hparam(hparams: dict, key: str, default=None) -> int:
    v = hparams.get(key, default)
    if isinstance(v, (list, tuple)):   # per-layer arrays: llama.cpp's n_gqa() reads layer 0
        v = v[0] if v else default
    if v is None:
        raise ValueError(f"hparams needs {key!r} (llama.cpp's rules read it)")
    try:
        if isinstance(v, bool):
            raise TypeError
        v = operator.index(v)
    except TypeError:
        v = -1
    if v < 0:
        raise ValueError(f"hparams[{key!r}] must be a non-negative int, got {hparams.get(key, default)!r}")
    return v


def hparams_from_hf_config(config: dict) -> dict:
    """The ``hparams`` of :func:`tensor_types` from a HF config.json dict, as llama.cpp's converter
    writes them for the common decoder architectures (block_count = num_hidden_layers, head counts,
    expert_count from num_local_experts / num_experts / n_routed_experts). Read them from the GGUF
    file instead where one exists: converters of models with extra (MTP / nextn) layers count those
    in block_count, and llama.cpp's rules use block_count."""
    cfg = config.get("text_config") or config
    if "num_hidden_layers" not in cfg:
        raise ValueError("config has no num_hidden_layers (not a decoder config llama.cpp converts?)")
    n_head = cfg.get("num_attention_heads", 0)
    experts = next((cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if cfg.get(k)), 0)
    return {"n_layer": cfg["num_hidden_layers"], "n_head": n_head,
            "n_head_kv": cfg.get("num_key_value_heads") or n_head, "n_expert": experts}


def _sort_key(name: str):
    """weight_name_comparer: by block number (non-block tensors first), then by name."""
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


class _Rules:
    """One preset on one model: llama_tensor_get_type_impl's branches for the K presets."""

    def __init__(self, preset: str, arch: str, n_layer: int, n_gqa: int, n_expert: int, is_70b: bool,
                 n_attention_wv: int, tied: bool):
        self.p, self.arch, self.n_layer = preset, arch, n_layer
        self.default = PRESETS[preset].default
        self.n_gqa, self.n_expert, self.is_70b, self.tied = n_gqa, n_expert, is_70b, tied
        self.falcon = arch == "falcon"
        self.i_wv, self.n_wv, self.i_ffn_down = 0, n_attention_wv, 0

    def layer(self, name: str, counter: int) -> int:
        """layer_info: the counter, except with experts, where the layer is read from the name."""
        if max(1, self.n_expert) <= 1:
            return counter
        m = _LAYER.match(name)
        if not m:
            raise ValueError(f"{name}: cannot read the layer of an FFN tensor of a model with experts")
        i = int(m.group(1))
        if i >= self.n_layer:
            raise ValueError(f"{name}: layer {i} is not below n_layer={self.n_layer}")
        return i

    def choose(self, name: str, cat: str, width: int) -> tuple[str, str]:
        p, t = self.p, self.default
        if cat == "output" or (self.tied and cat == "token_embd"):
            what = "output" if cat == "output" else "tied token_embd"
            if self.falcon:
                return "Q8_0", f"{what}: falcon -> Q8_0"
            # llama.cpp picks Q8_0 itself when the width misfits the preset's block; the same type
            # (and F16 below 32) as Q6_K's width fallback, reported here as that fallback
            return "Q6_K", f"{what} -> Q6_K"
        if cat == "token_embd":
            return t, "token_embd: preset default"
        if cat in _ATTN_V_LIKE:
            i, n = self.i_wv, self.n_wv
            self.i_wv += 1
            why = "preset default"
            if p == "Q2_K":
                t, why = ("Q4_K", "n_gqa >= 4") if self.n_gqa >= 4 else ("Q3_K", "Q2_K -> Q3_K")
            elif p == "Q3_K_M":
                t, why = ("Q5_K", f"i_attention_wv={i} < 2") if i < 2 else ("Q4_K", "Q3_K_M -> Q4_K")
            elif p == "Q3_K_L":
                t, why = "Q5_K", "Q3_K_L -> Q5_K"
            elif p in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                t, why = "Q6_K", f"use_more_bits(i_attention_wv={i}, {n})"
            elif p == "Q4_K_S" and i < 4:
                t, why = "Q5_K", f"i_attention_wv={i} < 4"
            if self.is_70b and t in ("Q3_K", "Q4_K"):
                t, why = "Q5_K", "70B model: Q3_K/Q4_K -> Q5_K"
            if self.n_expert == 8:
                t, why = "Q8_0", "n_expert == 8 -> Q8_0"
            return t, f"{cat}: {why}"
        if cat == "attn_k":
            if self.n_expert == 8:
                return "Q8_0", "attn_k: n_expert == 8 -> Q8_0"
            return t, "attn_k: preset default"
        if cat == "ffn_down":
            i, n = self.layer(name, self.i_ffn_down), self.n_layer
            self.i_ffn_down += 1
            why = "preset default"
            if p == "Q2_K":
                t, why = "Q3_K", "Q2_K -> Q3_K"
            elif p == "Q3_K_M":
                if i < n // 16:
                    t, why = "Q5_K", f"layer {i} < n_layer/16"
                elif not self.falcon or use_more_bits(i, n):
                    t, why = "Q4_K", "Q3_K_M -> Q4_K"
            elif p == "Q3_K_L":
                t, why = ("Q4_K", "falcon") if self.falcon else ("Q5_K", "Q3_K_L -> Q5_K")
            elif p == "Q4_K_M":
                if self.falcon:
                    t, why = ("Q6_K", f"falcon, layer {i} < n_layer/16") if i < n // 16 else (
                        ("Q5_K", f"falcon, use_more_bits({i}, {n})") if use_more_bits(i, n) else (t, why))
                elif use_more_bits(i, n):
                    t, why = "Q6_K", f"use_more_bits({i}, {n})"
            elif p == "Q5_K_M" and use_more_bits(i, n):
                t, why = "Q6_K", f"use_more_bits({i}, {n})"
            elif p == "Q4_K_S" and not self.falcon and i < n // 8:
                t, why = "Q5_K", f"layer {i} < n_layer/8"
            return t, f"ffn_down: {why}"
        if cat == "attn_output":
            if not self.falcon:
                if self.n_expert == 8:
                    if p in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                        return "Q5_K", "attn_output: n_expert == 8 -> Q5_K"
                else:
                    bump = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}
                    if p in bump:
                        return bump[p], f"attn_output: {p} -> {bump[p]}"
            elif p == "Q3_K_L":
                return "Q4_K", "attn_output: falcon Q3_K_L -> Q4_K"
            return t, "attn_output: preset default"
        return t, f"{cat}: preset default"


def _valid_shape(shape) -> bool:
    try:
        dims = [operator.index(x) for x in shape]
    except TypeError:
        return False
    return 1 <= len(dims) <= 4 and all(x >= 1 for x in dims) and not isinstance(shape, (str, bytes))


def _fallback(t: str, width: int) -> str:
    """tensor_type_fallback: the 32-block stand-in for a 256-block type, F16 if even 32 misfits."""
    if width % BLOCK_SIZE[t] == 0:
        return t
    f = WIDTH_FALLBACK.get(t, t)
    return f if width % BLOCK_SIZE[f] == 0 else "F16"


def tensor_types(preset: str, arch: str, tensors: dict, hparams: dict,
                 order: str = "torch") -> dict[str, TypeChoice]:
    """{GGUF tensor name: TypeChoice} for every tensor ``llama-quantize`` quantizes under ``preset``.

    ``arch``: the GGUF ``general.architecture`` ("llama", "qwen2", "qwen3", "qwen2moe", "gemma3",
    "phi3", "falcon", ...; HF's "mistral"/"mixtral" are read as "llama", as the converter writes
    them). ``tensors``: {GGUF name: shape} of ALL tensors of the file (names decide the counters and
    whether output.weight exists, i.e. whether embeddings are tied), shapes in ``order`` "torch"
    ((out, in) / (n_expert, out, in), the default) or "gguf" (ne order: in first). ``hparams``:
    ``n_layer`` (block_count, required), ``n_head``, ``n_head_kv`` (default n_head; GQA),
    ``n_expert`` (default 0); ints or per-layer lists (layer 0 is read, as llama.cpp does).
    """
    if preset not in PRESETS:
        raise ValueError(f"unsupported GGUF preset {preset!r}; supported: {', '.join(PRESETS)}")
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("tensors must be a non-empty {GGUF name: shape} dict")
    arch = _ARCH_ALIAS.get(str(arch).lower(), str(arch).lower())
    n_layer = _hparam(hparams, "n_layer")
    if n_layer == 0:
        raise ValueError("hparams['n_layer'] must be at least 1")
    n_head = _hparam(hparams, "n_head", 0)
    n_head_kv = _hparam(hparams, "n_head_kv", n_head)
    n_expert = _hparam(hparams, "n_expert", 0)
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    is_70b = (n_layer == _TYPE_70B.get(arch) and n_expert != 8
              and (arch != "llama" or n_head != n_head_kv))
    names = sorted(tensors, key=_sort_key)
    cats = {n: category(n) for n in names}
    rules = _Rules(preset, arch, n_layer, n_gqa, n_expert, is_70b,
                   n_attention_wv=sum(c in _ATTN_V_LIKE for c in cats.values()),
                   tied="output" not in cats.values())
    out = {}
    for name in names:
        shape = tensors[name]
        if not _valid_shape(shape):
            raise ValueError(f"{name}: shape must be 1 to 4 positive ints, got {shape!r}")
        if not quantizes(name, shape, order):
            continue
        width = _ne(shape, order)[0]
        chosen, why = rules.choose(name, cats[name], width)
        final = _fallback(chosen, width)
        if final != chosen:
            why += f"; width {width} not a multiple of {BLOCK_SIZE[chosen]} -> {final}"
        out[name] = TypeChoice(final, chosen, final != chosen, why)
    return out
