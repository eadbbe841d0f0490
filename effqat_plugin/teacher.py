"""The full-precision model's next-token distributions, kept for E2E-QP to distil from.

E2E-QP's causal-LM loss fits the calibration corpus: on SmolLM2-135M at Q3_K_M / Q4_K_M its
wikitext-2 perplexity falls below the fp model's while the KJV's (another domain) rises 16-33% above
llama-quantize's. Matching the fp model's distributions instead of the corpus' next tokens is meant
to keep the quantized model close to the fp one everywhere; ``cfg.e2e_distill`` mixes the two losses.
Measured there (README, *llama.cpp's K types, trained*) it trades in-domain perplexity for the other
domain's along one curve without beating llama-quantize + imatrix on the KJV, so it is off by default.

The streamed run never holds the fp model whole, but Block-AP's fp activation stream reaches the top
of the last decoder layer for every calibration row: :func:`capture_teacher` runs the model's own
forward with every decoder layer bypassed and the last one returning that stream, so the model's
final norm, head and any logit scaling / soft-capping make the logits, for any architecture and
without loading a layer. Only the top ``k`` log-probabilities per position are kept (``k`` x
(4 + 2) bytes per token), as sparse knowledge distillation does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer_forward import replaced_forwards
from .transfer import modules_on


@dataclass
class TeacherLogits:
    """Top-``k`` next-token log-probabilities of the fp model for each row of the ids it was made from:
    ``token_ids`` [N, T, k] int32, ``logprobs`` [N, T, k] fp16 (log-softmax over the whole vocabulary)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    rows: Dict[bytes, int]      # digest of a row's token ids -> its index

    @staticmethod
    def digest(row: torch.Tensor) -> bytes:
        return hashlib.sha1(row.to(torch.int64).contiguous().numpy().tobytes()).digest()

    def for_rows(self, ids: torch.Tensor, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher rows of ``ids`` [N, T], looked up by content (E2E-QP's rows are Block-AP's,
        reordered and filtered). Refuses rows the fp stream never saw."""
        index = []
        for i, row in enumerate(ids):
            j = self.rows.get(self.digest(row))
            if j is None:
                raise ValueError(f"E2E-QP distillation: {what} sample {i} has no fp-model logits; they come from "
                                 f"Block-AP's calibration stream, so E2E-QP must train on Block-AP's samples "
                                 f"(no --e2e-data, self-generated samples in both phases)")
            index.append(j)
        index = torch.tensor(index, dtype=torch.long)
        return self.token_ids[index], self.logprobs[index]


@torch.no_grad()
def capture_teacher(hf_model: nn.Module, layers, outside, ids: torch.Tensor, final_hidden: torch.Tensor,
                    k: int, batch_size: int, device) -> TeacherLogits:
    """Top-``k`` log-probabilities of the fp model on ``ids`` [N, T], from ``final_hidden`` [N, T, H]:
    the hidden states leaving the last of the decoder ``layers`` (Block-AP's fp stream after its last
    layer). ``outside``: the modules outside the layers (embeddings, final norm, head), computed in
    ``final_hidden``'s dtype on ``device`` for the pass and put back afterwards."""
    last = len(layers) - 1
    current: Dict[str, torch.Tensor] = {}

    def bypass(index):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            return current["h"].to(hidden.device) if index == last else hidden
        return forward

    out_ids = out_lp = None
    try:
        with replaced_forwards(layers, bypass), modules_on(outside, device, final_hidden.dtype):
            for i in range(0, ids.shape[0], batch_size):
                j = min(i + batch_size, ids.shape[0])
                current["h"] = final_hidden[i:j].to(device)
                logits = hf_model(input_ids=ids[i:j].to(device), use_cache=False).logits
                top = F.log_softmax(logits.float(), dim=-1).topk(min(int(k), logits.shape[-1]), dim=-1)
                if out_ids is None:
                    out_ids = torch.empty(*ids.shape, top.indices.shape[-1], dtype=torch.int32)
                    out_lp = torch.empty(*ids.shape, top.indices.shape[-1], dtype=torch.float16)
                out_ids[i:j] = top.indices.to("cpu", torch.int32)
                out_lp[i:j] = top.values.to("cpu", torch.float16)
    finally:
        current.clear()
    rows = {TeacherLogits.digest(row): n for n, row in enumerate(ids)}
    return TeacherLogits(out_ids, out_lp, rows)


def distill_nll_sum(logits: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's next-token distribution against the teacher's top-``k`` one
    (renormalized over those ``k``), summed over the positions the causal-LM loss counts (those whose
    next label is not -100): the same normalization as that loss, so the two mix by weights."""
    mask = (labels[:, 1:] != -100)
    student = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = student.gather(-1, token_ids[:, :-1].to(student.device, torch.int64))
    weights = torch.softmax(logprobs[:, :-1].to(student.device, torch.float32), dim=-1)
    per_token = -(weights * picked).sum(-1)
    return (per_token * mask.to(per_token.dtype)).sum()
