"""The exception family. The CLI prints `str(err)` on one line and exits non-zero."""


class FedLLMError(Exception):
    """Base class for every error fedllm raises on purpose."""


class ConfigError(FedLLMError):
    """A config key is unknown, mistyped, or out of range."""


class DataError(FedLLMError):
    """A data file or dataset is missing, unreadable, or lacks a configured field."""


class ModelError(FedLLMError):
    """A base model cannot be found, read, or converted."""


class PayloadError(FedLLMError):
    """A client reply or an encoded payload is malformed."""
