"""Architecture coverage matrix (cases in ``arch_cases.py``; the README table is printed from them).

Each model type, as a tiny random model: GPTQModel.load -> Block-AP (1 epoch) + E2E-QP (1 epoch) at
w4g32 -> save gptq_v2 (the Python path), and the same settings through ``effqat quantize`` (the CLI's
streamed path: decoder layers read from the shards one at a time and defused there), then
- the streamed checkpoint holds exactly the Python path's tensors, bit for bit, dense and MoE alike;
- the decoder-layer inputs Block-AP replays for every layer equal what the model's own forward feeds
  that layer (per-layer masks, rotary bases, dense-then-MoE stacks);
- no floating-point weight matrix is left inside the decoder layers of the saved checkpoint except
  the case's routers (read from the safetensors files, independently of effqat's guard);
- `GPTQModel.from_quantized` computes the logits effqat's own runtime computes, within fp16 tolerance;
- gptq_v2 -> gptq -> gptq_v2 gives back the same tensors, bit for bit.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from effqat_plugin import EQATConfig

from arch_cases import CASES, COMMON, build_tiny_model
from test_converters_helpers import assert_tensors_same

from gptqmodel import BACKEND, GPTQModel  # noqa: E402  (after effqat_plugin: env set)

QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def _params():
    return [pytest.param(c, id=c.model_type, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
            for c in CASES]


def read_folder(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def layer_outputs_of_model_forward(layout, run):
    """Output of every decoder layer during ``run()`` (the model's own forward), via forward hooks."""
    from effqat_plugin.block_ap import _layer_output

    outs = []
    handles = [layer.register_forward_hook(lambda _m, _a, o: outs.append(_layer_output(o))) for layer in layout.layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return outs


def layer_outputs_replayed(hf_model, layout, ids):
    """Output of every decoder layer when the layers are run the way Block-AP runs them: layer-0
    inputs captured from the model, then each layer on its own captured arguments."""
    from effqat_plugin.block_ap import _layer_output, capture_layer_inputs
    from effqat_plugin.runtime import resolve_runtime

    hidden, calls = capture_layer_inputs(hf_model, layout, ids, ids.shape[0], resolve_runtime("cpu"))
    outs = []
    for layer, call in zip(layout.layers, calls):
        hidden = _layer_output(layer(hidden, *call.args, **call.kwargs))
        outs.append(hidden)
    return outs


def _cli_argv(src, out, calib_file):
    """`effqat quantize` with the settings of the matrix (w4g32, 1 + 1 epochs, batch 4, 9 x 32 tokens)."""
    return ["quantize", str(src), str(out), "--bits", "4", "--group-size", "32", "--calib", str(calib_file),
            "--n-samples", "9", "--seq-len", "32", "--block-epochs", "1", "--block-batch-size", "4",
            "--e2e-epochs", "1", "--e2e-batch-size", "4", "--self-generated", "0", "--device", "cpu",
            "--format", "gptq_v2", "--quiet"]


@pytest.mark.parametrize("case", _params())
def test_architecture(case, tmp_path, stories260k_dir):
    from safetensors.torch import save_file

    from effqat_plugin.cli import build_parser, main
    from effqat_plugin.commands.quantize import config_from_args
    from effqat_plugin.converters import convert
    from effqat_plugin.layout import resolve_layout
    from effqat_plugin.loading import load_quantized_model

    src = build_tiny_model(case, tmp_path / "fp", stories260k_dir)
    calib = torch.randint(3, 512, (9, 32), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": calib}, str(tmp_path / "calib.safetensors"))
    argv = _cli_argv(src, tmp_path / "streamed", tmp_path / "calib.safetensors")
    # the CLI's streamed path: layers read from the shards one at a time (fused modules and experts
    # defused per layer), written layer by layer
    assert main(argv) == 0
    # the Python path with the very config the CLI built from those arguments
    cfg = config_from_args(build_parser().parse_args(argv), "gptq_v2")
    model = GPTQModel.load(str(src), cfg, dtype=torch.float32)
    hf = model.model.eval()

    # Block-AP's per-layer replay reproduces the model's own forward, layer by layer
    probe = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    layout = resolve_layout(hf, quantize_config=cfg)
    with torch.no_grad():
        ref = layer_outputs_of_model_forward(layout, lambda: hf(input_ids=probe, use_cache=False))
        got = layer_outputs_replayed(hf, layout, probe)
    assert len(got) == len(ref) == 2
    for i, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"output of layer {i}: {m}")

    summary = model.quantize(calib, show_progress=False)
    result = model._eqat_result
    out = tmp_path / "q"
    model.save(str(out), fmt="gptq_v2")

    # the streamed checkpoint is the Python path's, tensor for tensor, bit for bit
    tensors = read_folder(out)
    assert_tensors_same(read_folder(tmp_path / "streamed"), tensors)
    if case.model_type == "qwen3_moe":  # `effqat quantize --in-memory` (GPTQModel.load) writes the same
        assert main(_cli_argv(src, tmp_path / "in-memory", tmp_path / "calib.safetensors") + ["--in-memory"]) == 0
        assert_tensors_same(read_folder(tmp_path / "in-memory"), tensors)

    # every weight matrix inside the decoder layers is quantized (routers excepted)
    in_layers = re.compile(re.escape(layout.layers_prefix) + r"\.\d+\.(.*)")
    left = [k for k, v in tensors.items() if in_layers.fullmatch(k) and v.is_floating_point() and v.dim() >= 2
            and not k.endswith(QUANT_SUFFIXES) and not re.fullmatch(case.fp_matrices, in_layers.fullmatch(k).group(1))]
    assert left == []
    quantized = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    assert quantized == set(result.qweights) and all(in_layers.fullmatch(k) for k in quantized)
    if case.moe:
        assert any(".experts." in k for k in quantized)
        eqat = json.loads((out / "quantize_config.json").read_text())["meta"]["eqat"]
        layers = eqat["block_ap"]["layers"]
        assert sum(r["experts"] for r in layers) > 0
        assert eqat["block_ap"]["experts_without_tokens"] == sum(r["experts_without_tokens"] for r in layers)
        assert summary["eqat"]["block_ap"]["layers"] == layers

    # GPTQModel's loader and effqat's runtime compute the same logits
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    ours_model = load_quantized_model(str(out))
    q = GPTQModel.from_quantized(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    with torch.no_grad():
        ours = ours_model(input_ids=ids).logits.float()
        theirs = q.model(input_ids=ids).logits.float()
    rel = float((ours - theirs).norm() / ours.norm())
    assert rel < 0.03, rel  # same integers and scales; fp16 (GPTQModel) vs fp32 (effqat) arithmetic only

    # gptq_v2 -> gptq -> gptq_v2 is lossless
    convert(out, tmp_path / "v1", to="gptq")
    convert(tmp_path / "v1", tmp_path / "v2", to="gptq_v2")
    assert_tensors_same(read_folder(tmp_path / "v2"), tensors)


# -- the guard and MoE bookkeeping, on in-memory models (no folders) ----------------------------------

def _tiny(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    case = next(c for c in CASES if c.model_type == model_type)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **case.config, **overrides})
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _cfg(**kw):
    base = dict(bits=4, group_size=32, block_epochs=1, block_batch_size=4, e2e_epochs=0, block_val_samples=0)
    base.update(kw)
    return EQATConfig(**base)


CALIB = torch.randint(3, 512, (8, 16), generator=torch.Generator().manual_seed(0))


def test_guard_refuses_matrices_the_definition_misses_before_block_ap():
    """A linear the GPTQModel definition does not list (a new variant) and a fused 3-D expert tensor
    (transformers-5 MoE not defused) would stay fp: refused up front, naming both, never saved."""
    from effqat_plugin.layout import PartialQuantizationError
    from effqat_plugin.eqat_run import run_eqat

    model = _tiny("llama")
    model.model.layers[0].mlp.extra_proj = torch.nn.Linear(64, 64)
    model.model.layers[1].mlp.experts_gate_up = torch.nn.Parameter(torch.zeros(4, 256, 64))
    with pytest.raises(PartialQuantizationError) as err:
        run_eqat(model, _cfg(), CALIB, show_progress=False)
    msg = str(err.value)
    assert msg.startswith("2 weight matrices inside the decoder layers would stay unquantized")
    assert "model.layers.0.mlp.extra_proj.weight (64, 64)" in msg
    assert "model.layers.1.mlp.experts_gate_up (4, 256, 64)" in msg


def test_guard_catches_a_module_block_ap_left_out(monkeypatch):
    from effqat_plugin.block_ap import BlockAP
    from effqat_plugin.layout import PartialQuantizationError
    from effqat_plugin.eqat_run import run_eqat

    real_run = BlockAP.run

    def dropping_run(self, *a, **kw):
        result = real_run(self, *a, **kw)
        del result.qweights["model.layers.1.mlp.down_proj"]
        return result

    monkeypatch.setattr(BlockAP, "run", dropping_run)
    with pytest.raises(PartialQuantizationError, match=r"^1 weight matrices .*model\.layers\.1\.mlp\.down_proj\.weight \(64, 128\)"):
        run_eqat(_tiny("llama"), _cfg(), CALIB, show_progress=False)


def test_user_exclusion_is_honoured():
    """Modules the user excludes with a GPTQModel dynamic rule stay fp without tripping the guard."""
    from effqat_plugin.eqat_run import run_eqat

    model = _tiny("llama")
    result = run_eqat(model, _cfg(dynamic={r"-:model\.layers\.1\.mlp\.down_proj": {}}), CALIB, show_progress=False)
    assert "model.layers.1.mlp.down_proj" not in result.qweights
    assert "model.layers.0.mlp.down_proj" in result.qweights and len(result.qweights) == 13
    assert isinstance(model.get_submodule("model.layers.1.mlp.down_proj"), torch.nn.Linear)


def test_expert_without_tokens_keeps_min_max_init_and_is_counted(caplog):
    """DeepSeek-V3 layer 1 (MoE after a dense layer 0) with expert 3 made unselectable: it is still
    quantized, from its min/max init unchanged, and counted in the log line and in meta.eqat."""
    import defuser

    from effqat_plugin.eqat_run import run_eqat
    from effqat_plugin.quantizer import rtn_quantize

    model = _tiny("deepseek_v3")
    defuser.convert_model(model, cleanup_original=True)  # what GPTQModel.load does
    model.model.layers[1].mlp.gate.e_score_correction_bias.data[3] = -1e4  # never in the top-k
    idle = {n: model.get_submodule(f"model.layers.1.mlp.experts.3.{n}").weight.detach().clone()
            for n in ("gate_proj", "up_proj", "down_proj")}
    cfg = _cfg()
    with caplog.at_level("INFO", logger="effqat.block_ap"):
        result = run_eqat(model, cfg, CALIB, show_progress=False)
    for n, w in idle.items():
        assert result.qweights[f"model.layers.1.mlp.experts.3.{n}"].equal(rtn_quantize(w, 4, 32)), n
    reports = result.block_ap.reports
    assert [(r.experts, r.experts_without_tokens) for r in reports] == [(0, 0), (4, 1)]
    assert "experts without calibration tokens 1/4" in caplog.text
    assert result.meta(cfg)["block_ap"]["experts_without_tokens"] == 1


def test_readme_table_is_the_generated_one():
    from arch_cases import markdown_table
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- arch-table:start -->\n", 1)[1].split("\n<!-- arch-table:end -->", 1)[0]
    assert block == markdown_table(), "README architecture table is stale: run python scripts/arch_table.py"
