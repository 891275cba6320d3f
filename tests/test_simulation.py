"""End to end: a real Flower simulation (Ray backend) of a tiny model, through the CLI."""

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import is_loopback, listening
from fedllm.simulation import LOCAL_RAY

pytestmark = pytest.mark.slow


def _fedllm(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "fedllm", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


def _fedllm_listening(*args, home: Path, timeout=900):
    """`fedllm ARGS` as `_fedllm` with HOME in `home`, and every TCP socket its processes (the engine,
    Ray's GCS, raylet, agents and workers) listened on, sampled twice a second while it ran."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": str(home)}
    env = {k: v for k, v in env.items() if k not in ("FLWR_HOME", "PYTEST_CURRENT_TEST") and not k.startswith("XDG_")}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fedllm", *args], stdout=out, stderr=err, text=True, env=env)
        seen, deadline = set(), time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= listening([proc.pid])
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()), seen


def test_two_clients_two_rounds(tiny_model_dir, tmp_path):
    sets = {
        "model.name": tiny_model_dir, "server.run-dir": tmp_path, "server.run-name": "e2e",
        "server.num-rounds": 2, "data.families": "parity,arithmetic,units",
        "data.train-per-family": 16, "data.eval-per-family": 4, "train.local-steps": 8,
        "train.lr": 0.02, "lora.dropout": 0.0, "server.exact-match-examples": 4,
        "server.max-new-tokens": 4, "server.merge": "true",
    }
    args = ["simulate", "--num-clients", "2"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    (tmp_path / "home").mkdir()
    proc, listens = _fedllm_listening(*args, home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a simulation on one machine: Ray's GCS, raylet, agents and workers listen on loopback only,
    # and nothing of Ray's or Flower's lands in HOME (no ~/.flwr/source, no ~/.ray), matplotlib's font
    # cache aside (the report's plots)
    assert any(name == "gcs_server" for name, _, _ in listens), listens
    assert all(is_loopback(address) for _, address, _ in listens), sorted(listens)
    home = tmp_path / "home"
    assert [p for p in home.rglob("*") if p.is_file() and ".cache/matplotlib" not in str(p.relative_to(home))] == []
    run = tmp_path / "e2e"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["eval-loss"] < rows[0]["eval-loss"] - 0.3
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and r["dropped"] == []
        assert len(r["bytes-up"]) == 2 and len(r["bytes-down"]) == 2
        assert all(b > 10_000 for b in r["bytes-up"].values())
        assert r["round-seconds"] > 0 and r["train-loss"] > 0
        partitions = sorted(c["partition-id"] for c in r["clients"].values())
        assert partitions == [0, 1]
        # Both virtual clients share one worker process, which loaded the model once.
        assert all(c["model-loads"] == 1 for c in r["clients"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval-loss-after"] == rows[2]["eval-loss"]
    assert "eval loss" in proc.stderr + proc.stdout

    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(run / "merged")
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)
        assert not torch.allclose(adapted(ids).logits, plain, atol=1e-3)  # the adapter was trained


@pytest.mark.parametrize(
    "sets, message",
    [
        (["lora.rnak=4"], "lora.rnak: unknown config key"),
        (["data.source=/no/such/file.jsonl"], "data.source: file not found: /no/such/file.jsonl"),
        (["model.name=/no/such/model.gguf"], "model.name: GGUF file not found"),
        (["server.strategy=fedmagic"], "server.strategy: unknown rule 'fedmagic'"),
        (["train.lr=fast"], "train.lr: expected float, got 'fast'"),
        (["train.method=zo", "server.strategy=krum"], "server.strategy: rule 'krum' does not aggregate 'sums' updates"),
        (["train.method=exact-lora", "compression.up=int8"], "compression.up/down: train.method=exact-lora does not take codecs"),
        (["compression.up=topk(2.0)"], "compression.up: topk: fraction must be in (0, 1]"),
        (["ledger.enabled=true", "ledger.chain=http://127.0.0.1:9"], "ledger.chain: no JSON-RPC node answers"),
        (["ledger.enabled=true", "ledger.owner-key=env:FEDLLM_NO_SUCH_KEY"],
         "ledger.owner-key: environment variable FEDLLM_NO_SUCH_KEY is not set"),
        (["ledger.enabled=true", "ledger.contract=0x1212121212121212121212121212121212121212"],
         "ledger.contract: no contract at"),
        (["ledger.penalties=free-rider=2"], "ledger.penalties: free-rider needs a fraction in [0, 1]"),
        (["attack.clients=1=evil"], "attack.clients: '1=evil' is not partition=kind"),
    ],
)
def test_bad_input_one_line_error(sets, message, tmp_path):
    proc = _fedllm("simulate", *[a for s in sets for a in ("--set", s)], "--set", f"server.run-dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fedllm: error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_field_in_data_file(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    proc = _fedllm("simulate", "--set", f"data.source={data}", "--set", "data.instruction-field=prompt",
                   "--set", "data.response-field=answer", "--set", f"server.run-dir={tmp_path / 'runs'}")
    assert proc.returncode == 2
    assert f"{data}: row 1 has no field 'answer'" in proc.stderr.strip().splitlines()[-1]


def test_zo_simulation_lowers_eval_loss(tiny_model_dir, tmp_path):
    """FedKSeed end to end: 2 clients, 3 rounds of full-parameter ZO on the tiny model."""
    sets = {
        "model.name": tiny_model_dir, "server.run-dir": tmp_path, "server.run-name": "zo",
        "train.method": "zo", "zo.num-seeds": 256, "zo.lr": 1e-4, "server.num-rounds": 3,
        "data.families": "parity", "data.train-per-family": 32, "data.eval-per-family": 8,
        "train.local-steps": 40, "server.exact-match-examples": 2, "server.max-new-tokens": 2,
        "server.merge": "true", "ledger.enabled": "true",
    }
    proc = _fedllm("simulate", "--num-clients", "2", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "zo"
    for r in range(1, 4):  # the ledger scores signed seed-scalar uploads alike
        clients = json.loads((run / "ledger" / f"round-{r:04d}.json").read_text())["clients"]
        assert len(clients) == 2 and all(c["flags"] == [] and c["score"] > 0 for c in clients)
        assert 10**18 - 2 <= sum(c["reward"] for c in clients) <= 10**18
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[3]["eval-loss"] < rows[0]["eval-loss"] - 0.5, [r.get("eval-loss") for r in rows]
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and r["zo-version"] == r["round"]
        # 40 (index, scalar) pairs in 8 bits: a 16-byte header + 80 index bytes + 40 value bytes
        assert all(b <= 16 + 40 * 3 for b in r["bytes-up"].values()), r["bytes-up"]
        assert all(b < 1000 for b in r["bytes-down"].values()), r["bytes-down"]
    state = (run / "zo" / "accumulators.bin").read_bytes()
    assert len(state) == 8 + 8 * 256  # the whole fine-tuned model, given the base: 2 KB
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_diloco_simulation_overlapped_and_quantized(tiny_model_dir, tmp_path):
    """Streaming DiLoCo in Flower's simulation (Ray): 2 fragments, the global merged one round
    late, 4-bit outer gradients and steps; every client keeps its state through the rounds."""
    sets = {
        "model.name": tiny_model_dir, "server.run-dir": tmp_path, "server.run-name": "diloco",
        "train.method": "diloco", "diloco.fragments": 2, "diloco.inner-steps": 4, "diloco.tau": 1,
        "diloco.alpha": 0.5, "compression.up": "quantize(4)", "compression.down": "quantize(4)", "train.lr": 0.002,
        "server.num-rounds": 4, "data.families": "parity,arithmetic", "data.train-per-family": 16,
        "data.eval-per-family": 4, "server.exact-match-examples": 2, "server.max-new-tokens": 2,
    }
    proc = _fedllm("simulate", "--num-clients", "2", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "diloco" / "metrics.jsonl").read_text().splitlines()]
    assert rows[4]["eval-loss"] < rows[0]["eval-loss"], [r.get("eval-loss") for r in rows]
    for r in rows[1:]:
        # round t syncs fragment t mod 2; the last round (4) syncs every fragment (-1: diloco.final-sync)
        assert r["clients-ok"] == 2 and r["diloco-fragment"] == (r["round"] % 2 if r["round"] < 4 else -1)
        assert all(c["diloco-resynced"] == 0 for c in r["clients"].values())
    assert (tmp_path / "diloco" / "model" / "config.json").is_file()


def _flwr_run(app: Path, tiny_model_dir, tmp_path, name: str) -> tuple[Path, str]:
    """`flwr run APP` with a tiny model; returns the run directory and the output.

    FLWR_HOME keeps Flower's config, apps and SuperLink database in tmp_path; the SuperLink
    that `flwr run` starts in the background is stopped afterwards, also on failure.
    """
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **LOCAL_RAY}  # Flower's Ray on loopback too
    overrides = (f"model.name='{tiny_model_dir}' server.run-dir='{tmp_path / 'runs'}' server.run-name='{name}' "
                 "server.num-rounds=2 data.families='parity,units' data.train-per-family=16 "
                 "data.eval-per-family=4 train.local-steps=6 train.lr=0.02 server.exact-match-examples=2")
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(app), "--run-config",
                               overrides, "--stream"], env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["pkill", "-f", str(home)], check=False)
    out = proc.stdout + proc.stderr
    run = tmp_path / "runs" / name
    assert (run / "summary.json").exists(), out[-3000:]
    return run, out


def test_flwr_run_local_simulation(tiny_model_dir, tmp_path):
    """`flwr run .` on Flower's own local simulation SuperLink, with run-config overrides."""
    run, out = _flwr_run(Path(__file__).resolve().parents[1], tiny_model_dir, tmp_path, "flwr")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["eval-loss"] < rows[0]["eval-loss"]
    assert all(r["clients-ok"] == 2 for r in rows[1:])
    assert "round 2/2" in out  # fedllm's progress reaches Flower's log stream


TINY_RUN = {
    "server.num-rounds": 2, "data.families": "parity,arithmetic,units", "data.train-per-family": 16,
    "data.eval-per-family": 4, "train.local-steps": 8, "train.lr": 0.02, "lora.dropout": 0.0,
    "server.exact-match-examples": 2, "server.max-new-tokens": 4,
}


def _simulate(tiny_model_dir, tmp_path, name, **sets):
    sets = {"model.name": tiny_model_dir, "server.run-dir": tmp_path, "server.run-name": name, **TINY_RUN, **sets}
    proc = _fedllm("simulate", "--num-clients", "2", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / name, [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_compressed_both_ways(tiny_model_dir, tmp_path):
    """Also folds the replies in a tree of two forked workers inside Ray's driver."""
    run, rows = _simulate(tiny_model_dir, tmp_path, "zip", **{
        "compression.up": "topk(0.2) > quantize(8) > zstd", "compression.down": "int8", "server.aggregation": "stream",
        "server.aggregators": 2})
    assert rows[2]["eval-loss"] < rows[0]["eval-loss"] - 0.3
    full = sum(t.numel() * 4 for t in load_file(run / "adapter" / "adapter_model.safetensors").values())
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and r["dropped"] == []
        assert all(0 < b < full / 8 for b in r["bytes-up"].values())  # the encoded payload's length
    assert all(b >= full for b in rows[1]["bytes-down"].values())  # round 1: the whole adapter
    assert all(b < full / 3 for b in rows[2]["bytes-down"].values())  # then the encoded round delta


def test_exact_lora_with_two_ranks(tiny_model_dir, tmp_path):
    run, rows = _simulate(tiny_model_dir, tmp_path, "exact", **{
        "train.method": "exact-lora", "lora.client-ranks": "2,4", "server.merge": "true"})
    assert rows[2]["eval-loss"] < rows[0]["eval-loss"] - 0.3
    for r in rows[1:]:
        assert sorted(c["lora-rank"] for c in r["clients"].values()) == [2, 4]
    assert [r["frozen-rank"] for r in rows[1:]] == [6, 12]  # 2 + 4 stacked per round, below min(in, out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(run / "merged")
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)


# without secagg in the heavy tier: the clipping mod alone is covered in process (test_dpo's client-side DP)
@pytest.mark.parametrize("secagg", [pytest.param(False, marks=pytest.mark.heavy), True])
def test_dp_clipping_bounds_the_global_step(tiny_model_dir, tmp_path, secagg):
    """With secagg too: the SecAgg+ stages through Ray's node contexts, the clipping mod inside
    the secagg mod."""
    from fedllm.config import ModelConfig
    from fedllm.methods.adapters.config import LoraConfig
    from fedllm.methods.adapters.engine import adapter_state, build_lora_model

    run, rows = _simulate(tiny_model_dir, tmp_path, "dp", **{
        "dp.clipping-norm": 0.05, "dp.noise-multiplier": 0.0, "secagg.enabled": secagg})
    assert all(r["clients-ok"] == 2 and r["dropped"] == [] for r in rows[1:])
    assert all(("secagg-weight" in r) == secagg for r in rows[1:])
    start = adapter_state(build_lora_model(ModelConfig(name=str(tiny_model_dir)), LoraConfig(dropout=0.0))[0])
    end = load_file(run / "adapter" / "adapter_model.safetensors")
    moved = torch.sqrt(sum(((end[k] - start[k]) ** 2).sum() for k in start)).item()
    assert 0.01 < moved <= 2 * 0.05 + 1e-4  # two rounds, each a mean of updates clipped to 0.05


def test_custom_strategy_example(tiny_model_dir, tmp_path):
    """examples/custom_strategy: a user strategy run by `flwr run` as its own Flower app."""
    example = Path(__file__).resolve().parents[1] / "examples" / "custom_strategy"
    assert len((example / "my_strategy.py").read_text().splitlines()) < 60
    run, _ = _flwr_run(example, tiny_model_dir, tmp_path, "mine")
    assert json.loads((run / "config.json").read_text())["server.strategy"] == "my_strategy:loss_weighted"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["eval-loss"] < rows[0]["eval-loss"] and all(r["clients-ok"] == 2 for r in rows[1:])


def test_ledger_rewards_honest_clients_and_slashes_a_free_rider_and_a_noise_client(smollm2_dir, tmp_path):
    """SmolLM2-135M, 5 clients (3 honest, partition 3 a free rider, partition 4 sends noise), the
    ledger on the in-process chain: honest clients are paid in proportion to their scores, the
    two dishonest ones are flagged every round and slashed, and `fedllm ledger` shows it."""
    sets = {
        "model.name": smollm2_dir, "server.run-dir": tmp_path, "server.run-name": "ledger",
        "server.num-rounds": 2, "server.min-clients": 5, "data.families": "parity,arithmetic,units",
        "data.train-per-family": 16, "data.eval-per-family": 4, "train.local-steps": 4,
        "server.exact-match-examples": 2, "server.max-new-tokens": 4, "ledger.enabled": "true",
        "attack.clients": "3=zero,4=noise", "ledger.reward-per-round": 2.0,
    }
    proc = _fedllm("simulate", "--num-clients", "5", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ledger"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    ETH = 10**18
    for r in rows:
        led = r["ledger"]
        assert led["gas-record"] > 0 and led["gas-slash"] > 0 and led["seconds"] > 0
        rnd = json.loads((run / "ledger" / f"round-{r['round']:04d}.json").read_text())
        by_part = {c["partition"]: c for c in rnd["clients"]}
        assert sorted(by_part) == [0, 1, 2, 3, 4]
        assert by_part[3]["flags"] == ["free-rider"] and by_part[4]["flags"] == ["noise"]
        assert all(by_part[p]["flags"] == [] and by_part[p]["score"] > 0.3 for p in (0, 1, 2))
        assert by_part[3]["reward"] == by_part[4]["reward"] == 0
        assert by_part[3]["slashed"] == by_part[4]["slashed"] == ETH // 2  # 0.5 of the 1 ETH stake
        honest = [by_part[p] for p in (0, 1, 2)]
        total_score = sum(c["score-fixed"] for c in honest)
        for c in honest:  # shares of the 2 ETH round reward, in proportion to the scores
            assert abs(c["reward"] - 2 * ETH * c["score-fixed"] // total_score) <= 1
        assert 2 * ETH - 3 <= rnd["reward"] <= 2 * ETH
    accounts = json.loads((run / "ledger" / "accounts.json").read_text())["accounts"]
    by_part = {a["partition"]: a for a in accounts.values()}
    for p in (0, 1, 2):
        assert by_part[p]["stake"] == ETH and by_part[p]["slashed"] == 0
        assert by_part[p]["claimed"] == by_part[p]["earned"] > ETH // 2 and by_part[p]["pending"] == 0
    for p in (3, 4):
        assert by_part[p]["stake"] == 0 and by_part[p]["slashed"] == ETH and by_part[p]["earned"] == 0
    view = _fedllm("ledger", str(run))
    assert view.returncode == 0, view.stderr
    lines = view.stdout.splitlines()
    assert "penalties: 4" in lines
    assert sum("free-rider" in line and "evidence 0x" in line for line in lines) == 2
    assert sum(" noise: 0.5000 ETH" in line for line in lines) == 2
    assert (run / "ledger" / "evidence").is_dir() and len(list((run / "ledger" / "evidence").iterdir())) == 4


def test_ledger_shapley_scores_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The validation-loss scorers run inside a round: GTG-Shapley with 3 clients, one a free rider."""
    sets = {
        "model.name": tiny_model_dir, "server.run-dir": tmp_path, "server.run-name": "shapley",
        "server.num-rounds": 1, "server.min-clients": 3, "data.families": "parity,arithmetic,units",
        "data.train-per-family": 8, "data.eval-per-family": 4, "train.local-steps": 4, "train.lr": 0.02,
        "server.evaluate": "false", "ledger.enabled": "true", "ledger.scorer": "shapley",
        "ledger.validation-examples": 6, "attack.clients": "2=zero", "ledger.slashed-to": "burn",
        "ledger.noise-z": 0.0,  # a random tiny model's honest updates barely align: no noise test here
    }
    proc = _fedllm("simulate", "--num-clients", "3", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rnd = json.loads((tmp_path / "shapley" / "ledger" / "round-0001.json").read_text())
    by_part = {c["partition"]: c for c in rnd["clients"]}
    assert by_part[2]["flags"] == ["free-rider"] and by_part[2]["score"] == 0.0
    assert all(math.isfinite(by_part[p]["score"]) and by_part[p]["score"] != 0.0 for p in (0, 1))
    assert json.loads((tmp_path / "shapley" / "ledger" / "accounts.json").read_text())["burned"] == 10**18 // 2
