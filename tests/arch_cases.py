"""The architecture coverage matrix: one tiny random config per model type.

``tests/test_arch_matrix.py`` runs every case through the whole flow and ``scripts/arch_table.py``
prints the README table from this same list, so the table cannot claim more than CI checks.
Pure data and a folder builder: importing it loads neither GPTQModel nor transformers.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Shared by every case: vocabulary of the bundled stories260k tokenizer, 2 decoder layers; every
# linear has in_features >= 32 so that w4g32 applies everywhere.
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
              pad_token_id=0)
# MoE: 4 routed experts of width 32, 2 per token.
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_MLA = dict(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, **_MOE)


@dataclass(frozen=True)
class ArchCase:
    model_type: str
    moe: bool = False
    config: dict = field(default_factory=dict)  # overrides of COMMON
    # relative parameter names (regex) that stay floating point by design: routers / gates
    fp_matrices: str = r"$^"
    note: str = ""
    xfail: Optional[str] = None  # exact reason when a type is known not to work yet

    @property
    def kind(self) -> str:
        return "MoE" if self.moe else "dense"


CASES = [
    ArchCase("llama"),
    ArchCase("mistral", config=dict(sliding_window=8)),
    ArchCase("qwen2", note="q/k/v biases"),
    ArchCase("qwen3", config=dict(head_dim=16), note="q/k norms"),
    ArchCase("gemma2", config=dict(head_dim=16, sliding_window=8),
             note="sliding and full attention alternate (per-layer masks)"),
    ArchCase("gemma3_text", config=dict(head_dim=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"]),
             note="per-layer masks and rotary bases"),
    ArchCase("phi3", note="fused qkv_proj / gate_up_proj"),
    ArchCase("olmo2"),
    ArchCase("granite"),
    ArchCase("cohere"),
    ArchCase("glm4"),
    ArchCase("starcoder2", note="c_fc / c_proj MLP with biases"),
    ArchCase("gpt_neox", note="fused query_key_value"),
    ArchCase("opt", config=dict(ffn_dim=128, word_embed_proj_dim=64), note="layers at model.decoder.layers"),
    ArchCase("phi"),
    ArchCase("mixtral", moe=True, config=dict(num_local_experts=4, num_experts_per_tok=2),
             fp_matrices=r"mlp\.gate\.weight"),
    ArchCase("qwen2_moe", moe=True, config=dict(num_experts=4, shared_expert_intermediate_size=64, **_MOE),
             fp_matrices=r"mlp\.(gate|shared_expert_gate)\.weight", note="shared expert"),
    ArchCase("qwen3_moe", moe=True, config=dict(num_experts=4, head_dim=16, **_MOE), fp_matrices=r"mlp\.gate\.weight"),
    ArchCase("gpt_oss", moe=True, config=dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                              sliding_window=8), fp_matrices=r"mlp\.router\.weight",
             note="attention sinks, sliding/full layers"),
    ArchCase("deepseek_v2", moe=True, config=dict(_MLA), fp_matrices=r"mlp\.gate\.weight",
             note="MLA attention; dense layer 0, MoE layer 1 (routed + shared experts)"),
    ArchCase("deepseek_v3", moe=True, config=dict(_MLA), fp_matrices=r"mlp\.gate\.weight",
             note="MLA attention; dense layer 0, MoE layer 1 (routed + shared experts)"),
]


def build_tiny_model(case: ArchCase, dst: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a randomly initialized model of ``case`` and the stories260k tokenizer (GPTQModel.load
    needs one) into ``dst``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(case.model_type, **{**COMMON, **case.config})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, Path(dst) / name)
    return Path(dst)


def markdown_table(cases=CASES) -> str:
    """The README's architecture table (``python scripts/arch_table.py`` prints it)."""
    rows = ["| model type | dense / MoE | status | notes |", "|---|---|---|---|"]
    for c in cases:
        status = f"xfail: {c.xfail}" if c.xfail else "tested"
        rows.append(f"| `{c.model_type}` | {c.kind} | {status} | {c.note} |")
    return "\n".join(rows)
