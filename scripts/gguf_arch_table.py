"""Which architectures of the coverage matrix (tests/arch_cases.py) ``convert --to gguf`` can write,
and whether llama.cpp then loads and runs the file.

Usage: python scripts/gguf_arch_table.py [MODEL_TYPE ...] [--keep DIR] [--json FILE] [--exporter FILE]

For every case a tiny quantized checkpoint is built WITHOUT GPTQModel's quantizer: the HF model of the
case's config (arch_cases.COMMON + the case's overrides, with SmolLM2's 49152-token tokenizer, which
llama.cpp's converter knows, bos/eos 1/2), defused the way ``GPTQModel.load`` defuses it (``defuser``),
the linears GPTQModel 7.7's model definition quantizes replaced by random 4-bit group-32 codes, every
other tensor fp16, saved as gptq_v2. Then ``convert(..., to="gguf")`` and, for a file that was written,
llama.cpp (``LlamaCppLM``, 16 tokens, finite logits), each case in its own subprocess. One markdown
row per case (about 4 minutes on 2 busy cores).

A failure that is about the tiny test setup rather than the weights is retried once, and the retry
is appended to the row: a sentencepiece ``tokenizer.model`` for converter classes that do not take
SmolLM2's tokenizer, and config overrides for shapes llama.cpp assumes (``VARIANTS``); where real
checkpoints of a type ship tokenizer details llama.cpp reads, the builder adds them
(``TOKENIZER_AS_SHIPPED``). ``--exporter FILE`` converts with another copy
of converters/gguf_export.py (to try a proposed fix).

The builder (``build_case``) is also what tests/test_gguf_arch_matrix.py uses.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from arch_cases import CASES, COMMON, ArchCase  # noqa: E402

TOKENIZER = TESTS / "assets" / "smollm2_tokenizer"
VOCAB = 49152
BITS, GROUP = 4, 32


def case_named(model_type: str) -> ArchCase:
    return next(c for c in CASES if c.model_type == model_type)


def hf_config(case: ArchCase):
    from transformers import AutoConfig

    return AutoConfig.for_model(case.model_type, **{**COMMON, **case.config, "vocab_size": VOCAB,
                                                    "bos_token_id": 1, "eos_token_id": 2})


def defused_model(case: ArchCase, seed: int = 0):
    """The random fp32 HF model of ``case`` with its fused blocks split as GPTQModel.load splits them
    (``defuser.replace_fused_blocks`` before building, ``defuser.convert_model`` after)."""
    import defuser
    import torch
    from transformers import AutoModelForCausalLM

    defuser.replace_fused_blocks(case.model_type)
    cfg = hf_config(case)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.config.architectures = [type(model).__name__]
    defuser.convert_model(model, cleanup_original=True)
    return model


def _decoder_layers(model):
    """(prefix, layers) of the decoder stack (the ModuleList with num_hidden_layers entries)."""
    import torch.nn as nn

    n = model.config.num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.endswith("layers"):
            return name, mod
    raise ValueError(f"no decoder layer list in {type(model).__name__}")


def quantized_names(model, case: ArchCase, source: str = "gptqmodel") -> list[str]:
    """Full names of the linears that get quantized.

    ``gptqmodel``: what GPTQModel 7.7's model definition for the type lists (via effqat's
    ``resolve_layout``, exactly what ``effqat quantize`` quantizes; imports GPTQModel, ~15 s).
    ``linears``: every nn.Linear inside the decoder layers except the case's routers
    (``fp_matrices``); no GPTQModel import. The table script checks both agree for every case.
    """
    import torch.nn as nn

    if source == "gptqmodel":
        from effqat_plugin.layout import definition_for, resolve_layout

        d = definition_for(case.model_type)
        after = getattr(d, "after_defuser_conversion", None)
        if callable(after):
            after(model)
        return resolve_layout(model, d).quantized_names()
    if source != "linears":
        raise ValueError(source)
    prefix, layers = _decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        for n, m in layer.named_modules():
            if isinstance(m, nn.Linear) and not re.fullmatch(case.fp_matrices, f"{n}.weight"):
                out.append(f"{prefix}.{i}.{n}")
    return out


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d, ensure_ascii=False))


def _renamed_specials(cfg_dir: Path, names: dict[int, str]) -> None:
    """SmolLM2's special tokens ``id -> new text`` (same ids, so the vocabulary size stays)."""
    def edit(d):
        for tok in d["added_tokens"]:
            if tok["id"] in names:
                old, tok["content"] = tok["content"], names[tok["id"]]
                d["model"]["vocab"][tok["content"]] = d["model"]["vocab"].pop(old)
    _edit_json(cfg_dir / "tokenizer.json", edit)


def _phi_tokenizer(cfg_dir: Path) -> None:
    _edit_json(cfg_dir / "tokenizer_config.json", lambda d: d.update(tokenizer_class="GPT2Tokenizer"))
    _renamed_specials(cfg_dir, {3: "<unk>", 4: "<s>", 5: "</s>"})


# SmolLM2's tokenizer, made to look like what real checkpoints of the type ship, where llama.cpp's
# converter or loader reads more than a BPE tokenizer: phi3's converter class takes a BPE tokenizer
# only when tokenizer_class is GPT2Tokenizer (as Phi-4 ships it; else it wants Phi-3's sentencepiece
# file), and llama.cpp's vocabulary loader looks up Phi-3's <unk>, <s> and </s> when the model's name
# says phi3; glm4's converter class looks up GLM's <|endoftext|> and <|user|>.
TOKENIZER_AS_SHIPPED = {"phi3": _phi_tokenizer, "glm4": lambda d: _renamed_specials(d, {3: "<|user|>"})}


def build_case(case: ArchCase, dst: Path, seed: int = 0, source: str = "gptqmodel"):
    """Save a tiny gptq_v2 checkpoint of ``case`` at ``dst``: random w4g32 codes in every quantized
    linear (GPTQModel's choice, see :func:`quantized_names`), every other tensor of the defused
    model's state dict in fp16, config.json + SmolLM2's tokenizer. Returns (folder, qweights)."""
    import torch

    from effqat_plugin.converters import save_quantized
    from test_converters_helpers import rand_qweight

    dst = Path(dst)
    model = defused_model(case, seed)
    names = quantized_names(model, case, source)
    qws = {}
    for j, name in enumerate(names):
        lin = model.get_submodule(name)
        out_f, in_f = lin.weight.shape
        qw = rand_qweight(out_f, in_f, BITS, GROUP, seed * 100003 + j)
        # scales shrink with the code range so llama.cpp's activations stay finite (as gguf_helpers)
        qw.scales = (qw.scales.float() * 8 / (1 << BITS)).to(torch.float16)
        if lin.bias is not None:
            qw.bias = lin.bias.detach().to(torch.float16)
        qws[name] = qw
    from effqat_plugin.layout import tied_output_keys

    owned = {f"{n}.{p}" for n in names for p in ("weight", "bias")} | tied_output_keys(model)
    tensors = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
               for k, v in model.state_dict().items() if k not in owned}
    cfg_dir = Path(tempfile.mkdtemp(prefix=f"cfg-{case.model_type}-", dir=dst.parent))
    try:
        model.config.torch_dtype = torch.float16
        model.config.save_pretrained(cfg_dir)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER / f, cfg_dir / f)
        if case.model_type in TOKENIZER_AS_SHIPPED:
            TOKENIZER_AS_SHIPPED[case.model_type](cfg_dir)
        save_quantized(dst, fmt="gptq_v2", qweights=qws, tensors=tensors, config_dir_or_files=cfg_dir)
    finally:
        shutil.rmtree(cfg_dir, ignore_errors=True)
    return dst, qws


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:400]


# -- diagnostics for failures that are not about the weights -----------------------------------------

# The converter needs a tokenizer it knows. Two of its classes do not take SmolLM2's BPE tokenizer
# here (Gemma2 reads only a sentencepiece tokenizer.model; for model_type qwen2, transformers 5 loads
# it as Qwen2Tokenizer, whose pre-tokenizer hash llama.cpp does not list), so such a case is retried
# with a small sentencepiece tokenizer.model beside the same weights, to tell whether the weights
# themselves convert.
TOKENIZER_ERRORS = re.compile(r"tokenizer\.model|BPE pre-tokenizer was not recognized")
# Tiny configs that break an assumption llama.cpp makes about real checkpoints of the type; such a
# case is retried with the overrides that meet it (same builder), to tell what the weights do.
VARIANTS = {
    "phi": (dict(num_key_value_heads=4, intermediate_size=256),
            "llama.cpp's phi2 writes head_count_kv = n_head and n_ff = 4*n_embd, Phi-2's shapes"),
    "cohere": (dict(tie_word_embeddings=True), "llama.cpp's command-r has no output tensor: the head is tied"),
    "deepseek_v2": (dict(num_key_value_heads=4), "the converter's MLA split assumes num_key_value_heads = num_attention_heads"),
    "deepseek_v3": (dict(num_key_value_heads=4), "the converter's MLA split assumes num_key_value_heads = num_attention_heads"),
}


def sentencepiece_model(work: Path) -> Path:
    """A 256-piece sentencepiece model (unk/bos/eos = 0/1/2) trained on the README, cached in ``work``."""
    out = work / "sp256.model"
    if not out.exists():
        import io

        import sentencepiece as spm

        lines = [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.strip()]
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=256,
                                       model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
                                       minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        out.write_bytes(buf.getvalue())
    return out


def _exporter(path: str | None):
    """``convert_to_gguf`` of effqat, or of another copy of gguf_export.py (to try a proposed fix)."""
    if not path:
        from effqat_plugin.converters import convert

        return lambda src, dst: convert(src, dst, to="gguf")
    import importlib.util

    spec = importlib.util.spec_from_file_location("effqat_plugin.converters._gguf_export_alt", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return lambda src, dst: mod.convert_to_gguf(src, dst)


def child(folder: str, dst: str, exporter: str | None = None) -> int:
    """One conversion + llama.cpp run in this process; prints one JSON line per stage."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    convert = _exporter(exporter)
    try:
        rep = convert(folder, dst)
    except Exception as e:  # noqa: BLE001 - reported, one line
        print(json.dumps({"stage": "convert", "ok": False, "error": one_line(e),
                          "file_left": Path(dst).exists()}), flush=True)
        return 0
    print(json.dumps({"stage": "convert", "ok": True, "gguf_arch": rep["gguf_arch"],
                      "tensor_types": rep["tensor_types"], "f32_fallback": rep["f32_fallback"]}), flush=True)
    from effqat_plugin.llama_cpp_runtime import LlamaCppLM

    try:
        m = LlamaCppLM(dst, n_ctx=16, n_threads=1)
        ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        logits = m(ids).logits
        m.close()
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"stage": "load", "ok": False, "error": one_line(e)}), flush=True)
        return 0
    err = ("" if list(logits.shape) == [1, 16, VOCAB] and bool(torch.isfinite(logits).all())
           else f"logits of shape {list(logits.shape)}, finite {bool(torch.isfinite(logits).all())}")
    print(json.dumps({"stage": "load", "ok": not err, "error": err}), flush=True)
    return 0


def _llama_cpp_reason(folder: str, dst: str) -> str:
    """llama.cpp's own error line for a file it refused (its log, which LlamaCppLM keeps quiet)."""
    code = ("import sys, llama_cpp\n"
            "try:\n    llama_cpp.Llama(model_path=sys.argv[1], n_ctx=16, verbose=True)\n"
            "except Exception:\n    pass\n")
    try:
        p = subprocess.run([sys.executable, "-c", code, dst], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return ""
    hits = [ln.strip() for ln in p.stderr.splitlines() if "error loading model" in ln or "GGML_ASSERT" in ln]
    return hits[0] if hits else ""


EXPORTER = None   # --exporter FILE: children convert with that copy of gguf_export.py


def attempt(folder: Path, dst: Path, timeout: int = 300) -> dict:
    """Run :func:`child` in a subprocess (converter state and llama.cpp aborts stay there)."""
    if dst.exists():
        dst.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), str(dst)] \
        + (["--exporter", EXPORTER] if EXPORTER else [])
    res = {"converts": "no", "loads": "-", "error": ""}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "", "timeout"
    stages = {}
    for ln in out.splitlines():
        if ln.startswith("{"):
            d = json.loads(ln)
            stages[d["stage"]] = d
    conv, load = stages.get("convert"), stages.get("load")
    if conv is None:
        tail = [ln for ln in err.splitlines() if ln.strip()][-1:] or [f"no output (rc {rc})"]
        res["error"] = f"converter process died (rc {rc}): {tail[0][:300]}"
        return res
    if not conv["ok"]:
        res["error"] = conv["error"]
        res["file_left"] = conv["file_left"]
        return res
    res.update(converts="yes", gguf_arch=conv["gguf_arch"], tensor_types=conv["tensor_types"],
               f32_fallback=conv["f32_fallback"])
    if load is None:
        tail = [ln for ln in err.splitlines() if ln.strip()][-1:] or [f"rc {rc}"]
        res.update(loads="no", error=f"llama.cpp process died (rc {rc}): {tail[0][:300]}")
    elif not load["ok"]:
        why = _llama_cpp_reason(str(folder), str(dst))
        res.update(loads="no", error=load["error"] + (f" [llama.cpp: {why}]" if why else ""))
    else:
        res["loads"] = "yes"
    return res


def run_case(case: ArchCase, work: Path, check_sources: bool = True) -> dict:
    row = {"model_type": case.model_type, "kind": case.kind, "converts": "no", "loads": "-", "error": ""}
    t0 = time.time()
    try:
        src, qws = build_case(case, work / f"{case.model_type}-q")
        row["modules"] = len(qws)
        row["bias_modules"] = sum(q.bias is not None for q in qws.values())
        if check_sources:   # the GPTQModel definition and "every linear but the routers" agree
            alt = set(quantized_names(defused_model(case), case, "linears"))
            if alt != set(qws):
                row["source_mismatch"] = sorted(alt ^ set(qws))[:4]
    except Exception as e:  # noqa: BLE001 - one row per case
        row["error"] = "building the checkpoint: " + one_line(e)
        return row
    row.update(attempt(src, work / f"{case.model_type}.gguf"))
    row["retries"] = []
    last = row

    def retry(what, r):
        nonlocal last
        row["retries"].append({"what": what, **r})
        row["error"] += (f" — retried {what}: converts {r['converts']}, loads {r['loads']}"
                         + (f": {r['error']}" if r["error"] else ""))
        last = r

    if last["converts"] == "no" and TOKENIZER_ERRORS.search(last["error"]):
        sp = work / f"{case.model_type}-q-sp"
        shutil.copytree(src, sp, dirs_exist_ok=True)
        shutil.copy(sentencepiece_model(work), sp / "tokenizer.model")
        retry("with a sentencepiece tokenizer.model added", attempt(sp, work / f"{case.model_type}-sp.gguf"))
    if last["loads"] != "yes" and case.model_type in VARIANTS:
        import dataclasses

        over, why = VARIANTS[case.model_type]
        variant = dataclasses.replace(case, config={**case.config, **over})
        try:
            vsrc, _ = build_case(variant, work / f"{case.model_type}-q-variant")
            r = attempt(vsrc, work / f"{case.model_type}-variant.gguf")
        except Exception as e:  # noqa: BLE001
            r = {"converts": "no", "loads": "-", "error": "building the checkpoint: " + one_line(e)}
        retry(f"with {', '.join(f'{k}={v}' for k, v in over.items())} ({why})", r)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def markdown(rows) -> str:
    out = ["| model type | converts | loads in llama.cpp | error |", "|---|---|---|---|"]
    for r in rows:
        err = r["error"].replace("|", "\\|")
        out.append(f"| `{r['model_type']}` | {r['converts']} | {r['loads']} | {err} |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        rest = argv[3:]
        return child(argv[1], argv[2], rest[rest.index("--exporter") + 1] if "--exporter" in rest else None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_types", nargs="*", help="cases to run (default: all of arch_cases.CASES)")
    ap.add_argument("--keep", help="write the checkpoints and GGUF files here (kept) instead of a temp dir")
    ap.add_argument("--json", help="also write the rows (with tensor types) as JSON here")
    ap.add_argument("--exporter", help="convert with this copy of converters/gguf_export.py instead "
                                       "(to try a proposed exporter fix)")
    args = ap.parse_args(argv)
    global EXPORTER
    EXPORTER = str(Path(args.exporter).resolve()) if args.exporter else None
    import logging

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)   # GPTQModel's / defuser's chatter; errors are in the rows
    cases = [case_named(t) for t in args.model_types] if args.model_types else CASES
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gguf-arch-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    try:
        for c in cases:
            r = run_case(c, work)
            rows.append(r)
            print(f"# {c.model_type}: converts {r['converts']}, loads {r['loads']} "
                  f"({time.time() - t0:.0f} s) {r['error'][:160]}", file=sys.stderr, flush=True)
            if not args.keep:
                for p in work.glob(f"{c.model_type}[-.]*"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(rows))
    print(f"\n{len(rows)} cases in {time.time() - t0:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
