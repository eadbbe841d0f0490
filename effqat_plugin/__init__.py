"""effqat: EfficientQAT (Block-AP + E2E-QP) as a GPTQModel quantizer plugin.

``from effqat_plugin import EQATConfig`` registers the EQAT method with GPTQModel (see
``integration``), so ``GPTQModel.load(model, EQATConfig(...)).quantize(...)`` runs EfficientQAT.
GPTQModel is imported lazily, on first use of EQATConfig, so the converters and kernels stay cheap
to import.
"""
from .env import prepare_runtime_env

prepare_runtime_env()

from .qweight import QuantFormatError, QuantizedWeight  # noqa: E402

__version__ = "0.1.0"
__all__ = ["EQATConfig", "QuantizedWeight", "QuantFormatError", "__version__"]


def __getattr__(name):
    if name == "EQATConfig":
        from .config import EQATConfig
        from .integration import register

        register()  # here, at the package entry, so that config.py need not import its integration
        return EQATConfig
    raise AttributeError(f"module 'effqat_plugin' has no attribute {name!r}")
