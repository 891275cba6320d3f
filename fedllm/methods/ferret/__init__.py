"""ferret: Ferret's first-order local steps, projected onto K shared random bases a round (K coefficients
up and down), reconstructed alike by every party (Shu et al., ICML 2025)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm.methods.adapters.config import check_adapter
from fedllm.methods.base import MethodSpec, register_method
from fedllm.methods.ferret import config  # noqa: F401  (the [ferret] section)

if TYPE_CHECKING:
    from fedllm.config import Config


def check_ferret(cfg: Config, spec: MethodSpec) -> None:
    """The [lora] keys against the spec when ferret.params=lora (the adapter it trains); with
    ferret.params=all, server.merge is the result itself and lora.* is not read.

    Raises:
        ConfigError: naming the key that does not fit.
    """
    if cfg.ferret.params == "lora":
        check_adapter(cfg, spec)


# "dense": one (K,) coefficient vector a client, and all clients of a round project on the same bases,
# so coefficient j is the same direction for every client (coordinate-wise and distance rules apply);
# no server optimizer (the bases change every round: a moment in coefficient space means nothing),
# no codecs nor DP clipping (the upload is its own bytes), no secure aggregation (not yet).
register_method("ferret", server="fedllm.methods.ferret.server:FerretServer",
                client="fedllm.methods.ferret.client:FerretClient",
                spec=MethodSpec(default_rule="fedavg", delta_kind="dense", server_optimizers=False, compression=False,
                                dp=False, check=check_ferret,
                                why_sync="a reply's coordinates are on the random bases of the round it trained in"))
