"""The tensors llama.cpp's converter reads, made from the modules an effqat checkpoint stores.

effqat checkpoints hold the linears GPTQModel quantizes, and GPTQModel quantizes *defused* models
(``defuser``): phi3's and glm4's ``mlp.gate_up_proj`` become ``gate_proj`` + ``up_proj``, gpt-oss's
stacked experts become one linear per expert, Mixtral's ``block_sparse_moe.experts.N.w1/w2/w3``
are named ``mlp.experts.N.gate_proj/down_proj/up_proj``. llama.cpp's converter reads the original
Hugging Face layout, so the exporter hands it the original tensors again, built from the parts:

* :class:`Join` rules put separated modules back into the one tensor the original holds (rows
  concatenated, or per-expert linears stacked into gpt-oss's ``[experts, in, out]`` with gate/up
  interleaved), and their biases likewise;
* :data:`RENAMES` give the original names where only the names differ.

Every rule only moves rows (quantized modules travel as row ids, see :mod:`.gguf_export`) or whole
float tensors, so it cannot change a value. Rules are keyed by the ``architectures`` entry of
config.json; architectures without rules pass through unchanged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Join:
    """Modules ``parts`` (suffixes after the common prefix) that the original checkpoint holds as one
    tensor named ``weight`` (and ``bias``, when the parts have biases).

    ``experts``: the parts are per-expert (``<prefix>experts.<e>.<part>``) and the original stacks
    them as ``<prefix>experts.<weight>``, ``[experts, in_features, out_features]`` (transposed, as
    gpt-oss stores them);
    ``interleave``: the rows of the parts alternate (gate row 0, up row 0, gate row 1, ...) instead
    of following each other.
    """

    weight: str
    bias: str
    parts: tuple[str, ...]
    experts: bool = False
    interleave: bool = False


_GATE_UP = Join("mlp.gate_up_proj.weight", "mlp.gate_up_proj.bias", ("mlp.gate_proj", "mlp.up_proj"))

JOINS: dict[str, tuple[Join, ...]] = {
    "Phi3ForCausalLM": (_GATE_UP,),
    "Glm4ForCausalLM": (_GATE_UP,),
    "GptOssForCausalLM": (
        Join("gate_up_proj", "gate_up_proj_bias", ("gate_proj", "up_proj"), experts=True, interleave=True),
        Join("down_proj", "down_proj_bias", ("down_proj",), experts=True),
    ),
}

RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "MixtralForCausalLM": (
        (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
        (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
        (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
    ),
}


@dataclass
class Input:
    """One tensor as the converter expects it: ``name``, built by ``build`` from the source tensors
    of ``parts`` (quantized module names, or float tensor keys), in order."""

    name: str
    parts: list[str]
    build: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    joined: bool = False


def _interleaved(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(ts), dim=1).reshape(-1, *ts[0].shape[1:])


def _row_join(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(list(ts), dim=0)


def _expert_stack(n_parts: int, interleave: bool):
    """``[experts, in, out]`` from per-expert ``[out, in]`` parts (and ``[experts, out]`` from biases)."""
    def build(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        per_expert = []
        for e in range(0, len(ts), n_parts):
            group = ts[e:e + n_parts]
            rows = _interleaved(group) if interleave else _row_join(group)
            per_expert.append(rows.mT if rows.ndim == 2 else rows)
        return torch.stack(per_expert, dim=0)
    return build


def _groups(rule: Join, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(prefix of the joined names, part modules in build order) of every complete instance of ``rule``."""
    out = []
    if not rule.experts:
        for m in sorted(modules):
            if m.endswith("." + rule.parts[0]):
                prefix = m[: -len(rule.parts[0])]
                group = [prefix + p for p in rule.parts]
                if all(g in modules for g in group):
                    out.append((prefix, group))
        return out
    pat = re.compile(r"^(.*\.)experts\.(\d+)\." + re.escape(rule.parts[0]) + "$")
    experts: dict[str, int] = {}                 # prefix -> number of experts (one pass over the modules)
    for m in modules:
        if mt := pat.match(m):
            experts[mt.group(1)] = experts.get(mt.group(1), 0) + 1
    for prefix, n in sorted(experts.items()):
        group = [f"{prefix}experts.{e}.{p}" for e in range(n) for p in rule.parts]
        if all(g in modules for g in group):
            out.append((prefix + "experts.", group))
    return out


def _rename(arch: str, name: str) -> str:
    for pat, repl in RENAMES.get(arch, ()):
        name = re.sub(pat, repl, name)
    return name


def converter_inputs(arch: str, modules: Sequence[str], float_keys: Sequence[str]) -> tuple[list[Input], list[Input]]:
    """(quantized inputs, float inputs) for llama.cpp's converter class of ``arch``.

    ``modules`` are the quantized linears, ``float_keys`` every other tensor key (biases included).
    A quantized input's parts are module names, built from their row-id columns; a float input's
    parts are tensor keys."""
    left, floats_left = set(modules), set(float_keys)
    quantized, floats = [], []
    for rule in JOINS.get(arch, ()):
        build = _expert_stack(len(rule.parts), rule.interleave) if rule.experts else _row_join
        for prefix, group in _groups(rule, left):
            quantized.append(Input(_rename(arch, prefix + rule.weight), group, build, joined=True))
            left.difference_update(group)
            biases = [f"{m}.bias" for m in group]
            if all(b in floats_left for b in biases):
                floats.append(Input(_rename(arch, prefix + rule.bias), biases, build, joined=True))
                floats_left.difference_update(biases)
    quantized += [Input(_rename(arch, f"{m}.weight"), [m], _row_join) for m in modules if m in left]
    floats += [Input(_rename(arch, k), [k], _row_join) for k in float_keys if k in floats_left]
    return quantized, floats
