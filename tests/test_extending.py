"""Extending fedllm touches one place each: a rule, a server optimizer, a codec, a method (with its
own config section, from its own folder), a contribution scorer, a tracker, a metric and an attack
are each added here, in this file alone, and run through fedllm's own
server loop, strategy adapter, codec chain or ledger."""

from __future__ import annotations

import contextlib
import re
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from conftest import reply_to, tiny_run_config
from fedllm.compression import CODECS, decode, encode, parse, register_codec
from fedllm.compression.codecs import Codec
from fedllm.config import Config
from fedllm.ledger.scoring import SCORERS, register_scorer
from fedllm.errors import ConfigError, PayloadError
from fedllm.server.grid import LocalGrid
from fedllm.methods import METHODS, register_method
from fedllm.methods.adapters.server import LoraServer
from fedllm.protocol import ARRAYS, LEDGER, METRICS, Update, check_like, read_arrays, reply_metrics
from strategies import OPTIMIZERS, RULES, ServerOpt, build

pytestmark = pytest.mark.usefixtures("task_identity")

GLOBAL = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}


def _reply(node, local, n=10.0):
    return reply_to(node, RecordDict({ARRAYS: ArrayRecord(local), METRICS: MetricRecord(
        {"num-examples": n, "train-loss": 1.0, "server-round": 1})}))


# (a) a rule: sign-SGD (Bernstein et al., 2018): the sign of the mean delta, times a step
def sign_sgd(updates: list[Update], cfg: Config) -> dict[str, torch.Tensor]:
    mean = {k: sum(u.delta[k] for u in updates) / len(updates) for k in updates[0].delta}
    return {k: 0.1 * torch.sign(t) for k, t in mean.items()}


# (b) a server optimizer: plain server SGD with a fixed lr of 2 and a round counter as its state
DOUBLE = ServerOpt(init=lambda d, cfg: 0, update=lambda d, n, cfg: ({k: 2 * t for k, t in d.items()}, n + 1))


def test_a_new_rule_and_a_new_optimizer_chain(task_identity):
    cfg = Config.from_flat({"server.strategy": "sign-sgd > double"})
    s = build(cfg, LoraServer(cfg, GLOBAL))
    result = s.round(1, [_reply(1, {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[0.0]])}),
                         _reply(2, {"a": torch.tensor([2.0, 1.5]), "b": torch.tensor([[0.0]])})])
    # mean delta (1.5, -0.75), 0: sign (1, -1), 0; x 0.1; doubled
    assert result.applied and torch.allclose(s.method.state["a"], torch.tensor([1.2, 1.8]))
    assert torch.equal(s.method.state["b"], GLOBAL["b"])
    assert s.state_dict()["chain"]["optimizers"] == {"0:double": 1}


# (c) a codec stage: float16 values (half the bytes, lossless for values float16 holds)
def fp16() -> Codec:
    return Codec("fp16()", lambda frame, rng: {**frame, "v": frame["v"].astype(np.float16)},
                 lambda frame: {**frame, "v": frame["v"].astype(np.float32)})


def test_a_new_codec_in_a_chain_through_the_strategy():
    cfg = Config.from_flat({"compression.up": "fp16 > zstd"})
    delta = {"a": torch.tensor([0.5, -0.25]), "b": torch.tensor([[0.125]])}
    payload = encode(parse("fp16 > zstd"), delta, 0)
    assert decode(parse("fp16 > zstd"), payload, sorted(delta))["a"].tolist() == [0.5, -0.25]
    s = build(cfg, LoraServer(cfg, GLOBAL))
    reply = reply_to(1, RecordDict({"update": ConfigRecord({"payload": payload}), METRICS: MetricRecord(
        {"num-examples": 1.0, "server-round": 1})}))
    assert s.round(1, [reply]).applied and torch.equal(s.method.state["a"], torch.tensor([1.5, 1.75]))


# (d) a method: "identity" clients send the global state back (a zero update); the server keeps a
# dense state. Registered here, it runs through fedllm's server loop and client unchanged.
class IdentityServer:
    reply_records = frozenset({ARRAYS, METRICS, LEDGER})

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.tokenizer, self.state, self.rounds = cfg, None, {"w": torch.arange(4.0)}, 0

    def encode_down(self, node: int) -> dict[str, Any]:
        return {ARRAYS: ArrayRecord(self.state)}

    def decode(self, msg: Message) -> Update:
        n, metrics = reply_metrics(msg)
        local, nbytes = read_arrays(msg, self.state)
        check_like(local, self.state)
        return Update(msg.metadata.src_node_id, {k: t - self.state[k] for k, t in local.items()}, n, metrics, nbytes)

    def largest_reply(self) -> int:
        return 65536

    def apply(self, aggregate, updates, server_round):
        self.state = {k: t + aggregate[k] for k, t in self.state.items()}
        self.rounds += 1
        return {"identity-rounds": self.rounds}

    @contextlib.contextmanager
    def model(self) -> Iterator[Any]:
        yield None

    def utility(self, updates, examples):
        return None

    def digest(self) -> bytes:
        return self.state["w"].numpy().tobytes()

    def save(self, run_dir: Path) -> None:
        (run_dir / "identity.json").write_text(json.dumps(self.state["w"].tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state, self.rounds = state["state"], state["rounds"]


class IdentityClient:
    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.name)  # for the rows fedllm encodes

    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        if ARRAYS not in request.array_records:
            raise PayloadError("identity: no arrays")
        self.state = request.array_records[ARRAYS].to_torch_state_dict()
        return {}

    def train(self, rows, seed):
        return {"train-loss": 0.0, "steps": 0.0}

    def upload(self, transform):
        return {ARRAYS: ArrayRecord(self.state)}


def test_a_new_method_runs_through_the_server_loop(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"train.method": "identity", "server.evaluate": False,
                                                       "server.strategy": "median"})
    run_dir = run(LocalGrid(3), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("identity-rounds") for r in rows[1:]] == [1, 2]
    assert all(r["clients-ok"] == 3 and r["bytes-up"] for r in rows[1:])
    assert json.loads((run_dir / "identity.json").read_text()) == [0.0, 1.0, 2.0, 3.0]  # zero updates


# (e) a contribution scorer: every honest client scores the same
def uniform(vectors, weights, aggregate, utility=None):
    return [1.0] * len(vectors)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """Each plug-in goes in with one call, as a user's module would do at import; they are
    taken out after this file so that the other tests' registry tables stay the built-ins."""
    RULES.register("sign-sgd", sign_sgd, accepts={"dense"}, streams=True)
    OPTIMIZERS.register("double", DOUBLE, accepts={"dense"})
    register_codec("fp16", fp16)
    register_method("identity", server=IdentityServer, client=IdentityClient, default_rule="fedavg",
                    compression=False, dp=False, utility=False, delta_kind="dense")
    register_scorer("uniform")(uniform)
    yield
    for registry, name in ((RULES, "sign-sgd"), (OPTIMIZERS, "double"), (CODECS, "fp16"), (METHODS, "identity"),
                           (SCORERS, "uniform")):
        registry.remove(name)


def test_a_new_scorer_shares_the_reward_evenly(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"ledger.enabled": True, "ledger.scorer": "uniform",
                                                       "ledger.noise-z": 0.0, "server.evaluate": False,
                                                       "server.num-rounds": 1})  # no direction flags: 3 honest
    run_dir = run(LocalGrid(3), cfg)
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    rewards = row["ledger"]["rewards"]
    assert len(rewards) == 3 and max(rewards.values()) - min(rewards.values()) <= 1  # wei of rounding


# --- plug-ins from a user's own module (server.plugins) ----------------------------------------
# Each is written to a real module in a temporary folder on sys.path and named by config only:
# the test never imports it; building the config does (server.plugins), on the server and on
# every client, and the real code path runs it.
USER_RULES = '''
import torch

def scaled_mean(updates, cfg, factor=1.0, *, shift=0.0):
    """The plain mean of the deltas, times `factor`, plus `shift` (arguments from server.strategy)."""
    mean = {k: sum(u.delta[k] for u in updates) / len(updates) for k in updates[0].delta}
    return {k: factor * t + shift for k, t in mean.items()}
'''

USER_PLUGINS = '''
import json
import sys

import numpy as np

from fedllm.client.attacks import ATTACKS, Attack
from fedllm.compression import register_codec
from fedllm.compression.codecs import Codec
from fedllm.evaluation.metrics import METRICS
from fedllm.reporting.tracking import TRACKERS

ENCODED, ATTACKED = [], []


def half():
    """A codec: float16 values."""
    def encode(frame, rng):
        ENCODED.append(len(frame["v"]))
        return {**frame, "v": frame["v"].astype(np.float16)}
    return Codec("half()", encode, lambda frame: {**frame, "v": frame["v"].astype(np.float32)})


class JsonlTracker:
    """A tracker: each round's scalars as a JSON line in the run directory."""
    def __init__(self, run_dir, previous):
        self.path = run_dir / "plugin-tracker.jsonl"
    def start(self):
        self.path.write_text("")
    def store_init_configuration(self, values):
        self._write({"config": values.get("server.plugins")})
    def log(self, values, step=None):
        self._write({"step": step, **values})
    def finish(self):
        self._write({"finished": True})
    def _write(self, row):
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\\n")


def double_flip(delta, seed, cfg):
    """An attack: minus twice the honest update."""
    ATTACKED.append(seed)
    return {k: -2 * t for k, t in delta.items()}


register_codec("half", half)
METRICS.register("answer-chars", lambda prediction, reference: float(len(prediction)), label="answer chars")
TRACKERS.register("jsonl", JsonlTracker)
ATTACKS.register("double-flip", Attack(update=double_flip))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module into tmp_path/plugins, puts it on sys.path; removes it and what it
    registered afterwards."""
    import sys

    from fedllm.client.attacks import ATTACKS
    from fedllm.evaluation.metrics import METRICS
    from fedllm.reporting.tracking import TRACKERS

    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names = []

    def write(name: str, text: str) -> str:
        (folder / f"{name}.py").write_text(text)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)
    for registry, name in ((CODECS, "half"), (METRICS, "answer-chars"), (TRACKERS, "jsonl"), (ATTACKS, "double-flip")):
        registry.remove(name)


def test_a_user_rule_with_arguments_by_module_function(user_module):
    module = user_module("fedllm_test_user_rules", USER_RULES)
    cfg = Config.from_flat({"server.strategy": f"{module}:scaled_mean(2, shift=0.5) > fedavgm(lr=1.0, momentum=0.0)"})
    s = build(cfg, LoraServer(cfg, GLOBAL))
    result = s.round(1, [_reply(1, {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[0.0]])}),
                         _reply(2, {"a": torch.tensor([2.0, 1.5]), "b": torch.tensor([[0.0]])})])
    # mean delta (1.5, -0.75), 0; x 2 + 0.5 = (3.5, -1.0), 0.5; fedavgm with lr 1, momentum 0 keeps it
    assert result.applied and torch.equal(s.method.state["a"], torch.tensor([4.5, 1.0]))
    assert torch.equal(s.method.state["b"], torch.tensor([[0.5]]))
    assert s.chain.name == f"{module}:scaled_mean(2, shift=0.5) > fedavgm(lr=1.0, momentum=0.0)"
    assert list(s.state_dict()["chain"]["optimizers"]) == ["0:fedavgm"]  # keyed by registered name, as before
    from fedllm.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"server.strategy: stage '{module}:scaled_mean(scale=2)': unknown "
                                                    f"argument 'scale'; {module}:scaled_mean takes factor, shift")):
        build(Config.from_flat({"server.strategy": f"{module}:scaled_mean(scale=2)"}), LoraServer(Config(), GLOBAL))


@pytest.fixture
def plugin_run(tiny_model_dir, tmp_path, user_module):
    """One tiny in-process run (LocalGrid) whose codec, metric, tracker and attack all come from
    a user's module named by server.plugins only."""
    import sys

    from fedllm.server.loop import run

    module = user_module("fedllm_test_user_plugins", USER_PLUGINS)
    assert module not in sys.modules
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{
        "server.plugins": module, "compression.up": "half > zstd", "server.trackers": "jsonl",
        "attack.clients": "1=double-flip", "server.num-rounds": 1})
    run_dir = run(LocalGrid(3), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sys.modules[module], run_dir, rows


def test_plugins_codec_metric_tracker_and_attack_run_in_process(plugin_run):
    from fedllm.reporting.runlog import format_summary, summary

    plugins, run_dir, rows = plugin_run
    assert len(plugins.ENCODED) == 3 and rows[1]["clients-ok"] == 3  # each client's upload went through `half`
    assert len(plugins.ATTACKED) == 1  # partition 1 poisoned its update, the others are honest
    # the metric: in every evaluated row, overall and per family, and in the summary
    assert all(isinstance(r["answer-chars"], float) and r["answer-chars"] >= 0 for r in rows)
    assert all("answer-chars" in f for f in rows[-1]["families"].values())
    s = summary(rows)
    assert s["answer-chars-after"] == rows[-1]["answer-chars"] and "answer chars" in format_summary(s)
    assert "answer chars" in (run_dir / "report.html").read_text()
    # the tracker: the config, one line per round with the scalars (the new metric too), then finished
    lines = [json.loads(line) for line in (run_dir / "plugin-tracker.jsonl").read_text().splitlines()]
    assert lines[0] == {"config": "fedllm_test_user_plugins"} and lines[-1] == {"finished": True}
    assert [x["step"] for x in lines[1:-1]] == [0, 1] and "answer-chars" in lines[-2]


def test_plugins_lm_eval_task_scores_a_plugin_metric(user_module, tmp_path):
    """fedllm_builtin's scoring module (what lm_eval imports alone) imports the plug-in's module."""
    import importlib.util

    from fedllm.config import DataConfig
    from fedllm.evaluation.harness import write_tasks
    from fedllm.plugins import import_plugins

    import_plugins(user_module("fedllm_test_user_plugins", USER_PLUGINS))
    folder = write_tasks(tmp_path / "tasks", [{"instruction": "q", "input": "", "response": "yes", "family": "x"}],
                         DataConfig())
    assert "metric: answer_chars" in (folder / "fedllm_builtin.yaml").read_text()
    spec = importlib.util.spec_from_file_location("fedllm_builtin_utils", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.process_results({"response": "yes"}, ["yes"]) == {"answer_chars": 3.0, "exact_match": 1.0,
                                                                   "rouge_l": 1.0}


def test_a_plugin_that_does_not_import_is_a_one_line_config_error(user_module):
    from fedllm.errors import ConfigError

    broken = user_module("fedllm_test_broken_plugin", "raise RuntimeError('no GPU here')\n")
    with pytest.raises(ConfigError) as err:
        Config.from_flat({"server.plugins": f"json, {broken}"})
    assert str(err.value) == f"server.plugins: cannot import '{broken}': RuntimeError: no GPU here"
    with pytest.raises(ConfigError, match="server.plugins: cannot import 'no_such_module_xyz': ModuleNotFoundError"):
        Config.from_flat({"server.plugins": "no_such_module_xyz"})


# (f) a method with its own config section, all in its own folder (a package on the path, named
# by server.plugins): nothing in fedllm is edited, and the server and every client import it
SHIFT = {
    "__init__.py": '''
from fedllm.methods import MethodSpec, register_method
from shift import config

register_method("shift", server="shift.halves:ShiftServer", client="shift.halves:ShiftClient",
                spec=MethodSpec(compression=False, dp=False, check=config.check))
''',
    "config.py": '''
from dataclasses import dataclass

from fedllm.config import option, register_section
from fedllm.errors import ConfigError


@dataclass
class ShiftConfig:
    step: float = option("What each client adds to every weight in a round.", 1.0, check="> 0")
    clamp: float = option("The largest weight the server keeps; 0: no clamp.", 0.0, check=">= 0")


register_section("shift", ShiftConfig)


def check(cfg, spec):
    if cfg.shift.clamp and cfg.shift.clamp < cfg.shift.step:
        raise ConfigError(f"shift.clamp: {cfg.shift.clamp} is below shift.step={cfg.shift.step}")
''',
    "halves.py": '''
import contextlib
import json
import sys

import torch
from flwr.app import ArrayRecord

from fedllm.protocol import ARRAYS, METRICS, LEDGER, Update, check_like, read_arrays, reply_metrics


class ShiftServer:
    reply_records = frozenset({ARRAYS, METRICS, LEDGER})
    tokenizer = None

    def __init__(self, cfg):
        self.cfg, self.state = cfg, {"w": torch.zeros(3)}

    def encode_down(self, node):
        return {ARRAYS: ArrayRecord(self.state)}

    def decode(self, msg):
        n, metrics = reply_metrics(msg)
        local, nbytes = read_arrays(msg, self.state)
        check_like(local, self.state)
        return Update(msg.metadata.src_node_id, {k: t - self.state[k] for k, t in local.items()}, n, metrics, nbytes)

    def largest_reply(self):
        return 65536

    def apply(self, aggregate, updates, server_round):
        w = self.state["w"] + aggregate["w"]
        self.state = {"w": w.clamp(max=self.cfg.shift.clamp) if self.cfg.shift.clamp else w}
        return {"shift-max": float(self.state["w"].max())}

    @contextlib.contextmanager
    def model(self):
        yield None

    def utility(self, updates, examples):
        return None

    def digest(self):
        return self.state["w"].numpy().tobytes()

    def save(self, run_dir):
        (run_dir / "shift.json").write_text(json.dumps(self.state["w"].tolist()))

    def state_dict(self):
        return {"state": self.state}

    def load_state_dict(self, state):
        self.state = state["state"]


class ShiftClient:
    def __init__(self, cfg, context, partition_id):
        from transformers import AutoTokenizer

        self.cfg, self.tokenizer = cfg, AutoTokenizer.from_pretrained(cfg.model.name)

    def sync(self, request, seed):
        self.state = request.array_records[ARRAYS].to_torch_state_dict()
        return {}

    def train(self, rows, seed):
        return {"train-loss": 0.0, "steps": 1.0}

    def upload(self, transform):
        return {ARRAYS: ArrayRecord({"w": self.state["w"] + self.cfg.shift.step})}
''',
}


@pytest.fixture
def shift_package(tmp_path, monkeypatch):
    for name, text in SHIFT.items():
        (tmp_path / "pkg" / "shift").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / "shift" / name).write_text(text.lstrip())
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    yield
    METHODS.remove("shift")
    from fedllm import config

    config._SECTIONS.pop("shift", None)
    for name in [m for m in sys.modules if m == "shift" or m.startswith("shift.")]:
        del sys.modules[name]


def test_a_method_with_its_own_config_keys_lives_in_its_folder(shift_package, tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    over = {"server.plugins": "shift", "train.method": "shift", "shift.step": "0.5", "shift.clamp": 0.75,
            "server.evaluate": False, "server.strategy": "median"}
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **over)
    assert cfg.shift.step == 0.5 and "shift.step" in cfg.to_flat()
    run_dir = run(LocalGrid(3), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("shift-max") for r in rows[1:]] == [0.5, 0.75]  # 0.5, then 1.0 clamped
    assert json.loads((run_dir / "shift.json").read_text()) == [0.75] * 3
    with pytest.raises(ConfigError, match=r"^shift\.clamp: 0\.25 is below shift\.step=0\.5$"):
        build(Config.from_flat({**over, "shift.clamp": 0.25}))
    with pytest.raises(ConfigError, match=r"^shift\.step: must be > 0"):
        Config.from_flat({**over, "shift.step": 0})
