"""Quality: on the bundled stories260k, E2E-QP after a short Block-AP lowers held-out perplexity (w2g64)."""
import math

import pytest
import torch

from effqat_plugin import EQATConfig
from effqat_plugin.data import sample_from_model
from effqat_plugin.e2e_qp import E2EQP
from effqat_plugin.evaluation import causal_lm_loss
from effqat_plugin.eqat_run import run_eqat
from effqat_plugin.runtime import resolve_runtime


def test_e2e_lowers_heldout_perplexity_after_block_ap_w2g64(stories260k_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stories260k_dir), dtype=torch.float32).eval()
    train = sample_from_model(model, 48, 64, seed=0)
    held = sample_from_model(model, 12, 64, seed=1)  # other seed: never seen by Block-AP or E2E-QP
    rt = resolve_runtime("cpu")
    fp_loss = causal_lm_loss(model, held, 12, rt)
    run_eqat(model, EQATConfig(bits=2, group_size=64, block_epochs=1, block_batch_size=4, e2e_epochs=0,
                               block_val_samples=4), train, show_progress=False)
    before = causal_lm_loss(model, held, 12, rt)
    report = E2EQP(model, EQATConfig(bits=2, group_size=64, e2e_epochs=1, e2e_max_auto_epochs=1, e2e_batch_size=4), rt,
                   show_progress=False).run(train, held)
    after = causal_lm_loss(model, held, 12, rt)
    assert report.steps == 12 and report.val_loss_before == pytest.approx(before, abs=1e-4)
    assert fp_loss < after < before - math.log(1.5), (math.exp(fp_loss), math.exp(before), math.exp(after))

