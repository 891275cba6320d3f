"""zo: FedKSeed's zeroth-order, seed-based full-parameter updates (K seeds, a few bytes a step)."""

from fedllm.methods.base import MethodSpec, register_method
from fedllm.methods.zo import config  # noqa: F401  (the [zo] section)
from fedllm.methods.zo.config import check_zo

register_method("zo", server="fedllm.methods.zo.server:ZOServer", client="fedllm.methods.zo.client:ZOClient",
                spec=MethodSpec(default_rule="fedavg", compression=False, dp=False, delta_kind="sums", secagg=True,
                                secagg_range=1024.0, secagg_agree=("zo-version", "zo-fingerprint"),
                                schedule=False, buffered=True, check=check_zo))
