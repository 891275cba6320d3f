import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedllm import Config, ConfigError, parse_overrides
from fedllm.config import help_table, within

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_dashed_keys():
    cfg = Config.from_flat({"lora.rank": 16, "server.num-rounds": 5, "train.local_steps": 3})
    assert cfg.lora.rank == 16
    assert cfg.server.num_rounds == 5
    assert cfg.train.local_steps == 3
    assert cfg.model.dtype == "float32"


def test_strings_are_typed():
    cfg = Config.from_flat(parse_overrides(["lora.alpha=32", "train.lr=0.01", "server.merge=true"]))
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.train.lr == 0.01
    assert cfg.server.merge is True


def test_flat_round_trip():
    cfg = Config.from_flat({"lora.rank": 4, "data.partition": "iid"})
    assert Config.from_flat(cfg.to_flat()) == cfg
    assert cfg.replace(lora__rank=2).lora.rank == 2
    assert cfg.lora.rank == 4  # replace returns a copy


@pytest.mark.parametrize(
    "flat, named",
    [
        ({"lora.rnak": 8}, "lora.rnak"),
        ({"nosection.x": 1}, "nosection.x"),
        ({"lora": 1}, "lora"),
        ({"lora.rank": "eight"}, "lora.rank"),
        ({"lora.rank": 2.5}, "lora.rank"),
        ({"server.merge": "maybe"}, "server.merge"),
        ({"lora.rank": 0}, "lora.rank"),
        ({"data.partition": "random"}, "data.partition"),
        ({"model.dtype": "float8"}, "model.dtype"),
        ({"server.fraction-train": 1.5}, "server.fraction-train"),
        ({"server.run-name": "../elsewhere"}, "server.run-name"),
        ({"server.run-name": ".."}, "server.run-name"),
    ],
)
def test_bad_keys_name_themselves(flat, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        Config.from_flat(flat)


def test_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lora.rank"])


def test_pyproject_defaults_are_valid_keys():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = Config.from_flat(app)
    assert set(app) == set(Config().to_flat())  # `flwr run --run-config` accepts only listed keys
    # `flwr run .` and `fedllm simulate` run the same experiment: every default, value by value
    assert {k: v for k, v in Config().to_flat().items() if app[k] != v} == {}
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.server.strategy == ""  # by update kind: fedavg for lora


def test_every_key_has_help():
    rows = help_table()
    assert len(rows) >= 30
    assert all(text for _, text, _ in rows)


@pytest.mark.parametrize("flat, message", [
    ({"ledger.penalties": "cheat=0.5"}, "ledger.penalties: 'cheat=0.5' is not flag=fraction"),
    ({"ledger.penalties": "noise=x"}, "ledger.penalties: noise needs a fraction in [0, 1], got 'x'"),
    ({"ledger.slashed-to": "void"}, "ledger.slashed-to"),
    ({"ledger.client-keys": "mine"}, "ledger.client-keys"),
    ({"ledger.reward-per-round": -1.0}, "ledger.reward-per-round: must be >= 0"),
    ({"attack.clients": "a=zero"}, "attack.clients: 'a=zero' is not partition=kind"),
])
def test_ledger_and_attack_config_errors(flat, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_flat(flat)


@pytest.mark.parametrize("flat, message", [
    ({"ledger.enabled": True, "ledger.scorer": "loo", "train.method": "zo"},
     "ledger.scorer: loo needs a validation loss per subset of updates, which train.method=zo does not give"),
    ({"ledger.enabled": True, "ledger.scorer": "shapley", "train.method": "exact-lora"},
     "ledger.scorer: shapley needs a validation loss per subset of updates, which train.method=exact-lora"),
    ({"train.method": "zo", "compression.up": "int8"}, "compression.up/down: train.method=zo does not take codecs"),
    ({"train.method": "lora-plus"}, "train.method: unknown method 'lora-plus'; registered: diloco, dpo, exact-lora, ferret, lora, zo"),
    ({"train.method": "zo", "server.strategy": "fedadam"}, "server.strategy: optimizer 'fedadam' does not apply"),
    ({"server.strategy": "exact-lora"}, "server.strategy: 'exact-lora' is a method: set train.method=exact-lora"),
])
def test_combinations_are_checked_from_registry_metadata(flat, message):
    """Cross-section checks need the method and rule registries, so they run where a run
    starts (strategies.resolve: the server, `fedllm simulate`), not in Config.from_flat."""
    from strategies import resolve

    cfg = Config.from_flat(flat)
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(cfg)


def test_ledger_and_attack_config_parse():
    cfg = Config.from_flat({"ledger.penalties": " noise=0.25, free-rider=1 ", "attack.clients": "3=zero,4=noise"})
    assert cfg.ledger.penalty_map() == {"noise": 0.25, "free-rider": 1.0}
    assert cfg.attack.kinds() == {3: "zero", 4: "noise"}
    assert Config().ledger.penalty_map()["free-rider"] == 0.5 and Config().attack.kinds() == {}


NUMERIC = [(key, default) for key, _, default in help_table()
           if isinstance(default, (int, float)) and not isinstance(default, bool)]


def test_every_numeric_key_declares_its_values():
    from fedllm.config import options

    fields = options()
    assert len(NUMERIC) >= 50 and all("check" in fields[k].metadata for k, _ in NUMERIC)
    assert all(within(d, fields[k].metadata["check"]) for k, d in NUMERIC)  # every default is allowed


@pytest.mark.parametrize("key, default", NUMERIC)
def test_bad_numbers_are_refused_at_parse_time_naming_the_key(key, default):
    """NaN and inf always; -1 and 0 exactly when outside the field's declared values."""
    from fedllm.config import options

    field_ = options()[key]
    for value in ("nan", "inf", "-inf", "-1", "0"):
        ok = value in ("-1", "0") and within(float(value), field_.metadata["check"])
        if ok:
            Config.from_flat({key: value})
        else:
            with pytest.raises(ConfigError, match=re.escape(key) + ":"):
                Config.from_flat({key: value})


def test_the_cli_refuses_a_bad_number_before_anything_starts(tmp_path, capsys):
    from fedllm.cli import main

    assert main(["simulate", "--set", "train.lr=nan", "--set", f"server.run-dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedllm: error: train.lr: must be a finite number, got nan"]
    assert list(tmp_path.iterdir()) == []  # no run folder left behind


@pytest.mark.parametrize("spec, message", [
    ("fedllm.config:Config", "'fedllm.config:Config' is not a rule: a rule is a function (updates, cfg) -> delta (got a class)"),
    ("os:system", "'os:system' is not a rule"),
    ("fedllm.config:DEFAULT_MODEL", "is not a rule"),
    ("no_such_module:rule", "server.strategy: cannot import 'no_such_module:rule'"),
])
def test_a_user_rule_must_be_a_function(spec, message):
    from strategies import resolve

    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(Config.from_flat({"server.strategy": spec}))


def test_preflight_refuses_too_many_clients_and_a_model_without_weights(tmp_path, tiny_model_dir, monkeypatch):
    from fedllm.cli import main
    from fedllm.errors import ModelError
    from fedllm.model import check_available
    from fedllm.config import ModelConfig

    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(f'{{"instruction": "q{i}", "response": "a{i}"}}' for i in range(4)))
    assert main(["simulate", "--num-clients", "8", "--set", f"data.source={data}", "--set", "data.partition=iid",
                 "--set", f"server.run-dir={tmp_path / 'runs'}", "--set", f"model.name={tiny_model_dir}"]) == 2
    assert not (tmp_path / "runs").exists()
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="has no weights"):
        check_available(ModelConfig(name=str(empty)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        check_available(ModelConfig(name="someone/some-model"))
    check_available(ModelConfig(name=str(tiny_model_dir)))


HEAVY = ("torch", "transformers", "flwr_datasets", "datasets", "seaborn", "peft", "ray", "trl")


@pytest.mark.parametrize("argv", [["config"], ["simulate", "--set", "lora.rank=0"],
                                  ["simulate", "--set", "zo.bits=3", "--set", "train.method=zo"],
                                  ["simulate", "--set", "no.such-key=1"],
                                  ["simulate", "--set", "lora.peft=prompt", "--set", "server.merge=true"],
                                  ["simulate", "--num-clients", "2", "--set", "server.clients-per-round=3"],
                                  ["simulate", "--set", "train.method=zo", "--set", "compression.up=int8"],
                                  ["simulate", "--set", "train.method=diloco", "--set", "dp.clipping-norm=1"]])
def test_a_config_answer_imports_nothing_heavy(argv):
    """`fedllm config` and every config error (the pre-flight's cross-checks too, the method's spec
    against codecs, DP, ...) answer before torch, transformers, flwr-datasets or Ray is imported
    (what took several seconds, 29 on a busy machine), measured with -X importtime."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedllm", *argv], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == (0 if argv == ["config"] else 2), out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert len(imported) > 20 and not imported & set(HEAVY), sorted(imported & set(HEAVY))
