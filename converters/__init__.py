"""Converters between quantized checkpoint formats (installed as ``effqat_plugin.converters``).

Formats (``FORMATS``): ``eqat`` (original EfficientQAT), ``gptq`` (v1), ``gptq_v2``, ``bitblas``,
``awq`` (gemm, 4-bit), ``compressed-tensors`` (pack-quantized, asymmetric group; vLLM).
Each is one module with a reader and a writer to and from :class:`effqat_plugin.QuantizedWeight`.

    convert(src, dst, to="gptq_v2")                     # streaming folder -> folder
    save_quantized(dst, fmt=..., qweights=..., tensors=..., config_dir_or_files=...)
    load_quantized(src) -> (fmt, qweights, tensors, quantize_config)
"""
from .convert import convert, load_quantized, save_quantized
from .detect import plan_folder
from .format_base import QuantFormat
from .registry import FORMATS, get_format, register

__all__ = ["convert", "save_quantized", "load_quantized", "plan_folder", "FORMATS", "QuantFormat",
           "get_format", "register"]
