"""compressed-tensors ``pack-quantized``, ``group`` strategy: what vLLM serves for group-quantized
weights (and what llm-compressor writes). Asymmetric, or symmetric for ``--sym`` models.

Per quantized linear ``<name>`` (tensors made by the package's own ``PackedQuantizationCompressor``):
  weight_packed     int32 ``[out, ceil(in*b/32)]``: codes ``q - 2^(b-1)`` as signed ints, stored by
                    ``pack_to_int32`` as one dense little-endian bit stream per row (the offset is
                    added back when packing, so the stored fields are EfficientQAT's ``q``);
  weight_zero_point int32 ``[ceil(out*b/32), G]``: ``z - 2^(b-1)``, packed the same way along out;
  weight_scale      fp16 ``[out, G]``: ``s``;   weight_shape int64 ``[2]``: ``(out, in)``;
  optional bias.
Dequantization (the package's ``dequantize``): ``(q' - z') * s = (q - z) * s``, EfficientQAT's weight.
Symmetric (``symmetric: true``, written when every zero point is ``2^(b-1)``: ``WriteContext.sym``):
no ``weight_zero_point`` (the package drops it, vLLM takes none); ``z' = 0`` is implied, i.e.
``z = 2^(b-1)``, and symmetric folders from llm-compressor are read the same way.
The group strategy needs ``in`` to be a multiple of the group size (the package refuses others), and
there is no act-order here: such modules are refused before anything is written.

``config.json``'s ``quantization_config`` is the package's own serialization of a
``QuantizationConfig`` (``ModelCompressor.update_config``): one config group targeting ``Linear`` at
the folder's bits / group size, one more per distinct per-module override (exact module names, which
compressed-tensors and vLLM match before class names), unquantized 2-D weights (and ``lm_head``) in
``ignore``. ``quantize_config.json`` carries the same plus effqat's ``meta``.
"""
from __future__ import annotations

import json
import re
import tempfile
from functools import lru_cache

import torch

from effqat_plugin.qweight import QuantFormatError

from .format_base import (ModuleSpec, QuantFormat, WriteContext, check_codes, check_finite_scales, declared_sym,
                       g_idx_is_default, make_qweight)

PACK_FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"


def _ct():
    """The compressed-tensors names used here, imported on first use: the package imports transformers
    (about 11 s on the 2-core dev machine), which every other effqat command would pay at start-up."""
    try:
        from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
        from compressed_tensors.compressors.pack_quantized import (PackedQuantizationCompressor,
                                                                   unpack_from_int32)
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                     QuantizationScheme, QuantizationStatus)
    except ImportError as e:  # pragma: no cover - it is an install requirement
        raise QuantFormatError(f"the compressed-tensors format needs the compressed-tensors package: {e}") from None
    return {"ModelCompressor": ModelCompressor, "Compressor": PackedQuantizationCompressor,
            "unpack": unpack_from_int32, "Args": QuantizationArgs, "Config": QuantizationConfig,
            "Scheme": QuantizationScheme, "Status": QuantizationStatus}


@lru_cache(maxsize=None)
def scheme_for(bits: int, group_size: int, targets: tuple = ("Linear",), symmetric: bool = False):
    """The package's scheme for EfficientQAT's weights: int, group strategy, weights only."""
    ct = _ct()
    args = ct["Args"](num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size,
                      dynamic=False, actorder=None)
    return ct["Scheme"](targets=list(targets), weights=args, format=PACK_FORMAT)


def _words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


class CompressedTensorsFormat(QuantFormat):
    name = "compressed-tensors"
    description = "compressed-tensors pack-quantized, asymmetric group (vLLM, llm-compressor, transformers)"
    suffixes = ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape", "bias")
    required = ("weight_packed", "weight_scale", "weight_shape")   # + weight_zero_point unless symmetric

    # --- metadata ----------------------------------------------------------------------------
    def module_geometry(self, name, shapes, bits):
        if "weight_scale" not in shapes or len(shapes["weight_scale"]) != 2:
            raise QuantFormatError(f"{name}: weight_scale missing or not 2-D")
        out, g = shapes["weight_scale"]
        return 0, int(out), int(g), False   # in = groups x group size; decided with the group

    def in_candidates(self, bits, shapes):
        cols = int(shapes["weight_packed"][1])
        return [n for n in range(cols * 32 // bits, (cols - 1) * 32 // bits, -1) if _words(n, bits) == cols]

    def geometry_ok(self, in_features: int, group: int) -> bool:
        return group > 0 and in_features % group == 0

    def shapes_for(self, bits, in_features, out_features, groups):
        return {"weight_packed": (out_features, _words(in_features, bits)),
                "weight_zero_point": (_words(out_features, bits), groups),
                "weight_scale": (out_features, groups)}

    # --- folder config -----------------------------------------------------------------------
    def folder_params(self, qcfg):
        """bits / group size of the ``Linear`` config group, the others as ``dynamic`` overrides."""
        if not qcfg:
            return {}
        if str(qcfg.get("format", PACK_FORMAT)) != PACK_FORMAT:
            raise QuantFormatError(f"compressed-tensors format {qcfg.get('format')!r} is not supported "
                                   f"(only {PACK_FORMAT!r})")
        out, dynamic, symmetric = {}, {}, set()
        for gname, group in (qcfg.get("config_groups") or {}).items():
            w = (group or {}).get("weights") or {}
            self._check_scheme(gname, group or {}, w)
            symmetric.add(bool(w.get("symmetric", True)))
            over = {"bits": int(w["num_bits"]), "group_size": int(w["group_size"])}
            for t in group.get("targets") or []:
                if t == "Linear":
                    out.update(over)
                elif t.startswith("re:"):
                    dynamic[f"+:{t[3:]}"] = over
                else:
                    dynamic[f"+:^{re.escape(t)}$"] = over
        if dynamic:
            out["dynamic"] = dynamic
        if len(symmetric) > 1:
            raise QuantFormatError("compressed-tensors config groups mix symmetric and asymmetric weights; "
                                   "not supported")
        if symmetric == {True}:
            out["ct_symmetric"] = out["sym"] = True
        elif declared_sym(qcfg):   # stored asymmetric, but every zero point is 2^(b-1) (meta.sym)
            out["sym"] = True
        return out

    @staticmethod
    def _check_scheme(gname, group, w):
        fmt = group.get("format") or PACK_FORMAT
        bad = []
        if fmt != PACK_FORMAT:
            bad.append(f"format {fmt!r}")
        if w.get("type", "int") != "int":
            bad.append(f"type {w.get('type')!r}")
        if w.get("strategy") != "group":
            bad.append(f"strategy {w.get('strategy')!r}")
        if w.get("actorder") not in (None, False):
            bad.append(f"actorder {w.get('actorder')!r}")
        if group.get("input_activations") or group.get("output_activations"):
            bad.append("activation quantization")
        if bad:
            raise QuantFormatError(f"compressed-tensors config group {gname!r}: {', '.join(bad)} is not "
                                   "supported (only int group weights, pack-quantized)")

    def quantize_config(self, ctx: WriteContext, meta):
        cfg = self._hf_config(ctx)
        cfg["meta"] = meta
        return cfg

    def hf_quantization_config(self, ctx, qcfg):
        return {k: v for k, v in qcfg.items() if k != "meta"}

    def _hf_config(self, ctx: WriteContext) -> dict:
        """``quantization_config`` exactly as ``ModelCompressor.update_config`` writes it."""
        ct = _ct()
        sym = ctx.sym
        groups = {"group_0": scheme_for(ctx.bits, ctx.group_size, symmetric=sym)}
        by_override = {}
        for name, over in sorted(ctx.module_overrides.items()):
            key = (over.get("bits", ctx.bits), over.get("group_size", ctx.group_size))
            by_override.setdefault(key, []).append(name)
        for i, ((b, g), names) in enumerate(sorted(by_override.items()), start=1):
            groups[f"group_{i}"] = scheme_for(b, g, tuple(names), symmetric=sym)
        ignore = sorted({"lm_head", *ctx.plain_weights})
        qc = ct["Config"](config_groups=groups, format=PACK_FORMAT, ignore=ignore,
                          quantization_status=ct["Status"].COMPRESSED)
        with tempfile.TemporaryDirectory(prefix=".effqat-ct-") as d:
            ct["ModelCompressor"](quantization_config=qc).update_config(d)
            with open(f"{d}/config.json", encoding="utf-8") as f:
                return json.load(f)["quantization_config"]

    # --- capabilities ------------------------------------------------------------------------
    def group_compatible(self, spec: ModuleSpec, group: int) -> bool:
        return self.geometry_ok(spec.in_features, group) and spec.group_ok(group)

    def check_folder(self, ctx, specs):
        for s in specs:
            g = s.group_size
            if g <= 0 or s.in_features % g:
                what = "per-channel (group size -1)" if g <= 0 else f"group size {g}"
                raise QuantFormatError(
                    f"{s.name}: compressed-tensors' group strategy needs in_features a multiple of the group "
                    f"size; in_features={s.in_features} does not fit {what}; use gptq_v2 or eqat for this model")

    # --- data --------------------------------------------------------------------------------
    def read(self, get, spec: ModuleSpec, params):
        name, bits = spec.name, spec.bits
        symmetric = bool(params.get("ct_symmetric"))
        t = {k: get(k) for k in self.required + (() if symmetric else ("weight_zero_point",))}
        for k, v in t.items():
            if v is None:
                raise QuantFormatError(f"{name}: tensor {name}.{k} is missing")
        if symmetric and get("weight_zero_point") is not None:
            raise QuantFormatError(f"{name}: the config says symmetric, but the module stores weight_zero_point "
                                   "(which symmetric readers ignore): contradictory folder")
        exp = self.shapes_for(bits, spec.in_features, spec.out_features, spec.n_groups)
        for k, shape in exp.items():
            if k in t and tuple(t[k].shape) != shape:
                raise QuantFormatError(
                    f"{name}.{k} has shape {tuple(t[k].shape)}, expected {shape} for compressed-tensors at "
                    f"bits={bits}, group_size={spec.group_size}: wrong config or corrupt tensors")
        if any(t[k].dtype != torch.int32 for k in ("weight_packed", "weight_zero_point") if k in t):
            raise QuantFormatError(f"{name}: weight_packed / weight_zero_point must be int32")
        shape = [int(v) for v in t["weight_shape"].reshape(-1).tolist()]
        if shape != [spec.out_features, spec.in_features]:
            raise QuantFormatError(f"{name}.weight_shape is {shape}, the other tensors give "
                                   f"{[spec.out_features, spec.in_features]}")
        scales = t["weight_scale"]
        if not scales.is_floating_point():
            raise QuantFormatError(f"{name}.weight_scale must be floating point, got {scales.dtype}")
        check_finite_scales(name, scales)
        unpack, off = _ct()["unpack"], 1 << (bits - 1)
        q = unpack(t["weight_packed"], bits, torch.Size(shape)).to(torch.int16) + off
        if symmetric:
            z = torch.full((spec.out_features, spec.n_groups), off, dtype=torch.int16)
        else:
            z = unpack(t["weight_zero_point"], bits, torch.Size((spec.out_features, spec.n_groups)),
                       packed_dim=0).to(torch.int16) + off
        return make_qweight(q.to(torch.uint8), z.to(torch.uint8), scales.contiguous(), bits,
                            spec.group_size, None, get("bias"), name)

    def write(self, qw, stored_bits, ctx: WriteContext):
        """The package's compressor on the exact weight ``(q - z) * s``: fp16 ``s`` times an integer
        of at most 8 bits is exact in fp32, so its ``round(W / s) + z'`` gives back ``q - 2^(b-1)``.
        Groups with ``s == 0`` (any ``q`` dequantizes to 0) are divided by 1 instead, so their codes
        survive too; the stored scale is the real one. ``ctx.sym`` (zero points all ``2^(b-1)``, checked
        by the caller): the symmetric scheme, no zero point stored."""
        check_codes(qw, "module")
        if not g_idx_is_default(qw, qw.group_size):
            raise QuantFormatError("compressed-tensors pack-quantized (group strategy) has no act-order: "
                                   "g_idx must be i // group_size")
        b, g = stored_bits, qw.group_size
        if g <= 0 or qw.in_features % g:
            raise QuantFormatError(f"compressed-tensors' group strategy needs in_features ({qw.in_features}) "
                                   f"a multiple of the group size ({g})")
        off = 1 << (b - 1)
        s16 = qw.scales.to(torch.float16).contiguous()
        s_div = torch.where(s16 == 0, torch.ones_like(s16), s16)
        zi = qw.zeros.to(torch.int16)
        codes = qw.int_weight.to(torch.int16) - zi.repeat_interleave(g, dim=1)
        weight = codes.float() * s_div.float().repeat_interleave(g, dim=1)
        sd = {"weight": weight, "weight_scale": s_div}
        if not ctx.sym:
            sd["weight_zero_point"] = (zi - off).to(torch.int8)
        out = _ct()["Compressor"].compress(sd, scheme_for(b, g, symmetric=ctx.sym))
        tensors = {"weight_packed": out["weight_packed"].contiguous()}
        if not ctx.sym:
            tensors["weight_zero_point"] = out["weight_zero_point"].contiguous()
        tensors["weight_scale"] = s16
        tensors["weight_shape"] = out["weight_shape"].to(torch.int64).contiguous()
        if qw.bias is not None:
            tensors["bias"] = qw.bias.to(torch.float16).contiguous()
        return tensors


FORMATS = (CompressedTensorsFormat(),)
