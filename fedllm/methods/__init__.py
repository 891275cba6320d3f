"""Training methods, one closed folder each (both halves, its config section, its spec and checks),
registered by name.

    from fedllm.methods import METHODS, spec_of
    method = METHODS.get(cfg.train.method)       # Entry: impl.server(cfg), impl.client(cfg, context, pid)
    spec_of(cfg).compression                     # what the method works with (a MethodSpec)

Importing this package registers lora, exact-lora, zo, ferret, diloco and dpo, and their config sections,
without importing their engines (fedllm.config imports it to know every section).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# registration order is the order of their config sections: [lora], [zo], [diloco], [dpo]
from fedllm.methods import lora, exact_lora, zo, diloco, dpo, ferret  # noqa: F401, I001  (register)
from fedllm.methods.base import METHODS, ClientHalf, MethodSpec, ServerHalf, check_spec, register_method, spec_of

if TYPE_CHECKING:
    from fedllm.config import Config


def uses_pairs(cfg: Config) -> bool:
    """Whether train.method trains on preference pairs (its spec's preference: dpo)."""
    return spec_of(cfg).preference


def data_splits(cfg: Config) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) examples of data.* as train.method takes them: instruction examples, or
    preference pairs (each with a "rejected" answer)."""
    from fedllm.data import load_splits

    return load_splits(cfg.data, preference=uses_pairs(cfg))


__all__ = ["METHODS", "ClientHalf", "MethodSpec", "ServerHalf", "check_spec", "data_splits", "register_method",
           "spec_of", "uses_pairs"]
