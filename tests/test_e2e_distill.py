"""E2E-QP's distillation from the fp model (``e2e_distill``): the teacher Block-AP keeps equals the fp
model's own next-token distribution, the loss is the cross-entropy against it, and training on it
brings the quantized model closer to the fp one on held-out text."""
import json

import pytest
import torch
import torch.nn.functional as F

from effqat_plugin import EQATConfig
from effqat_plugin.block_ap import BlockAP
from effqat_plugin.cli import main
from effqat_plugin.data import sample_from_model, save_token_file
from effqat_plugin.e2e_qp import E2EQP, TeacherRows
from effqat_plugin.e2e_data import TokenDataset
from effqat_plugin.layout import resolve_layout
from effqat_plugin.runtime import resolve_runtime
from effqat_plugin.teacher import distill_nll_sum


@pytest.fixture(scope="module")
def fp_model(stories260k_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(stories260k_dir), dtype=torch.float32).eval()


def _kl_to(fp_logp: torch.Tensor, model, ids: torch.Tensor) -> float:
    """Mean KL(fp || model) per next-token position."""
    with torch.no_grad():
        q = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    return float((fp_logp.exp() * (fp_logp - q)).sum(-1).mean())


def test_block_ap_keeps_the_fp_models_top_k_and_distillation_brings_the_model_closer_to_it(fp_model,
                                                                                           stories260k_dir):
    import copy

    from effqat_plugin.loading import install_packed_linears

    train = sample_from_model(fp_model, 20, 32, seed=0)
    val = sample_from_model(fp_model, 4, 32, seed=1)
    held = sample_from_model(fp_model, 6, 32, seed=3)
    with torch.no_grad():
        fp_train = F.log_softmax(fp_model(input_ids=torch.cat([train, val]), use_cache=False).logits.float(), -1)
        fp_held = F.log_softmax(fp_model(input_ids=held, use_cache=False).logits.float(), -1)
    model = copy.deepcopy(fp_model)
    cfg = EQATConfig(bits=2, group_size=32, block_epochs=1, block_batch_size=4, e2e_epochs=3,
                     e2e_batch_size=4, e2e_distill=1.0, e2e_distill_topk=16)
    rt = resolve_runtime("cpu")
    ap = BlockAP(model, resolve_layout(model, None, cfg), cfg, rt, show_progress=False)
    block = ap.run(train, val)
    teacher = ap.teacher
    # the teacher is the fp model's own forward (norm, head), top 16 of the whole vocabulary
    want = fp_train.topk(16, -1)
    assert teacher.token_ids.shape == (24, 32, 16) and teacher.logprobs.dtype == torch.float16
    assert torch.equal(teacher.token_ids.long(), want.indices)
    assert torch.allclose(teacher.logprobs.float(), want.values, atol=2e-3, rtol=1e-3)
    # looked up by content, in any order; rows it never saw are refused
    ids, lp = teacher.for_rows(torch.stack([val[1], train[5]]), "test")
    assert torch.equal(ids[0], teacher.token_ids[21]) and torch.equal(lp[1], teacher.logprobs[5])
    with pytest.raises(ValueError, match="no fp-model logits"):
        teacher.for_rows(held[:1], "test")

    install_packed_linears(model, block.qweights, False, torch.device("cpu"))
    labels_model = copy.deepcopy(model)
    before = _kl_to(fp_held, model, held)
    report = E2EQP(model, cfg, rt, show_progress=False).run(train, val, teacher=teacher)
    after = _kl_to(fp_held, model, held)
    assert report.distill == 1.0 and report.val_loss_after < report.val_loss_before
    # on held-out text neither phase saw, closer to the fp model than before and than the paper's loss
    E2EQP(labels_model, _with(cfg, e2e_distill=0.0), rt, show_progress=False).run(train, val)
    after_labels = _kl_to(fp_held, labels_model, held)
    assert after < before and after < after_labels, (before, after, after_labels)


def _with(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_teacher_of_a_16_bit_tied_model_is_computed_in_the_streams_dtype_and_leaves_the_model_as_it_was():
    """As in a streamed run: the modules outside the layers are in the checkpoint's bf16 and the head
    is tied to the embedding; the teacher comes from fp32 hidden states in fp32, and afterwards the
    model is bf16 again with its head still tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from effqat_plugin.block_ap import modules_outside_layers
    from effqat_plugin.teacher import capture_teacher

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    fp32 = LlamaForCausalLM(cfg).eval().to(torch.bfloat16).float()   # the bf16 checkpoint's values in fp32
    ids = torch.randint(0, 96, (3, 10))
    seen = {}
    hook = fp32.model.layers[-1].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    with torch.no_grad():
        want = F.log_softmax(fp32(input_ids=ids, use_cache=False).logits, -1).topk(8, -1)
    hook.remove()
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(fp32.state_dict())
    model.to(torch.bfloat16)
    layout = resolve_layout(model, None, EQATConfig(bits=2, group_size=16))
    teacher = capture_teacher(model, layout.layers, modules_outside_layers(model, layout), ids, seen["h"], 8,
                              2, torch.device("cpu"))
    assert torch.equal(teacher.token_ids.long(), want.indices)
    assert torch.allclose(teacher.logprobs.float(), want.values, atol=2e-3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "forward" not in model.model.layers[0].__dict__


def test_distillation_loss_is_the_cross_entropy_against_the_teachers_top_k():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    teacher = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3] = -100   # position 2 of row 1 predicts an ignored label: not counted
    top = F.log_softmax(teacher, -1).topk(4, -1)
    got = distill_nll_sum(logits, top.indices.int(), top.values.half(), labels)
    want = 0.0
    student = F.log_softmax(logits, -1)
    for r in range(2):
        for t in range(4):
            if labels[r, t + 1] == -100:
                continue
            p = torch.softmax(top.values.half().float()[r, t], -1)
            want += float(-(p * student[r, t, top.indices[r, t]]).sum())
    assert float(got) == pytest.approx(want, rel=1e-5)
    # the whole vocabulary as top-k: the cross-entropy against the teacher's full distribution
    full = F.log_softmax(teacher, -1).topk(11, -1)
    got = distill_nll_sum(logits, full.indices.int(), full.values, torch.zeros(2, 5, dtype=torch.long))
    want = -(F.softmax(teacher, -1) * student)[:, :-1].sum()
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_distillation_without_a_teacher_or_on_unequal_rows_is_refused():
    from e2e_helpers import tiny_packed_llama

    rt = resolve_runtime("cpu")
    cfg = EQATConfig(bits=2, group_size=16, e2e_epochs=1, e2e_batch_size=2, e2e_distill=0.5)
    with pytest.raises(ValueError, match="needs the fp model's logits"):
        E2EQP(tiny_packed_llama(), cfg, rt, show_progress=False).run(torch.randint(0, 64, (4, 8)))
    with pytest.raises(ValueError, match="equal-length"):
        TeacherRows(TokenDataset([torch.arange(4), torch.arange(3)]), None, "training")
    with pytest.raises(ValueError, match="e2e_distill"):
        EQATConfig(e2e_distill=1.5)


def test_cli_distills_and_refuses_what_it_cannot_distil(tmp_path, stories260k_dir, fp_model, capsys):
    calib = tmp_path / "calib.safetensors"
    save_token_file(str(calib), sample_from_model(fp_model, 12, 32, seed=0))
    small = ["--calib", str(calib), "--seq-len", "32", "--block-epochs", "1", "--e2e-epochs", "1",
             "--e2e-max-auto-epochs", "1", "--quiet"]
    out = tmp_path / "d"
    assert main(["quantize", str(stories260k_dir), str(out), "--e2e-distill", "0.5", *small]) == 0
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]
    assert meta["e2e_qp"]["distill"] == 0.5 and meta["settings"]["e2e_distill"] == 0.5
    assert meta["e2e_qp"]["val_loss_after"] <= meta["e2e_qp"]["val_loss_before"]
    capsys.readouterr()
    assert main(["quantize", str(stories260k_dir), str(tmp_path / "x"), "--e2e-distill", "1",
                 "--no-block-self-generated", *small]) == 2
    assert "--e2e-distill takes the fp model's logits" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(stories260k_dir), str(tmp_path / "y"), "--e2e-distill", "2", *small])
    assert e.value.code == 2 and "expected a number in [0, 1]" in capsys.readouterr().err
