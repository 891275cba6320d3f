"""fedllm: federated fine-tuning of LLMs on Flower.

    from fedllm import Config, load_base_model
    cfg = Config.from_flat({"lora.rank": 16})
"""

from fedllm.config import Config, parse_overrides
from fedllm.errors import ConfigError, DataError, FedLLMError, ModelError, PayloadError
from fedllm.model import MODEL_CACHE, load_base_model

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "FedLLMError",
    "MODEL_CACHE",
    "ModelError",
    "PayloadError",
    "load_base_model",
    "parse_overrides",
]
