"""The ledger's flags inside a real round: a tiny model, the in-process chain, an attacker."""

from __future__ import annotations

import json


def test_a_sign_flipped_update_raises_the_validation_loss_and_is_flagged_harmful(tiny_model_dir, tmp_path):
    """The validation gains come from the method's own utility, evaluated on the held-out slice:
    the flipped update raises the loss where the honest ones lower it. ledger.noise-z is 0 (a
    random tiny model's honest updates barely align), so the flag is the gains' alone."""
    from conftest import tiny_run_config
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{
        "ledger.enabled": True, "ledger.noise-z": 0.0, "attack.clients": "3=sign-flip", "train.lr": 0.02,
        "server.evaluate": False, "server.num-rounds": 1})
    run_dir = run(LocalGrid(4), cfg)
    clients = json.loads((run_dir / "ledger" / "round-0001.json").read_text())["clients"]
    flags = {c["partition"]: c["flags"] for c in clients}
    assert flags == {0: [], 1: [], 2: [], 3: ["harmful"]}, flags
    off = tiny_run_config(tiny_model_dir, tmp_path, **{
        "ledger.enabled": True, "ledger.noise-z": 0.0, "attack.clients": "3=sign-flip", "train.lr": 0.02,
        "server.evaluate": False, "server.num-rounds": 1, "ledger.harmful-ratio": 0.0, "server.run-name": "off"})
    clients = json.loads((run(LocalGrid(4), off) / "ledger" / "round-0001.json").read_text())["clients"]
    assert all(c["flags"] == [] for c in clients)  # the test off: nothing else catches it here
