"""fedllm: federated fine-tuning of LLMs on Flower.

    from fedllm import Config, load_base_model
    cfg = Config.from_flat({"lora.rank": 16})
"""

import logging
import warnings

from fedllm.config import Config, parse_overrides
from fedllm.errors import ConfigError, DataError, FedLLMError, ModelError, PayloadError

__version__ = "0.1.0"

# bitsandbytes (imported by peft whenever it is installed) says at import that it could not fetch an
# optional CPU kernel from the Hugging Face hub (the `kernels` package); its own kernels run instead
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers 5 renames gradient checkpointing to activation checkpointing and warns whenever peft
# or trl call the old names; fedllm calls the new ones where they exist
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)


def __getattr__(name: str):
    """MODEL_CACHE and load_base_model import torch: only when asked for (a ClientApp that
    hands its messages to a warm worker never does)."""
    if name in ("MODEL_CACHE", "load_base_model"):
        from fedllm import model

        return getattr(model, name)
    raise AttributeError(f"module 'fedllm' has no attribute {name!r}")

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
