"""A user's own aggregation rule, plugged into fedllm's server: run with `flwr run .` here.

`loss_weighted` averages the clients' LoRA deltas with weights examples x exp(-train loss / T),
so clients whose data the model already fits well count a little more. A rule is a plain
function of the round's validated updates; everything else (sampling, decoding, validation,
the method's global state, evaluation, checkpoints, metrics) is fedllm's.
"""

from __future__ import annotations

import math

from fedllm.server.app import make_app
from strategies import RULES, Update, weighted_mean

TEMPERATURE = 1.0


def loss_weighted(updates: list[Update], cfg) -> dict:
    weights = [u.num_examples * math.exp(-u.metrics["train-loss"] / TEMPERATURE) for u in updates]
    return weighted_mean([u.delta for u in updates], weights)


loss_weighted.meta = {"accepts": {"dense"}}  # LoRA deltas (what `module:function` reads for the checks)
RULES.register("loss-weighted", loss_weighted, accepts={"dense"}, streams=False)  # also usable by name

# The ServerApp that `flwr run` starts: fedllm's, with this rule by module:function; chain a server
# optimizer after it with e.g. "my_strategy:loss_weighted > fedadam".
app = make_app({"server.strategy": "my_strategy:loss_weighted"})
