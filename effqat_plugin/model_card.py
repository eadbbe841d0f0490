"""Model card (README.md with YAML front matter) for a checkpoint pushed by effqat.

The card says how the checkpoint was made (bits, group, Block-AP / E2E-QP settings and learning
rates actually used, calibration data), how well it does (the quality table from
``effqat_eval.json`` and the per-layer Block-AP losses, with their PNG plots when present), how
EfficientQAT compares with GPTQ and AutoRound at the same bits / group size (effqat's own benchmark
table, ``assets/reference_quality.json``, labelled as measured on another model), and how to load it
with GPTQModel (or, for the original EQAT layout, how to convert it).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from .jsonio import read_json_or_empty

FORMAT_NAMES = {"gptq": "GPTQ (v1 zero points, GPTQModel convention)", "gptq_v2": "GPTQ v2 (true zero points)",
                "bitblas": "BitBLAS", "eqat": "original EfficientQAT layout",
                "compressed-tensors": "compressed-tensors pack-quantized (asymmetric group)"}

# EQAT vs GPTQ / AutoRound on a small real model, per bits / group (scripts/bench_quality.py --json)
REFERENCE_QUALITY = Path(__file__).parent / "assets" / "reference_quality.json"

LICENSE_TEXT_HINTS = (
    (re.compile(r"\bMIT License\b|Permission is hereby granted, free of charge", re.I), "mit"),
    (re.compile(r"Apache License,?\s+Version 2\.0", re.I), "apache-2.0"),
    (re.compile(r"LLAMA 2 COMMUNITY LICENSE", re.I), "llama2"),
    (re.compile(r"LLAMA 3\.1 COMMUNITY LICENSE", re.I), "llama3.1"),
    (re.compile(r"META LLAMA 3 COMMUNITY LICENSE", re.I), "llama3"),
    (re.compile(r"GNU GENERAL PUBLIC LICENSE\s+Version 3", re.I), "gpl-3.0"),
    (re.compile(r"BSD 3-Clause", re.I), "bsd-3-clause"),
)


@dataclass
class CardInputs:
    folder: str
    repo_id: str
    info: object  # hub.CheckpointInfo
    base_model: Optional[str] = None
    license: Optional[str] = None
    marker: dict = field(default_factory=dict)
    files: List[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # {"calibration": "...", "related": {fmt: repo_id}}


def front_matter(text: str) -> dict:
    """YAML front matter of a README (``---`` ... ``---``), {} when none or invalid."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    import yaml

    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(base: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(license id, local LICENSE file) of the base model when it is a local folder, or a hub id whose
    README is in the local HF cache; (None, None) when unknown. Never touches the network."""
    if not base:
        return None, None
    folder = Path(base) if os.path.isdir(base) else None
    if folder is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "README.md")
            if isinstance(cached, str):
                folder = Path(cached).parent
        except Exception:  # noqa: BLE001 - any cache problem just means "unknown"
            folder = None
    if folder is None:
        return None, None
    lic = None
    readme = folder / "README.md"
    if readme.is_file():
        lic = front_matter(readme.read_text(encoding="utf-8", errors="replace")).get("license")
    lic_file = None
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE"):
        if (folder / name).is_file():
            lic_file = str(folder / name)
            break
    if lic is None and lic_file:
        text = Path(lic_file).read_text(encoding="utf-8", errors="replace")[:4000]
        lic = next((lid for rx, lid in LICENSE_TEXT_HINTS if rx.search(text)), "other")
    return (str(lic) if lic else None), lic_file


def loading_snippet(repo_id: str, fmt: Optional[str], kind: str) -> str:
    if kind == "fp":
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```')
    if fmt == "eqat":
        return ("This repository keeps the original EfficientQAT tensor layout, which GPTQModel does not read "
                "directly. Convert it to GPTQ once, then load it with GPTQModel:\n\n"
                "```bash\npip install effqat\n"
                f"huggingface-cli download {repo_id} --local-dir eqat-ckpt\n"
                "effqat convert eqat-ckpt gptq-ckpt --to gptq_v2\n```\n\n"
                "```python\nfrom gptqmodel import GPTQModel\n\nmodel = GPTQModel.load(\"gptq-ckpt\")\n```")
    if fmt == "compressed-tensors":   # not a GPTQModel layout: transformers (tested) and vLLM (not tested)
        return ("compressed-tensors `pack-quantized` weights (per group; asymmetric unless quantized with "
                "`--sym`), the layout vLLM serves 4/8-bit group-quantized weights from (not tested by effqat). "
                "With transformers, dequantized when loaded (its default route does not load the asymmetric "
                "form yet):\n\n"
                "```python\nfrom transformers import AutoModelForCausalLM, CompressedTensorsConfig\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", '
                "quantization_config=CompressedTensorsConfig(dequantize=True))\n```\n\n"
                f"```bash\nvllm serve {repo_id}\n```")
    backend = ""
    imports = "from gptqmodel import GPTQModel"
    note = ""
    if fmt == "bitblas":
        imports = "from gptqmodel import BACKEND, GPTQModel"
        backend = ", backend=BACKEND.BITBLAS"
        note = "\n\nBitBLAS kernels need a CUDA GPU and the `bitblas` package."
    return ("```python\n" + imports + "\n\n"
            f'model = GPTQModel.load("{repo_id}"{backend})\n'
            'tokens = model.generate("The capital of France is")[0]\n'
            "print(model.tokenizer.decode(tokens))\n```" + note)


def _lr_search_note(searches) -> str:
    """' (lr scale by held-out loss: layer 0 32/64/128 -> 128, layer 8 64/128 -> 64)' when the search ran."""
    if not searches:
        return ""
    parts = []
    for search in searches:
        trials = search.get("trials") or []
        if trials:
            best = min(trials, key=lambda t: t.get("val_loss", float("inf")))
            parts.append(f"layer {search.get('layer')} " + "/".join(f"{t.get('scale', 0):g}" for t in trials)
                         + f" -> {best.get('scale', 0):g}")
    return " (lr scale by held-out loss: " + ", ".join(parts) + ")" if parts else ""


def reference_section(bits: int, group: int, path=REFERENCE_QUALITY) -> List[str]:
    """Card lines comparing EQAT with GPTQ and AutoRound at this checkpoint's bits / group size, from
    the benchmark table shipped with effqat (``scripts/bench_quality.py --json``, on a small real
    model); [] when that table has no such config or cannot be read."""
    ref = read_json_or_empty(path)
    rows = (ref.get("configs") or {}).get(f"w{bits}g{group}") or []
    if not rows:
        return []
    evaluation = ref.get("evaluation") or {}
    cols = list(evaluation)
    body = ([("fp32 (unquantized)", ref["fp"], None)] if ref.get("fp") else []) + [
        (r.get("label", r.get("method")), r.get("ppl") or {}, r.get("cpu_time_vs_gptq")) for r in rows]
    what = ", ".join(f"{c} ({d})" for c, d in evaluation.items())
    out = ["## EfficientQAT against GPTQ and AutoRound (reference, not this model)", "",
           f"Measured by effqat's `{ref.get('made_by', 'scripts/bench_quality.py')}` on {ref.get('model')} at "
           f"w{bits}g{group}, every method on the same calibration ({ref.get('calibration')}); perplexity (lower "
           f"is better) on {what}. Every quantized row is a checkpoint reloaded through GPTQModel. It shows how "
           "the methods compare, not how this checkpoint does (see Quality).", "",
           "| method | " + " | ".join(f"{c} ppl" for c in cols) + " | quantization CPU time / GPTQ |",
           "|---|" + "---|" * (len(cols) + 1)]
    out += ["| " + " | ".join([label, *(f"{ppl[c]:,.2f}" if c in ppl else "-" for c in cols),
                               f"{ratio:.2f}x" if ratio else "-"]) + " |" for label, ppl, ratio in body]
    return out + [""]


def _fmt_num(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _yaml_block(meta: dict) -> str:
    import yaml

    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False).strip()


def render_card(inp: CardInputs) -> str:
    from .reports import BLOCK_AP_PNG, QUALITY_PNG, eqat_meta, format_table, results_for_card, table_from_results

    info = inp.info
    eqat = eqat_meta(inp.folder) if info.kind == "quantized" else {}
    settings = eqat.get("settings") or {}
    bits = info.bits or settings.get("bits")
    group = info.group_size or settings.get("group_size")
    fmt = info.fmt
    name = inp.repo_id.split("/")[-1]

    tags = ["quantization", "efficientqat", "gptq"]
    if bits:
        tags.append(f"{bits}-bit")
    if fmt == "bitblas":
        tags.append("bitblas")
    if fmt == "compressed-tensors":
        tags = [t for t in tags if t != "gptq"] + ["compressed-tensors"]
    meta: dict = {"library_name": "transformers" if fmt == "compressed-tensors" else "gptqmodel"}
    if inp.base_model:
        meta["base_model"] = inp.base_model
        if info.kind == "quantized":
            meta["base_model_relation"] = "quantized"
    meta["tags"] = tags
    if inp.license:
        meta["license"] = inp.license
    meta["pipeline_tag"] = "text-generation"

    out = [f"---\n{_yaml_block(meta)}\n---", "", f"# {name}", ""]
    base_txt = (f"[{inp.base_model}](https://huggingface.co/{inp.base_model})"
                if inp.base_model and re.fullmatch(r"[\w.-]+/[\w.-]+", inp.base_model)
                else f"`{inp.base_model}`" if inp.base_model else "the base model")
    if info.kind == "quantized":
        out.append(f"{base_txt} quantized to **{bits}-bit weights with group size {group}** by "
                   f"[EfficientQAT](https://arxiv.org/abs/2407.11062) (Block-AP + E2E-QP), stored in the "
                   f"**{FORMAT_NAMES.get(fmt, fmt)}** format. Made with effqat "
                   f"(`{eqat.get('quantizer', 'effqat')}`), the EfficientQAT plugin for GPTQModel.")
    else:
        out.append(f"Full-precision checkpoint ({info.model_type}) pushed with effqat.")
    related = (inp.extra or {}).get("related") or {}
    if related:
        out += ["", "Other formats of the same quantized weights: " + ", ".join(
            f"[{f}](https://huggingface.co/{r})" for f, r in sorted(related.items()) if r != inp.repo_id)]
    out.append("")

    out += ["## Usage", "", loading_snippet(inp.repo_id, fmt, info.kind), ""]

    if info.kind == "quantized":
        out += ["## How it was made", ""]
        rows = [("method", eqat.get("method", "EfficientQAT (Block-AP + E2E-QP), arXiv 2407.11062")),
                ("bits / group size", f"{bits} / {group}"),
                ("format", FORMAT_NAMES.get(fmt, fmt))]
        if info.bits and avg_bits(info.bits, info.group_size) is not None:
            rows.append(("average bits per weight", f"{avg_bits(info.bits, info.group_size):.2f} (fp16 scales, "
                                                    f"{info.bits}-bit zero points)"))
        blk = eqat.get("block_ap") or {}
        if settings:
            rows.append(("Block-AP", f"{settings.get('block_epochs')} epoch(s), batch {settings.get('block_batch_size')}, "
                                     f"lr {_fmt_num(blk.get('quant_lr'))} (s, z) / {_fmt_num(blk.get('weight_lr'))} "
                                     f"(weights, norms){_lr_search_note(blk.get('lr_search'))}, "
                                     f"early stop {settings.get('block_early_stop') or 'off'}"
                                     f"{', loss ' + settings['block_loss'] if settings.get('block_loss', 'mse') != 'mse' else ''}"))
            e2e = eqat.get("e2e_qp")
            if e2e:
                epochs = e2e.get("epochs_run") or settings.get("e2e_epochs")   # trained (auto may add epochs)
                rows.append(("E2E-QP", f"{epochs} epoch(s), {e2e.get('steps')} steps, batch "
                                       f"{settings.get('e2e_batch_size')}, lr {_fmt_num(e2e.get('lr'))}, trains step "
                                       f"sizes{' and zero points' if settings.get('e2e_train_zeros') else ''}"))
            else:
                rows.append(("E2E-QP", "off" if settings.get("e2e_epochs") == 0 else "see below"))
            rows.append(("learning-rate preset", str(settings.get("lr_preset"))))
            rows.append(("seed", str(settings.get("seed"))))
        cal = eqat.get("calibration") or {}
        source = (inp.extra or {}).get("calibration") or (inp.marker or {}).get("calibration")
        if cal or source:
            desc = (f"{cal.get('train_samples')} train + {cal.get('val_samples')} validation sequences of "
                    f"{cal.get('seq_len')} tokens" if cal else "")
            if source:
                desc = f"{desc} from {source}" if desc else str(source)
            rows.append(("calibration data", desc))
        e2e_src = (inp.marker or {}).get("e2e_data")
        if e2e_src:
            rows.append(("E2E-QP data", str(e2e_src)))
        sg_row = self_generated_row(cal)
        if sg_row:
            rows.append(("self-generated samples", sg_row))
        if eqat.get("seconds") is not None:
            rows.append(("quantization time", f"{eqat['seconds']:.0f} s"))
        out += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
        if cal.get("self_generated_skipped"):
            from .self_generated import COST

            out += [f"**Note: trained without self-generated samples: {cal['self_generated_skipped']}.** "
                    f"The default recipe also trains both phases on text the full-precision model writes; {COST}.",
                    ""]

    data = results_for_card(inp.folder)
    table = data.get("table") if data else None
    if not table and data.get("results"):
        table = table_from_results(name, data)
    out += ["## Quality", ""]
    if table and table.get("rows"):
        out += ["Perplexity (lower is better) and zero-shot accuracy (`acc`, higher is better), measured by "
                "`effqat eval` on the data named in each column.", "", format_table(table, markdown=True), ""]
        if QUALITY_PNG in inp.files:
            out += [f"![quality]({QUALITY_PNG})", ""]
    else:
        out += ["Not evaluated yet (run `effqat eval` on the folder before pushing).", ""]

    if info.kind == "quantized" and bits and group:
        out += reference_section(int(bits), int(group))

    layers = (eqat.get("block_ap") or {}).get("layers") or []
    if layers:
        out += ["## Block-AP per-layer loss", "",
                "MSE between each quantized decoder layer's output and the full-precision layer's output.", "",
                "| layer | train MSE | validation MSE | steps |", "|---|---|---|---|"]
        out += [f"| {r.get('index')} | {_fmt_num(r.get('train_loss'))} | {_fmt_num(r.get('val_loss'))} | "
                f"{r.get('steps', '-')} |" for r in layers]
        out.append("")
        if BLOCK_AP_PNG in inp.files:
            out += [f"![Block-AP loss]({BLOCK_AP_PNG})", ""]
        e2e = eqat.get("e2e_qp") or {}
        if e2e.get("val_loss_before") is not None and e2e.get("val_loss_after") is not None:
            out += [f"E2E-QP validation perplexity: {math.exp(e2e['val_loss_before']):.2f} before, "
                    f"{math.exp(e2e['val_loss_after']):.2f} after.", ""]

    out += ["## Files", ""] + [f"- `{f}`" for f in inp.files] + [""]
    out += ["## Citation", "", "```bibtex",
            "@article{efficientqat,",
            "  title={EfficientQAT: Efficient Quantization-Aware Training for Large Language Models},",
            "  author={Chen, Mengzhao and Shao, Wenqi and Xu, Peng and Wang, Jiahao and Gao, Peng and "
            "Zhang, Kaipeng and Luo, Ping},",
            "  journal={arXiv preprint arXiv:2407.11062},", "  year={2024}", "}", "```", ""]
    return "\n".join(out)


def self_generated_row(cal: dict) -> Optional[str]:
    """The card's line on the self-generated samples (meta.eqat calibration): how many, from where,
    or that there were none and why."""
    if cal.get("self_generated_skipped"):
        return f"none: {cal['self_generated_skipped']}"
    n = cal.get("self_generated")
    if not n:
        return None
    src = cal.get("self_generated_source") or {}
    if src.get("source") == "file":
        return f"{n} sequences from `{src.get('file')}` (sha256 {str(src.get('sha256'))[:16]}…)"
    if src.get("source") == "sampled":
        return (f"{n} sequences the fp model wrote (sampler seed {src.get('seed')}, {src.get('dtype')}, "
                f"{src.get('placement')})")
    return f"{n} sequences the fp model wrote"


def avg_bits(bits: Optional[int], group: Optional[int]) -> Optional[float]:
    if not bits or not group or group <= 0:
        return None
    return bits + (bits + 16) / group


def write_card(folder, card: str) -> str:
    path = os.path.join(folder, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return path


__all__ = ["CardInputs", "render_card", "front_matter", "base_license", "loading_snippet", "write_card"]
