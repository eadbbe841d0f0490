"""GGUF runs (``effqat quantize MODEL OUT.gguf --format gguf --gguf-type ...``): Block-AP and E2E-QP on
llama.cpp's own block types, written as one GGUF file.

The oracles are independent of effqat: ``gguf``'s reference dequantizers (the file's bytes against the
run's trained weights, bit for bit), llama.cpp itself (``llama_model_quantize`` for the untrained run,
its CPU runtime for the logits) and transformers (the float64 reference model).

The model: a tiny Llama whose attention and gate/up rows are 256 wide (K types) and whose down_proj
rows are 384 wide (llama.cpp's fallback type), SmolLM2's tokenizer (llama.cpp's converter needs a real
one).
"""
from __future__ import annotations


import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("conversion")

from effqat_plugin import EQATConfig, llama_cpp_quants  # noqa: E402
from effqat_plugin.converters.gguf_export import fp_to_gguf  # noqa: E402
from effqat_plugin.gguf_weights import BlockRows  # noqa: E402
from effqat_plugin.quantizer import KGridParams  # noqa: E402

from gguf_helpers import TOKENIZER, VOCAB  # noqa: E402

pytestmark = pytest.mark.skipif(not llama_cpp_quants.available(), reason="llama.cpp's libggml-base not found")

HIDDEN, INTER, HEADS, KV = 256, 384, 4, 2
TOKENS = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(3)).tolist()


def fp_model(tmp_path, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "fp"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(d)
    for f in TOKENIZER.iterdir():
        if f.name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f, d / f.name)
    return d


def calibration(n=12, t=32):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))


def run_gguf(model_dir, out, work, preset, **cfg_kw):
    """A streamed GGUF run through the Python API (the CLI's path); returns (run, save report)."""
    from effqat_plugin.evaluation import load_tokenizer_for
    from effqat_plugin.streamed_run import StreamedQuantization

    kw = dict(block_epochs=1, block_batch_size=4, e2e_epochs=1, e2e_batch_size=4, block_val_samples=2,
              block_lr_search=())
    kw.update(cfg_kw)
    cfg = EQATConfig(save_format="gguf", gguf_type=preset, bits=min(int(preset[1]), 4), **kw)
    run = StreamedQuantization(str(model_dir), cfg, str(work), tokenizer=load_tokenizer_for(str(model_dir)),
                               show_progress=False)
    run.block_ap(calibration())
    return run, run.finish(str(out))


def read_tensors(path):
    r = gguf.GGUFReader(str(path))
    return {t.name: t for t in r.tensors}


def decoded(t) -> np.ndarray:
    """A GGUF tensor as float32 ``[rows, in]`` (gguf's reference dequantizer)."""
    a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return np.asarray(a, dtype=np.float32).reshape(-1, int(t.shape[0]))


def llama_rows(name: str, w: torch.Tensor) -> torch.Tensor:
    """Rows as llama.cpp's Llama converter orders them (q / k permuted for its rotary layout)."""
    import conversion

    cls = conversion.get_model_class("LlamaForCausalLM")
    if name.endswith("attn_q.weight"):
        return cls.permute(w, HEADS, HEADS)
    if name.endswith("attn_k.weight"):
        return cls.permute(w, HEADS, KV)
    return w


def frozen_weights(run) -> dict:
    """GGUF tensor name -> the run's frozen weight of that linear (after E2E-QP)."""
    out = {}
    for name in run.quantized_names:
        frozen = run.model.get_submodule(name).to_frozen()
        out[run.gguf_plan.gguf_names[name]] = frozen
    return out


def llama_cpp_logits(path) -> np.ndarray:
    from effqat_plugin.llama_cpp_runtime import LlamaCppLM

    m = LlamaCppLM(str(path), n_ctx=len(TOKENS), n_threads=1)
    try:
        return m(torch.tensor([TOKENS])).logits[0].numpy()
    finally:
        m.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ktrain")
    model_dir = fp_model(tmp)
    out = tmp / "model-Q4_K_M.gguf"
    run, report = run_gguf(model_dir, out, tmp / "work", "Q4_K_M")
    return model_dir, out, run, report


def test_file_decodes_to_the_trained_weights_bit_for_bit(trained):
    _, out, run, report = trained
    tensors = read_tensors(out)
    frozen = frozen_weights(run)
    k_types = 0
    for name, w in frozen.items():
        t = tensors[name]
        assert t.tensor_type.name == w.qtype, name
        ours = llama_rows(name, w.dequantize(torch.float32)).numpy()
        theirs = decoded(t)
        assert theirs.shape == ours.shape, name
        assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)), name   # bit for bit
        k_types += w.qtype in llama_cpp_quants.K_TYPES
        assert (w.qtype in llama_cpp_quants.K_TYPES) == (w.in_features % 256 == 0), name
    assert k_types == 12 and len(frozen) == 14      # 6 K-grid linears per layer, down_proj on the fallback
    # E2E-QP trained every fp16 (super-)block scale, the fallback's uniform 32-wide grid included (its
    # only parameters; whether it kept them is the held-out loss's call, see test_e2e_module_...)
    assert all(isinstance(w, KGridParams) for w in frozen.values())
    steps = sum(w.d.numel() + (0 if w.dmin is None else w.dmin.numel()) for w in frozen.values())
    assert run.result.e2e is not None and run.result.e2e.trainable_values == steps


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"])
def test_e2e_module_trains_the_steps_of_llama_cpp_fallback_rows(qtype):
    """A fallback tensor leaves Block-AP as llama.cpp's rows of its trained weights; E2E-QP decodes them
    into frozen codes and trainable fp16 steps (and Q4_1 / Q5_1's fp16 block mins), and what it writes
    back decodes (gguf) to its forward."""
    from effqat_plugin.converters import gguf_kblocks
    from effqat_plugin.gguf_weights import KGridLinear, e2e_module, encoded_rows

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 96, generator=gen) * 0.05
    rows = BlockRows(qtype, torch.from_numpy(llama_cpp_quants.quantize_chunk(w, qtype)), 96, bias=torch.randn(6))
    mod = e2e_module(rows)
    trained = ["grid.d", "grid.dmin"] if qtype.endswith("_1") else ["grid.d"]
    assert isinstance(mod, KGridLinear) and [n for n, _ in mod.named_parameters()] == trained
    x = torch.randn(4, 96, generator=gen)
    assert torch.equal(mod(x), torch.nn.functional.linear(x, rows.dequantize(), rows.bias))
    assert np.array_equal(encoded_rows(mod.to_frozen()), rows.data.numpy())      # untouched: the same bytes
    opt = torch.optim.Adam(mod.parameters(), lr=1e-3)
    (mod(x) - x[:, :6]).pow(2).mean().backward()
    opt.step()
    frozen = mod.to_frozen()
    start = gguf_kblocks.decode(rows.data.numpy(), qtype)
    assert torch.equal(frozen.q, start.q) and not torch.equal(frozen.d, start.d)
    if frozen.dmin is not None:
        assert not torch.equal(frozen.dmin, start.dmin) and bool((frozen.m == 1).all())
    assert torch.equal(frozen.bias, rows.bias)
    raw = encoded_rows(frozen)
    theirs = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    ours = mod.grid().detach().numpy()
    assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32))


def test_report_lists_every_tensor_with_its_type_and_bits(trained):
    _, out, run, report = trained
    by_name = {t["name"]: t for t in report["tensors"]}
    stored = {n: t.tensor_type.name for n, t in read_tensors(out).items()}
    for name, t in by_name.items():
        assert stored[name] == t["type"], name
        block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t["type"])]
        assert t["bits_per_weight"] == pytest.approx(8 * size / block), name
    assert {"token_embd.weight", "output.weight"} <= set(by_name)
    down = by_name["blk.0.ffn_down.weight"]
    assert down["fallback"] and down["type"] != down["preset_type"] and down["type"] not in llama_cpp_quants.K_TYPES
    assert report["fallback"] == [n for n, t in by_name.items() if t["fallback"]]
    assert report["bytes_written"] == out.stat().st_size
    field = gguf.GGUFReader(str(out)).fields["effqat.eqat"]       # the run's meta.eqat travels in the file
    meta = json.loads(bytes(field.parts[field.data[0]]).decode())
    assert meta["settings"]["gguf_type"] == "Q4_K_M"
    assert meta["settings"]["gguf_module_types"] == run.gguf_plan.modules
    assert meta["e2e_qp"]["trainable_values"] == run.result.e2e.trainable_values


def test_llama_cpp_runs_the_trained_model(trained):
    """llama.cpp's logits against a float64 transformers model holding the run's trained weights (the
    embeddings and head as the file stores them: llama.cpp's quantization of the fp tensors).
    Tolerance: llama.cpp quantizes activations to 8 bits per block before its K-type dot products,
    measured here at about 1% of the largest logit at most positions. A few positions of this tiny
    model trained on random tokens are far more sensitive (measured: 8.5% and 12% at 2 of 48; a
    bf16 transformers run of the same weights is 7.7% off at the first of them), so the bound is
    per position, at 90% of them."""
    from transformers import AutoModelForCausalLM

    model_dir, out, run, _ = trained
    tensors = read_tensors(out)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sd = {k: v.float() for k, v in run.model.state_dict().items() if k in ref.state_dict()}
    for name in run.quantized_names:
        sd[f"{name}.weight"] = run.model.get_submodule(name).to_frozen().dequantize(torch.float32)
    sd["model.embed_tokens.weight"] = torch.from_numpy(decoded(tensors["token_embd.weight"]).copy())
    sd["lm_head.weight"] = torch.from_numpy(decoded(tensors["output.weight"]).copy())
    missing = ref.load_state_dict(sd, strict=False).missing_keys
    assert not [k for k in missing if "rotary" not in k]
    ref.double()
    with torch.inference_mode():
        want = ref(torch.tensor([TOKENS])).logits[0].numpy()
    got = llama_cpp_logits(out)
    err = np.abs(got.astype(np.float64) - want).max(-1) / np.abs(want).max()    # per position
    assert (err < 0.03).mean() >= 0.9, np.round(err, 3).tolist()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85


def _llama_quantize(src, dst, preset: str):
    """llama.cpp's own ``llama-quantize SRC DST PRESET`` (its library, in a child process)."""
    code = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{preset}\n"
        "p.nthread = 1\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
    res = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("preset,tied", [("Q2_K", False), ("Q4_K_M", True)])
def test_untrained_run_equals_llama_quantize(tmp_path, preset, tied):
    """Rates 0, no E2E-QP, no importance matrix: every tensor's bytes are llama-quantize's (a tied
    head: token_embd takes the output's rule)."""
    model_dir = fp_model(tmp_path, tied)
    ours = tmp_path / "ours.gguf"
    run_gguf(model_dir, ours, tmp_path / "work", preset, block_quant_lr=0.0, block_weight_lr=0.0, e2e_epochs=0,
             gguf_imatrix=False)
    f16, theirs = tmp_path / "fp16.gguf", tmp_path / "theirs.gguf"
    fp_to_gguf(model_dir, f16)
    _llama_quantize(f16, theirs, preset)
    a, b = read_tensors(ours), read_tensors(theirs)
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name


def test_layer_files_keep_gguf_weights(tmp_path):
    """The Block-AP work folder (resume) stores K grids and llama.cpp rows exactly."""
    from effqat_plugin.layer_report import LayerReport
    from effqat_plugin.resume import LayerStore

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    k = llama_cpp_quants.llama_cpp_fit(w, "Q3_K")
    k.bias = torch.randn(8)
    rows = BlockRows("IQ4_NL", torch.from_numpy(llama_cpp_quants.quantize_chunk(w[:, :96], "IQ4_NL")), 96)
    store = LayerStore(str(tmp_path / "w"), "fp")
    report = LayerReport(index=0, train_loss=1.0, val_loss=None, best_epoch=0, seconds=0.0, peak_memory_mb=0.0,
                         steps=1)
    store.save(0, {"a": k, "b": rows}, {}, report)
    back = LayerStore(str(tmp_path / "w"), "fp").load(0).qweights
    assert back["a"].qtype == "Q3_K" and torch.equal(back["a"].dequantize(), k.dequantize())
    assert torch.equal(back["a"].bias, k.bias)
    assert back["b"].qtype == "IQ4_NL" and torch.equal(back["b"].data, rows.data) and back["b"].in_features == 96


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "effqat_plugin.cli", *map(str, argv)], capture_output=True,
                          text=True)


def test_bad_gguf_requests_are_one_line_and_write_nothing(tmp_path):
    model_dir = fp_model(tmp_path)
    cases = [
        (("--format", "gguf"), "needs --gguf-type"),
        (("--format", "gguf", "--gguf-type", "Q9_K"), "not a preset"),
        (("--gguf-type", "Q4_K_M"), "applies to --format gguf only"),
        (("--format", "gguf", "--gguf-type", "Q4_K_M", "--in-memory"), "runs streamed"),
    ]
    for extra, msg in cases:
        res = _cli("quantize", model_dir, tmp_path / "o.gguf", *extra)
        assert res.returncode == 2, (extra, res.stderr)
        assert msg in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = _cli("quantize", model_dir, tmp_path / "out_folder", "--format", "gguf", "--gguf-type", "Q4_K_M")
    assert res.returncode == 2 and ".gguf" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp"]
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    (tmp_path / "exists.gguf").write_bytes(b"x")
    res = _cli("quantize", model_dir, tmp_path / "exists.gguf", "--format", "gguf", "--gguf-type", "Q4_K_M")
    assert res.returncode == 2 and "exists" in res.stderr
    assert (tmp_path / "exists.gguf").read_bytes() == b"x"
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_e2e_step_rates_follow_each_grids_resolution():
    """E2E-QP's rate is set for a uniform grid of the run's bit width; a grid with more steps across
    its range (a Q4_0 fallback in a Q2_K run, 15 against 3) has that many times smaller steps and
    gets that much smaller a rate (``lr_rules.grid_rate_factor``), on top of the K fields' relative
    rates; the run's own type keeps them as they were."""
    from effqat_plugin.e2e_qp import optimizer_groups, trainable_step_sizes
    from effqat_plugin.gguf_weights import KGridLinear, e2e_module, relative_lr_multipliers

    gen = torch.Generator().manual_seed(9)
    w = torch.randn(4, 256, generator=gen) * 0.05
    k = llama_cpp_quants.llama_cpp_fit(w, "Q2_K")
    model = torch.nn.Sequential(KGridLinear(k), e2e_module(BlockRows(
        "Q4_0", torch.from_numpy(llama_cpp_quants.quantize_chunk(w, "Q4_0")), 256)))
    params = trainable_step_sizes(model, train_zeros=False)
    groups = {id(g["params"][0]): g["lr_mult"] for g in optimizer_groups(model, params, bits=2)}
    g0 = model[0].grid
    rel = relative_lr_multipliers(g0.d, g0.sc, g0.dmin, g0.m)
    assert groups[id(g0.d)] == pytest.approx(rel[id(g0.d)]) and groups[id(g0.dmin)] == pytest.approx(rel[id(g0.dmin)])
    assert groups[id(model[1].grid.d)] == pytest.approx(3 / 15)
    groups4 = {id(g["params"][0]): g["lr_mult"] for g in optimizer_groups(model, params, bits=4)}
    assert groups4[id(model[1].grid.d)] == pytest.approx(1.0) and groups4[id(g0.d)] == pytest.approx(5 * rel[id(g0.d)])
