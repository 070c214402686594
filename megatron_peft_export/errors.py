"""One error hierarchy; every message says what was expected, what was found and what to do."""


class ExportError(Exception):
    """Base class for every error this package raises on purpose."""


class NoAdaptersError(ExportError):
    """The model holds no adapter tensors of a known dialect."""


class DialectError(ExportError):
    """Adapter tensors are of an unknown, mixed or unsupported dialect."""


class ShapeMismatchError(ExportError):
    """Adapter shapes contradict the model geometry or the HF config."""


class UnsupportedModelError(ExportError):
    """The HF model type has no architecture name map."""


class OutputError(ExportError):
    """The output directory exists, or cannot be written."""


class CollectiveError(ExportError):
    """A collective of the export failed: another rank died, or did not answer within the group's timeout."""


class NonFiniteError(ExportError):
    """Adapter tensors hold NaN or Inf values."""


class AdapterFileError(ExportError):
    """An HF PEFT adapter directory is missing, malformed, or contradicts itself."""
