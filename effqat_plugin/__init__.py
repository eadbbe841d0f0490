"""effqat: EfficientQAT (Block-AP + E2E-QP) as a GPTQModel quantizer plugin.

Importing this package registers the EQAT method with GPTQModel (see ``integration``), so
``GPTQModel.load(model, EQATConfig(...)).quantize(...)`` runs EfficientQAT.
"""
from .env import prepare_runtime_env

prepare_runtime_env()

from .qweight import QuantizedWeight, QuantFormatError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["QuantizedWeight", "QuantFormatError", "__version__"]
