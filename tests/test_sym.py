"""Symmetric mode (``effqat quantize --sym``, ``EQATConfig(sym=True)``): every zero point is
``2^(b-1)`` from the init on, never trained by Block-AP or E2E-QP, and written as GPTQ ``sym: true``
so GPTQModel loads it with its symmetric settings; folders that say sym are checked to be so."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

from effqat_plugin.cli import main
from effqat_plugin.converters import convert, load_quantized, save_quantized
from effqat_plugin.qweight import QuantFormatError
from effqat_plugin.quantizer import FakeQuantLinear, init_scales_zeros, rtn_quantize, symmetric_zero

from kernel_helpers import close
from test_converters_helpers import config_files, read_qcfg, stories_model

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_init_math(bits):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(bits))
    w[0, :32] += 3.0                                   # a group far from symmetric about 0
    s, z = init_scales_zeros(w, bits, 32, sym=True)
    maxq, mid = (1 << bits) - 1, 1 << (bits - 1)
    absmax = w.abs().reshape(8, 3, 32).amax(-1)
    assert torch.equal(s, (2 * absmax / maxq).clamp(1e-4, 1e4))
    assert torch.equal(z, torch.full_like(s, float(mid))) and symmetric_zero(bits) == mid
    qw = rtn_quantize(w, bits, 32, sym=True, scales_dtype=torch.float32)
    assert bool((qw.zeros == mid).all())
    # the dequantized range is [-mid * s, (maxq - mid) * s] around 0: every weight within half a
    # step, except the largest positive ones, clipped to (maxq - mid) * s
    err = (qw.dequantize() - w).abs()
    step = qw.scales.float().repeat_interleave(32, dim=1) * (1 + 1e-5)
    assert bool((err <= step / 2).logical_or(w > 0).all())
    assert bool((err <= step).all())


def test_fake_quant_linear_never_trains_symmetric_zeros():
    lin = nn.Linear(64, 16)
    fq = FakeQuantLinear(lin, 3, 32, sym=True)
    assert [p is fq.scales for p in fq.quant_parameters()] == [True]
    assert "zeros" not in dict(fq.named_parameters()) and "zeros" in dict(fq.named_buffers())
    opt = torch.optim.AdamW(list(fq.parameters()), lr=1e-2)
    for _ in range(3):
        loss = (fq(torch.randn(4, 64)) - lin(torch.randn(4, 64))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bool((fq.zeros == 4).all())
    qw = fq.freeze()
    assert bool((qw.zeros == 4).all())
    asym = FakeQuantLinear(lin, 3, 32)
    assert len(asym.quant_parameters()) == 2 and "zeros" in dict(asym.named_parameters())


def test_sym_config_refuses_trained_zeros():
    from effqat_plugin import EQATConfig

    cfg = EQATConfig(bits=4, group_size=32, sym=True)
    assert cfg.eqat_settings()["sym"] is True
    with pytest.raises(ValueError, match="sym"):
        EQATConfig(bits=4, group_size=32, sym=True, e2e_train_zeros=True)


def _sym_model(bits, seed=0):
    qws, tensors = stories_model(bits, 64, seed=seed, layers=2)
    for qw in qws.values():
        qw.zeros.fill_(1 << (bits - 1))
    return qws, tensors


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "eqat"])
def test_sym_written_and_carried_through_conversions(tmp_path, fmt):
    qws, tensors = _sym_model(4)
    d = tmp_path / fmt
    save_quantized(d, fmt=fmt, qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path), sym=True)
    q = read_qcfg(d)
    assert q["sym"] is True and q["meta"]["sym"] is True
    if fmt != "eqat":
        assert json.loads((d / "config.json").read_text())["quantization_config"]["sym"] is True
    back = tmp_path / f"{fmt}-v1"
    convert(d, back, to="gptq")          # the sym flag follows the folder
    assert read_qcfg(back)["sym"] is True
    assert all(bool((qw.zeros == 8).all()) for qw in load_quantized(back)[1].values())


def test_sym_3bit_with_modules_stored_wider_is_not_marked_sym(tmp_path):
    """3-bit GPTQ keeps 172-wide modules at 4 bits; their zero point 4 is not 4-bit's 8, so the folder
    must not promise sym to kernels that would assume 8 (meta.sym keeps the training fact)."""
    qws, tensors = stories_model(3, 64, seed=1, layers=1)
    for qw in qws.values():
        qw.zeros.fill_(4)
    d = tmp_path / "g"
    rep = save_quantized(d, fmt="gptq", qweights=qws, tensors=tensors, config_dir_or_files=config_files(tmp_path),
                         sym=True)
    q = read_qcfg(d)
    assert rep["wider_modules"] and q["sym"] is False and q["meta"]["sym"] is True
    assert all(bool((qw.zeros == 4).all()) for qw in load_quantized(d)[1].values())


def test_asymmetric_zeros_refused_when_sym(tmp_path):
    qws, tensors = _sym_model(4)
    next(iter(qws.values())).zeros[0, 0] = 3
    with pytest.raises(QuantFormatError, match="differ from 8"):
        save_quantized(tmp_path / "x", fmt="gptq_v2", qweights=qws, tensors=tensors,
                       config_dir_or_files=config_files(tmp_path), sym=True)
    assert not (tmp_path / "x").exists()


def test_compressed_tensors_keeps_sym_in_meta(tmp_path):
    qws, tensors = stories_model(4, 64, seed=3, layers=1, linears={"self_attn.q_proj": (64, 64)})
    for qw in qws.values():
        qw.zeros.fill_(8)
    d = tmp_path / "ct"
    save_quantized(d, fmt="compressed-tensors", qweights=qws, tensors=tensors,
                   config_dir_or_files=config_files(tmp_path), sym=True)
    assert read_qcfg(d)["meta"]["sym"] is True
    convert(d, tmp_path / "v2", to="gptq_v2")
    assert read_qcfg(tmp_path / "v2")["sym"] is True


SMALL = ["--n-samples", "12", "--seq-len", "32", "--block-epochs", "1", "--e2e-epochs", "1",
         "--e2e-max-auto-epochs", "1", "--block-lr-search", "off", "--self-generated", "0", "--quiet"]


def test_quantize_sym_end_to_end(tmp_path, stories260k_dir, capsys):
    """A tiny Block-AP + E2E-QP run with --sym: zeros all 8, sym: true, GPTQModel loads it with
    sym=True and gives the logits of effqat's own dequantized model."""
    import torch._dynamo

    pytest.importorskip("gptqmodel")
    out = tmp_path / "w4sym"
    assert main(["quantize", str(stories260k_dir), str(out), "--bits", "4", "--group-size", "32", "--sym",
                 "--format", "gptq", *SMALL]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["sym"] is True
    q = read_qcfg(out)
    assert q["sym"] is True and q["meta"]["eqat"]["settings"]["sym"] is True and q["meta"]["eqat"]["e2e_qp"] is not None
    _, qws, _, _ = load_quantized(out)
    assert len(qws) == 35 and all(bool((qw.zeros == 8).all()) for qw in qws.values())

    from gptqmodel import BACKEND, GPTQModel

    from effqat_plugin.loading import load_checkpoint

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        g = GPTQModel.from_quantized(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        assert g.quantize_config.sym is True
        tokens = torch.tensor([[1, 5, 9, 2, 7, 100, 33, 4]])
        for name, mod in g.model.named_modules():
            if name in qws:
                assert torch.equal(mod.dequantize_weight(), qws[name].dequantize(torch.float16).t()), name
        with torch.inference_mode():
            a = g.model(tokens).logits.float()
    finally:
        torch._dynamo.config.disable = old
    own = load_checkpoint(str(out), dtype=torch.float32).model.eval()
    with torch.inference_mode():
        b = own(tokens).logits.float()
    # same weights; GPTQModel computes in fp16, effqat's packed linears here in fp32
    close(a, b, 1e-2, "GPTQModel (sym) vs effqat's own dequantization")
