"""Federated DPO (train.method=dpo): TRL's loss against the formula, the built-in preference suite,
preference files, the held-out rewards, the SFT -> DPO pipeline (server.init-from), the config's
refusals, and DPO with codecs, the ledger and a resume."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
import torch

from conftest import tiny_run_config
from fedllm.config import Config, DataConfig
from fedllm.data import FAMILIES, load_splits
from fedllm.errors import ConfigError, DataError
from fedllm.methods.dpo import engine as dpo_engine
from fedllm.methods.adapters import engine as lora


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# --- the loss -------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid,sft"])
def test_trl_dpo_loss_matches_the_formula_on_a_hand_built_pair(loss_type, tiny_model_dir, tmp_path):
    """TRL's loss of one (prompt, chosen, rejected) pair, the policy moved away from the reference
    adapter, equals the papers' formulas computed here from plain logits: sigmoid DPO
    -log sigmoid(beta ((pc - rc) - (pr - rr))), IPO ((pc - rc) / |c| - (pr - rr) / |r| - 1 / (2 beta))^2,
    and DPO plus half the chosen answer's mean token NLL (dpo.loss-type=sigmoid,sft, weights 1,0.5)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = Config.from_flat({"model.name": str(tiny_model_dir), "lora.dropout": 0.0})
    net, tok = lora.lora_model(cfg.model, cfg.lora, 0)
    gen = torch.Generator().manual_seed(0)
    shapes = lora.adapter_state(net)
    lora.set_adapter_state(net, {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()})
    pair = {"prompt": "<|im_start|>user\nIs the number even or odd?\n7<|im_end|>\n<|im_start|>assistant\n",
            "chosen": "odd", "rejected": "even"}
    beta = 0.3
    dpo = Config.from_flat({"dpo.loss-type": loss_type, "dpo.loss-weights": "1,0.5" if "," in loss_type else ""}).dpo
    with dpo_engine.patched(net):
        args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=dpo.losses(), loss_weights=dpo.weights(),
                         use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False, disable_tqdm=True)
        trainer = DPOTrainer(model=net, args=args, train_dataset=Dataset.from_list([pair]), processing_class=tok)
        assert "ref" in net.peft_config  # TRL's copy of the adapter it was handed: the reference
        lora.set_adapter_state(net, {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()})
        batch = trainer.data_collator([trainer.train_dataset[0]])
        with torch.no_grad():
            got = float(trainer.compute_loss(net, batch))
            ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].double()

            def logps(adapter):
                net.set_adapter(adapter)
                logits = net(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].double()
                token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
                return (token * mask).sum(1)  # (2,): chosen, rejected

            policy, reference = logps("default"), logps("ref")
            chosen_nll = -float(policy[0]) / float(mask[0].sum())
            net.set_adapter("default")
    (pc, pr), (rc, rr) = policy.tolist(), reference.tolist()
    assert abs(pc - rc) > 1e-3  # the policy differs from the reference: the loss is not at its log 2 point
    dpo_loss = -torch.nn.functional.logsigmoid(torch.tensor(beta * ((pc - rc) - (pr - rr)))).item()
    if loss_type == "sigmoid":
        expected = dpo_loss
    elif loss_type == "sigmoid,sft":
        expected = dpo_loss + 0.5 * chosen_nll
    else:
        nc, nr = mask.sum(1).tolist()
        expected = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert "ref" not in net.peft_config and "forward" not in net.get_base_model().__dict__  # undone


def test_a_round_is_repeatable_leaves_the_cached_model_as_it_was_and_the_reference_matters(tiny_model_dir):
    """The same seed gives the same adapter bit for bit (also after other rounds: TRL's patches are
    undone, no wrapper piles up, the LoRA dropout rates come back), and the same with activation
    checkpointing; dpo.reference=base trains against another model than global."""
    from fedllm.data import pair_text

    cfg = Config.from_flat({"model.name": str(tiny_model_dir), "lora.dropout": 0.1, "train.local-steps": 3,
                            "train.lr": 0.01, "data.families": "parity,arithmetic", "data.train-per-family": 8})
    net, tok = lora.lora_model(cfg.model, cfg.lora, 0)
    rows = [pair_text(tok, e) for e in load_splits(cfg.data, preference=True)[0]]
    gen = torch.Generator().manual_seed(1)
    start = {k: 0.3 * torch.randn(v.shape, generator=gen) for k, v in lora.adapter_state(net).items()}
    rates = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and set(rates) == {0.1}

    def one(reference, seed=5, checkpointing=False):
        lora.set_adapter_state(net, start)
        train = cfg.replace(train__gradient_checkpointing=checkpointing).train
        stats = dpo_engine.train(net, tok, rows, train, cfg.replace(dpo__reference=reference).dpo, 128, seed)
        assert stats["steps"] == 3 and 0 < stats["train-loss"] < 5
        assert 0 < stats["train-reward-accuracy"] <= 1 and stats["train-reward-margin"] != 0  # TRL's own figures
        return lora.adapter_state(net)

    a, b, c, d = one("global"), one("global"), one("base"), one("global", checkpointing=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k], d[k], atol=1e-6) for k in a)  # train.gradient-checkpointing: the same step
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    assert list(net.peft_config) == ["default"] and "forward" not in net.get_base_model().__dict__
    assert getattr(net.get_base_model(), "_require_grads_hook", None) is None  # checkpointing's hook removed
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == rates  # TRL's dropout-off undone
    assert not net.training
    with pytest.raises(DataError, match="data.max-length=8"):  # TRL would leave out every pair
        dpo_engine.train(net, tok, rows, cfg.train, cfg.dpo, 8, 5)


# --- data -----------------------------------------------------------------------------------------
UNIT_FACTORS = {("kilometers", "meters"): 1000, ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000,
                ("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("liters", "milliliters"): 1000,
                ("days", "hours"): 24}


def _solve(family, instruction, inp):
    """Each family's answer worked out here from the prompt (not with the generator's code)."""
    if family == "arithmetic":
        a, op, b = inp.split()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if family == "reverse":
        return inp[::-1]
    if family == "units":
        src, dst = re.match(r"Convert (\w+) to (\w+)\.", instruction).groups()
        return str(int(inp.split()[0]) * UNIT_FACTORS[(src, dst)])
    if family == "sorting":
        return ", ".join(str(n) for n in sorted(int(x) for x in inp.split(",")))
    if family == "dates":
        days = int(re.search(r"(\d+) days", instruction).group(1))
        return (dt.date.fromisoformat(inp) + dt.timedelta(days=days)).isoformat()
    if family == "word_length":
        return str(len(inp))
    return "even" if int(inp) % 2 == 0 else "odd"


def _plausible(family, chosen, rejected):
    """The rejected answer has the shape of a right one (the same kind of thing, near it)."""
    if family in ("arithmetic", "word_length"):
        return abs(int(rejected) - int(chosen)) == 1
    if family == "units":
        return int(rejected) > 0
    if family == "reverse":
        return sorted(rejected) == sorted(chosen) or rejected[:-1] == chosen
    if family == "sorting":
        return sorted(rejected.split(", ")) == sorted(chosen.split(", "))
    if family == "dates":
        return abs((dt.date.fromisoformat(rejected) - dt.date.fromisoformat(chosen)).days) == 1
    return rejected in ("even", "odd")


def test_the_builtin_preference_suite_chosen_right_rejected_wrong_for_every_family():
    cfg = DataConfig(train_per_family=40, eval_per_family=10, seed=3)
    train, held_out = load_splits(cfg, preference=True)
    plain_train, _ = load_splits(cfg)
    assert [{k: e[k] for k in e if k != "rejected"} for e in train] == plain_train  # the same examples, plus one field
    assert {e["family"] for e in train} == set(FAMILIES) and len(held_out) == 10 * len(FAMILIES)
    for e in train + held_out:
        right = _solve(e["family"], e["instruction"], e["input"])
        assert e["response"] == right, e
        assert e["rejected"] != right and _plausible(e["family"], e["response"], e["rejected"]), e
    assert load_splits(cfg, preference=True) == (train, held_out)  # every party builds the same pairs


def test_preference_files_map_their_fields_and_a_missing_one_names_file_and_field(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text("\n".join(json.dumps({"q": f"question {i}", "good": f"yes {i}", "bad": f"no {i}"})
                              for i in range(10)))
    cfg = DataConfig(source=str(good), prompt_field="q", chosen_field="good", rejected_field="bad")
    train, held_out = load_splits(cfg, preference=True)
    assert len(train) + len(held_out) == 10
    assert {(e["instruction"], e["response"], e["rejected"]) for e in train + held_out} == {
        (f"question {i}", f"yes {i}", f"no {i}") for i in range(10)}
    bad = tmp_path / "no-rejected.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(DataError, match=r"no-rejected\.jsonl: row 0 has no field 'rejected' \(data\.rejected-field\)"):
        load_splits(DataConfig(source=str(bad)), preference=True)


def test_a_bad_preference_file_stops_the_cli_with_one_line_naming_file_and_field(tmp_path, capsys):
    from fedllm.cli import main

    bad = tmp_path / "pairs.csv"
    bad.write_text("prompt,chosen,wrong\n" + "".join(f"p{i},c{i},r{i}\n" for i in range(6)))
    code = main(["simulate", "--engine", "inprocess", "--set", "train.method=dpo", "--set", f"data.source={bad}",
                 "--set", f"server.run-dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "pairs.csv" in err[0] and "data.rejected-field" in err[0], err


def test_pairs_that_teach_nothing_stop_the_cli_with_their_counts(tmp_path, capsys):
    from fedllm.cli import main

    same = tmp_path / "same.jsonl"  # DPO's loss on chosen == rejected is log 2 whatever the model does
    same.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "c"}) + "\n" for i in range(6)))
    code = main(["simulate", "--engine", "inprocess", "--set", "train.method=dpo", "--set", f"data.source={same}",
                 "--set", f"server.run-dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "same.jsonl: all 6 pairs are degenerate" in err[0], err


def test_init_adapter_flag_checks_the_folder_before_any_round(tiny_model_dir, tmp_path, capsys):
    from fedllm.cli import main

    code = main(["simulate", "--engine", "inprocess", "--init-adapter", str(tmp_path), "--set", "train.method=dpo",
                 "--set", f"model.name={tiny_model_dir}", "--set", f"server.run-dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "server.init-from" in err[0] and "adapter_config.json" in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written


def test_label_flipping_a_preference_client_swaps_chosen_and_rejected():
    from fedllm.client.attacks import flip_labels

    pairs = load_splits(DataConfig(families="parity", train_per_family=6), preference=True)[0]
    flipped = flip_labels(pairs, seed=0)
    assert [(e["response"], e["rejected"]) for e in flipped] == [(e["rejected"], e["response"]) for e in pairs]


# --- federated runs -------------------------------------------------------------------------------
def test_federated_dpo_raises_held_out_reward_accuracy(tiny_model_dir, tmp_path):
    """Two clients, three rounds: the held-out reward accuracy (against the starting model) and the
    margin rise, every figure lands in metrics.jsonl, the summary and the report, and the adapter
    loads with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{
        "train.method": "dpo", "server.num-rounds": 3, "train.local-steps": 8, "train.lr": 5e-3,
        "data.train-per-family": 16, "data.eval-per-family": 8})
    run_dir = run(LocalGrid(2), cfg)
    rows = _rows(run_dir)
    assert rows[0]["reward-accuracy"] == 0.0 and rows[0]["reward-margin"] == 0.0  # the start is the reference
    assert rows[-1]["reward-accuracy"] >= 0.65 and rows[-1]["reward-margin"] > rows[1]["reward-margin"] > 0
    assert all(r["clients-ok"] == 2 and r["train-loss"] > 0 for r in rows[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward-accuracy-after"] == rows[-1]["reward-accuracy"]
    assert "reward accuracy" in (run_dir / "report.html").read_text()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), run_dir / "adapter")


def test_sft_then_dpo_from_the_sft_adapter(tiny_model_dir, tmp_path):
    """server.init-from: the DPO run starts at the SFT run's adapter (its round 0 scores what the SFT
    run ended with, and its saved adapter moved from there); an adapter of another shape, a folder
    without one, and methods that cannot start from one are refused naming the key."""
    from safetensors.torch import load_file

    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    sft = run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{"server.run-name": "sft"}))
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.run-name": "dpo", "train.method": "dpo",
                                                       "server.init-from": str(sft / "adapter")})
    aligned = run(LocalGrid(2), cfg)
    assert _rows(aligned)[0]["eval-loss"] == pytest.approx(_rows(sft)[-1]["eval-loss"], abs=1e-6)
    a, b = load_file(sft / "adapter" / "adapter_model.safetensors"), load_file(aligned / "adapter" /
                                                                               "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # the checkpoint holds the start: a rebuild does not need the SFT folder any more
    from fedllm.server import checkpoint
    from strategies import build as build_strategy

    (sft / "adapter").rename(tmp_path / "moved")
    saved = checkpoint.read(aligned / checkpoint.FILE)
    again = build_strategy(Config.from_flat(checkpoint.saved_config(saved)).replace(server__init_from="",
                                                                                     server__evaluate=False))
    again.load_state_dict(saved["strategy"])
    assert torch.equal(again.method.initial[sorted(a)[0]], a[sorted(a)[0]])
    (tmp_path / "moved").rename(sft / "adapter")
    from strategies import build

    for over, key in (({"lora.rank": 4}, "lora.rank"), ({"lora.alpha": 8.0}, "lora.alpha"),
                      ({"lora.target-modules": "q_proj"}, "lora.target-modules"),
                      ({"server.init-from": str(tmp_path)}, "adapter_config.json"),
                      ({"train.method": "zo"}, "train.method=zo"), ({"train.method": "lora", "lora.target-modules":
                                                                     "auto"}, "auto")):
        with pytest.raises(ConfigError, match=re.escape(key)) as err:
            build(cfg.replace(**{k.replace(".", "__").replace("-", "_"): v for k, v in over.items()}))
        assert str(err.value).startswith("server.init-from") and "\n" not in str(err.value)


def test_dpo_composes_with_codecs_the_ledger_and_resume(tiny_model_dir, tmp_path):
    """int8 codecs both ways with the ledger on (in-process chain): every round is on the ledger and
    `fedllm verify` recomputes each from its artifacts (the downlink's error feedback included); a
    resume for a third round gives the uninterrupted run's held-out rewards (the reference
    log-likelihoods come back from the checkpoint)."""
    pytest.importorskip("web3")
    from fedllm.ledger.verify import verify
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    over = {"train.method": "dpo", "compression.up": "int8", "compression.down": "int8", "server.min-replies": 2}
    booked = run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **over, **{"ledger.enabled": True,
                                                                                    "server.run-name": "ledger"}))
    assert all((booked / "ledger" / f"round-{r:04d}.json").is_file() for r in (1, 2))
    assert [c.status for c in verify(booked)] == ["reproduced", "reproduced"]
    over = {"train.method": "dpo", "compression.down": "int8"}  # the server's codec state is checkpointed
    whole = run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **over, **{"server.num-rounds": 3,
                                                                                   "server.run-name": "whole"}))
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **over)
    part = run(LocalGrid(2), cfg)
    resumed = run(LocalGrid(2), cfg.replace(server__resume=str(part), server__num_rounds=3))
    assert [r.get("reward-margin") for r in _rows(resumed)] == [r.get("reward-margin") for r in _rows(whole)]
    assert [r["clients-ok"] for r in _rows(booked)[1:]] == [2, 2]


def test_sites_train_dpo_on_their_own_preference_files(tiny_model_dir, tmp_path):
    """A deployment's sites name their own pair files in the node config (data-path), as for SFT."""
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    grid = LocalGrid(2)
    for node, n in ((1, 5), (2, 7)):
        path = tmp_path / f"site{node}.jsonl"
        path.write_text("\n".join(json.dumps({"prompt": f"Is {i} even or odd?", "chosen": ("even", "odd")[i % 2],
                                              "rejected": ("odd", "even")[i % 2]}) for i in range(n)))
        grid.context(node).node_config["data-path"] = str(path)
    run_dir = run(grid, tiny_run_config(tiny_model_dir, tmp_path, **{"train.method": "dpo", "server.num-rounds": 1}))
    assert sorted(r["num-examples"] for r in _rows(run_dir)[1]["clients"].values()) == [5, 7]


def test_client_side_dp_clipping_bounds_a_dpo_round(tiny_model_dir, tmp_path):
    """dp.clipping-norm through Flower's fixedclipping_mod on the DPO adapter: two rounds with no
    noise move the global adapter at most twice the clipping norm."""
    from safetensors.torch import load_file

    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"train.method": "dpo", "train.lr": 0.05,
                                                       "dp.clipping-norm": 0.02, "dp.noise-multiplier": 0.0})
    run_dir = run(LocalGrid(2), cfg)
    assert all(r["clients-ok"] == 2 for r in _rows(run_dir)[1:])
    start = lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed)
    end = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    moved = torch.sqrt(sum(((end[k] - start[k]) ** 2).sum() for k in start)).item()
    assert 0.005 < moved <= 2 * 0.02 + 1e-5


@pytest.mark.parametrize("over, key", [
    ({"server.strategy": "fedprox"}, "server.strategy"),
    ({"model.quantize": "nf4"}, "model.quantize"),
    ({"lora.peft": "dora"}, "lora.peft"),
    ({"lora.target-modules": "auto"}, "lora.target-modules"),
    ({"ledger.enabled": True, "ledger.scorer": "loo"}, "ledger.scorer"),
])
def test_combinations_dpo_cannot_take_are_one_line_errors(over, key):
    from strategies import resolve

    with pytest.raises(ConfigError) as err:
        resolve(Config.from_flat({"train.method": "dpo", **over}))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


@pytest.mark.parametrize("key, value", [("dpo.loss-type", "kto"), ("dpo.loss-type", "sigmoid,kto"),
                                        ("dpo.loss-type", " , "), ("dpo.loss-weights", "1"),
                                        ("dpo.loss-weights", "1,x"), ("dpo.reference", "sft"), ("dpo.beta", 0.0),
                                        ("dpo.label-smoothing", 0.5)])
def test_bad_dpo_settings_name_their_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(key)):
        Config.from_flat({"dpo.loss-type": "sigmoid,sft", key: value})


@pytest.mark.parametrize("config, weights, says", [
    ({"use_rslora": True}, None, "use_rslora"),
    ({"alpha_pattern": {"q_proj": 32}}, None, "alpha_pattern"),
    ({"use_dora": "false"}, None, "use_dora"),
    ({"r": True}, None, "lora.rank"),
    ({"target_modules": 5}, None, "target_modules=5"),
    ({}, torch.float8_e4m3fn, "float8"),
    ({}, torch.int64, "int64"),
    ({}, "nan", "non-finite"),
])
def test_a_bad_init_adapter_is_one_line_naming_what_differs(config, weights, says, tmp_path):
    """server.init-from's folder, as an attacker or a wrong run would leave it: every case is a
    ConfigError naming server.init-from and the setting, never a traceback."""
    from safetensors.torch import save_file

    like = {"m.q_proj.lora_A.weight": torch.zeros(8, 4), "m.q_proj.lora_B.weight": torch.zeros(4, 8)}
    tensors = {k: v.clone() for k, v in like.items()}
    if weights == "nan":
        tensors["m.q_proj.lora_B.weight"][0, 0] = float("nan")
    elif weights is not None:
        tensors = {k: v.to(weights) for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps({**base, **config}))
    with pytest.raises(ConfigError) as err:
        lora.read_adapter(tmp_path, like, Config().lora)
    assert str(err.value).startswith("server.init-from") and says in str(err.value) and "\n" not in str(err.value)
