"""diloco: Streaming DiLoCo (Douillard et al., 2023 and 2025): H inner AdamW steps per
fragment sync, P fragments synced in turn, an outer Nesterov SGD step on the server, the
arriving global merged tau rounds late; full parameters or a LoRA adapter."""

from fedllm.config import Config
from fedllm.methods.adapters.config import check_adapter
from fedllm.methods.base import MethodSpec, register_method
from fedllm.methods.diloco import config  # noqa: F401  (the [diloco] section)



def round_steps(cfg: Config) -> int:
    """A round's inner steps: H / P (the clock of train.lr-schedule)."""
    return cfg.diloco.round_steps()


register_method("diloco", server="fedllm.methods.diloco.server:DiLoCoServer",
                client="fedllm.methods.diloco.client:DiLoCoClient",
                spec=MethodSpec(default_rule="fedavg", dp=False, server_optimizers=False, secagg=True,
                                secagg_agree=("diloco-fragment",), round_steps=round_steps, check=check_adapter,
                                why_sync="its fragments, the late merge and the outer Nesterov step are clocked by rounds"))
