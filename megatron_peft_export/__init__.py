"""Export Megatron LoRA/DoRA adapters to Hugging Face PEFT while training runs."""

from .errors import DialectError, ExportError, NoAdaptersError, OutputError, ShapeMismatchError, UnsupportedModelError
from .importer import load_hf_adapter
from .live import export_adapter, export_adapters
from .redact import install as _mask_secrets_in_logs

_mask_secrets_in_logs()

__version__ = "0.1.0"

__all__ = [
    "DialectError",
    "ExportError",
    "NoAdaptersError",
    "OutputError",
    "ShapeMismatchError",
    "UnsupportedModelError",
    "export_adapter",
    "export_adapters",
    "load_hf_adapter",
]
