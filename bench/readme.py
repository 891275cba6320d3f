"""Write bench/README.md from the benches' JSON, so the tables cannot drift from the runs.

    python bench/readme.py           # rewrites bench/README.md
    python bench/readme.py --check   # exits 1 when bench/README.md is not what the JSON gives

Each bench script writes bench/<name>.json (its full run: the script without arguments, or the
arguments its setup records); `make bench` (bench/suite.py) writes bench/results.json, the short
suite. This script reads them, with each script's docstring for what it measures and suite.py's
headline figures and goals, and writes one section per bench: the command that produced its
table, the table, or "not recorded yet" when the JSON is missing. Nothing here runs a bench.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "README.md"
sys.path.insert(0, str(BENCH))
import suite  # noqa: E402  (stdlib only: the headline figures and goals of every bench)

Table = list[str]


def fmt(v: Any, digits: int = 4) -> str:
    """A cell: numbers to `digits` significant figures (integers whole, with thousands commas)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> Table:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scalar values of `d`, one level of nesting flattened as `a.b`."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(scalars(v, f"{k}."))
        elif not isinstance(v, (dict, list)):
            out[prefix + k] = v
    return out


def generic(d: dict[str, Any]) -> Table:
    """A table of a bench's rows, for a bench without a renderer of its own: the first list of
    dicts, or dict of dicts, under rows / results / runs / table."""
    for key in ("rows", "results", "runs", "table"):
        rows = d.get(key)
        if isinstance(rows, dict) and rows and all(isinstance(v, dict) for v in rows.values()):
            rows = [{"row": name, **v} for name, v in rows.items()]
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            flat = [scalars(r) for r in rows]
            cols = list(dict.fromkeys(c for r in flat for c in r))
            return table(cols, [[r.get(c) for c in cols] for r in flat])
    return ["```", json.dumps(d, indent=1)[:4000], "```"]


def goals_table(d: dict[str, Any]) -> Table:
    g = d.get("goals")
    if not isinstance(g, dict):
        return []
    return ["", "Ratios the bench computes (its goals are in the headline table above):", ""] + table(
        ["figure", "value"], [[k, v] for k, v in g.items() if not isinstance(v, (dict, list))])


# ---- benches with a renderer of their own ------------------------------------------------------

def zo(d: dict[str, Any]) -> Table:
    out = ["Bytes on the wire per client per round (K=4096, tau=200, 8-bit scalars; FedKSeed's own for comparison):",
           ""]
    out += table(["clients", "up B", "down B", "down B, 10 rounds missed", "full state B", "FedKSeed up / down B"],
                 [[w["clients"], w["up_bytes"], w["down_bytes"], w["down_bytes_missed_10"], w["full_state_bytes"],
                   f"{fmt(w['fedkseed_up_bytes'])} / {fmt(w['fedkseed_down_bytes'])}"] for w in d["wire"]])
    t = d["throughput"]
    out += ["", f"z for all {t['elements']:,} weights of SmolLM2-135M, best of the repeats:", ""]
    out += table(["generator", "ms", "elements / s", "x torch.randn", "x the generator it replaced"],
                 [[name, 1000 * r["seconds"], r["elements_per_s"], r["speedup"], r.get("vs_before")]
                  for name, r in t["results"].items()])
    s = d["sync"]
    out += ["", f"Sync of a client that missed {s['missed_rounds']} rounds (K={s['K']}, tau={s['tau']}, {s['dist']} z): "
                f"{s['seeds_regenerated']} seeds regenerated in {fmt(s['seconds'])} s "
                f"({fmt(1000 * s['seconds_per_seed'])} ms a seed)."]
    return out


def gpu(d: dict[str, Any]) -> Table:
    out = [f"Device: {d['device']}; torch {d['torch']}; {d['steps']} steps a round, batch {d['batch']}, "
           f"seq {d['seq']}, {d['dtype']}. Peak memory is measured on a GPU only.", ""]
    for size, rows in d["sizes"].items():
        out += [f"Size `{size}`:", ""]
        runs = {k: v for k, v in rows.items() if "round_seconds" in v}
        out += table(["run", "clients", "round s", "client s", "tokens / s a client", "tokens / s in all",
                      "peak GiB", "round / plain loop", "all / one client"],
                     [[k, r["clients"], r["round_seconds"], r["client_seconds"], r["tokens_per_s_per_client"],
                       r["total_tokens_per_s"], r["peak_gib"], r.get("round_vs_plain"), r.get("total_vs_one")]
                      for k, r in runs.items()])
        if "zo-memory" in rows:
            z = rows["zo-memory"]
            out += ["", f"zo: peak / inference {fmt(z['peak_vs_inference'])}; perturbation {fmt(z['perturb_gb_s'])} "
                        f"GB/s against a copy's {fmt(z['copy_gb_s'])} GB/s ({fmt(z['perturb_vs_copy'])}x).", ""]
    z = d["z_agreement"]
    out.append("z drawn on the GPU against the CPU: " + ("equal" if z.get("equal") else "differ")
               if z.get("checked") else "z on the GPU against the CPU: not checked (no GPU).")
    return out


DILOCO_ROWS = {"fedavg-full": "FedAvg, full parameters, synced every step", "diloco": "DiLoCo, H = {h}, P = 1",
               "streaming": "Streaming, P = 4, tau = 0", "streaming-overlap": "Streaming overlapped, P = 4, tau = 1, alpha 0.5",
               "streaming-4bit": "Streaming + 4-bit both ways, P = 4, tau = 0"}


def diloco(d: dict[str, Any]) -> Table:
    h, runs = d["setup"]["inner-steps"], d["runs"]
    first = next(iter(runs.values()))
    out = [f"{d['setup']['clients']} clients, {d['setup']['steps']} inner AdamW steps per client in every row; eval loss "
           f"before {first['eval-loss-before']:.4f}, exact match {first['exact-match-before']:.3f}.", ""]
    out += table(["row", "rounds", "eval loss", "exact match", "up / down (MB)", "peak round (MB)", "wall s",
                  "client peak RSS (MB)"],
                 [[DILOCO_ROWS.get(k, k).format(h=h), r["rounds"], f"{r['eval-loss']:.4f}", f"{r['exact-match']:.3f}",
                   f"{mb(r['bytes-up'])} / {mb(r['bytes-down'])}", f"{r['peak-round-bytes'] / 1e6:,.1f}",
                   f"{r['seconds']:.0f}", f"{r['client-peak-rss-mb']:,.0f}"]
                  for k in [*DILOCO_ROWS, *(k for k in runs if k not in DILOCO_ROWS)] if (r := runs.get(k))])
    return out + goals_table(d)


def buffered(d: dict[str, Any]) -> Table:
    runs = d["runs"]
    first = next(iter(runs.values()))
    out = [f"{d['setup']['clients']} clients on the {first['engine']} engine; eval loss before "
           f"{first['eval-loss-before']:.4f}. Staleness: accepted replies by versions old.", ""]
    out += table(["row", "versions", "accepted replies", "eval loss", "training s", "wall s", "staleness"],
                 [[k, r["versions"], r["accepted"], f"{r['eval-loss']:.4f}", f"{r['train-seconds']:.0f}",
                   f"{r['wall-seconds']:.0f}", ", ".join(f"{s}: {n}" for s, n in r["staleness"].items())]
                  for k, r in runs.items()])
    return out + goals_table(d)


def quality(d: dict[str, Any]) -> Table:
    out = ["Equal epochs (gain as a fraction of centralized LoRA's at the same epochs and seed; each row's chosen keys "
           "are the best of its grid at 2 epochs, seed 0):", ""]
    out += (d.get("table") or "(not run)").splitlines()
    for s in d.get("equal_seconds", []):
        out += ["", f"{s['row']}: {fmt(s['gain / best rule' + chr(39) + 's at equal client seconds'], 3)} of "
                f"{s['against']}'s gain at equal client seconds, with {fmt(s['bytes, best rule / row'], 3)}x fewer bytes "
                f"({s['epochs']} epochs)."]
    if (BENCH / "quality.png").exists():
        out += ["", "![eval loss against bytes and client seconds](quality.png)"]
    if d.get("samples_table"):
        out += ["", "Same samples (2 rounds of 2 local steps against 32 centralized steps):", ""]
        out += d["samples_table"].splitlines()
    return out


DPO_ROWS = {"central-base": ("base, DPO", "centralized"), "fed-base": ("base, DPO", "federated"),
            "central-sft": ("SFT, DPO", "centralized"), "fed-sft": ("SFT, DPO", "federated"),
            "central-sft-rpo": ("SFT, DPO + NLL", "centralized"), "fed-sft-rpo": ("SFT, DPO + NLL", "federated")}


def dpo(d: dict[str, Any]) -> Table:
    runs = d["runs"]
    out = []
    if "sft" in runs:
        s = runs["sft"]
        out += [f"SFT = the `make demo` run's adapter (exact match {s['exact-match']:.3f}, eval loss {s['eval-loss']:.4f}, "
                f"{s['bytes'] / 1e6:.1f} MB); \"+ NLL\" is `dpo.loss-type=sigmoid,sft`. Held-out figures after the last "
                "round, its start in parentheses:", ""]

    def both(r: dict[str, Any], key: str, digits: int = 3) -> str:
        return f"{r[key]:.{digits}f} ({r[key + '-start']:.{digits}f})"

    out += table(["start, loss", "run", "reward accuracy", "margin", "preference accuracy", "exact match", "eval loss",
                  "MB", "wall s"],
                 [[*DPO_ROWS[k], both(r, "reward-accuracy"), f"{r['reward-margin']:.3f}",
                   both(r, "preference-accuracy"), both(r, "exact-match"), both(r, "eval-loss"),
                   f"{r['bytes'] / 1e6:.1f}", f"{r['seconds']:.0f}"]
                  for k in DPO_ROWS if (r := runs.get(k))])
    return out + goals_table(d)


def ledger(d: dict[str, Any]) -> Table:
    out = [f"Synthetic updates of {d['dim']:,} values, 3 rounds; gas per round is the mean of rounds 2 and 3.", ""]
    out += table(["chain", "clients", "gas / round", "round 1 gas", "gas / slash", "ledger s / round",
                  "register s / client", "sign ms / reply", "check ms / reply", "flags found"],
                 [[r["chain"], r["clients"], round(r["gas-record"]), r["gas-record-round1"], round(r["gas-per-slash"]),
                   r["ledger-s-per-round"], r["register-s-per-client"], r["sign-ms-per-reply"],
                   r["check-ms-per-reply"], r["flags-ok"]] for r in d["results"]])
    out += ["", "Gas per round, most / fewest clients: "
            + ", ".join(f"{c} {fmt(g, 5)}" for c, g in d["gas-growth"].items()) + " (goal: flat)."]
    return out + ledger_disputes(d.get("disputes", []))


def ledger_disputes(runs: list[dict[str, Any]]) -> Table:
    """The dispute figures, one chain's (the chains agree to the unit; the JSON keeps both)."""
    if not runs:
        return []
    d = runs[0]
    out = ["", f"Disputes ({', '.join(r['chain'] for r in runs)}): recordRound with a non-zero manifest hash, with "
           "disputes off and on, against 86,715 (recordRound before manifests and disputes).", ""]
    out += table(["call", "gas, disputes off", "gas, disputes on", "on / 86,715"],
                 [[label, d[f"{key}-off"], d[f"{key}-on"], round(d[f"{key}-on"] / 86_715, 2)]
                  for key, label in (("gas-record", "recordRound"), ("gas-record-round1", "recordRound, round 1"),
                                     ("gas-claim", "claim"), ("deploy-gas", "deploy"))])
    out += ["", "A whole dispute by committee size and outcome (dispute + votes + resolve + the challenger's "
            "collect):", ""]
    out += table(["verifiers", "outcome", "dispute", "first vote", "each later vote", "resolve", "collect", "total",
                  "total / 86,715"],
                 [[name.split("-")[0], c["outcome"], c["dispute"], c["votes"][0],
                   round(sum(c["votes"][1:]) / len(c["votes"][1:])) if len(c["votes"]) > 1 else "-", c["resolve"],
                   c["collect"], c["total"], round(c["total"] / 86_715, 2)] for name, c in d["committees"].items()])
    return out


CLIENT_START = {"gguf": "new process, GGUF", "cache": "new process, safetensors cache", "warm": "same process, next round",
                "worker-cold": "thin process, worker starts", "worker-warm": "thin process, warm worker"}


def client_start(d: dict[str, Any]) -> Table:
    cols = ("import", "load", "wrap", "data", "to-first-step", "step")
    out = table(["path", *(c.replace("-", " ") + " s" for c in cols)],
                [[CLIENT_START.get(k, k), *(r.get(c) for c in cols)] for k, r in d["rows"].items()])
    return out + ["", f"Model load, GGUF / safetensors cache: {fmt(d['gguf-over-cache-load'], 3)}x."]


RENDER: dict[str, Callable[[dict[str, Any]], Table]] = {
    "zo": zo, "gpu": gpu, "diloco": diloco, "dpo": dpo, "ledger": ledger, "client_start": client_start,
    "quality": quality, "async": buffered}


def command(name: str, d: dict[str, Any]) -> str:
    """The command that produced a bench's JSON, from the settings it records (defaults left out)."""
    setup = d.get("setup", {}) if isinstance(d.get("setup"), dict) else {}
    defaults = {"diloco": {"steps": 32, "inner-steps": 16, "clients": 4}, "dpo": {"rounds": 3, "steps": 8, "clients": 4},
                "robustness": {"strategies": "fedavg,median,trimmed-mean,krum,multikrum,norm-bounded"}}
    args = [f"--{k} {setup[k]}" for k, v in defaults.get(name, {}).items() if k in setup and setup[k] != v]
    if name == "gpu" and d.get("device") != "cpu":
        args.append("--sizes " + ",".join(d.get("sizes", {})))
    return " ".join([f"python bench/{name}.py", *args])


# ---- notes: what a recorded run shows, kept only while its JSON is the one they were written for ----

NOTES: dict[str, tuple[str, str]] = {  # bench: (sha256 prefix of its JSON, the note)
    "robustness": ("e3127dd1d277", """\
FedAvg for every attack (the flags' figures), median for the clean run, zero, noise and sign-flip (the
attacks where FedAvg ends above 1.05 of clean): the worst attack's best strategy is then replay's FedAvg at
1.031. Flags: precision and recall 1.00 for zero, noise, sign-flip, scale, replay and duplicate (on anvil
with commit-reveal), no honest client flagged in any run. label-flip: no flag raised (recall 0): at 2 local
steps a label-flipped update's validation gains sit inside the honest spread (the parity flipper's gain on
its own family's examples even above its honest twin's) and the run's eval loss is 1.001 of the clean
run's; nothing in the data tells it, and the harmful test does not guess. The validation gains cost 11
evaluations of 16 examples a round: 50 to 80 s on one CPU thread, the rest of the ledger about 1 s. Three
invocations merged (see the JSON's note)."""),
    "zo": ("3aaa566ca864", """\
fedllm's device-independent z is faster than what it replaced on the CPU: Gaussian 2.68x torch.randn,
Rademacher 1.16x numpy SFC64 signs (goal 1.0x each); Rademacher z is 9.54x torch.randn (goal 5x)."""),
    "gpu": ("cd5e1ae9aaf8", """\
No GPU has run this bench yet: the figures are a tiny Llama config on 2 CPU cores, where a round's fixed costs
(about 20 ms) outweigh its 10 ms of steps, so a LoRA round is 2.06x the plain loop. The goals (8B QLoRA <= 12 GB
and <= 1.05x the plain loop; 8 clients >= 0.9x one client's tokens/s; zo peak <= 1.1x inference, perturbation
>= 0.5x the copy bandwidth) are open until `python bench/gpu.py --sizes 1.7b,8b` runs on a GPU."""),
    "diloco": ("c656836f1bde", """\
- **Peak bytes**: a streaming round moves one fragment each way, 0.26316 of a DiLoCo round, exactly the largest
  fragment's share of SmolLM2's weights (strided over 30 blocks, P = 4: two fragments of 8 blocks, two of 7, each
  with a quarter of the embedding and final norm). 1 / P exactly would need the blocks to divide by P. The run's
  last round is the exception by design (`diloco.final-sync`): it syncs every fragment, 2,662 MB up and down,
  0.62 of a DiLoCo round's.
- **Eval loss: streaming 0.9997 of DiLoCo's** (0.7440 vs 0.7442; goal within 2%: met). Before the final sync it
  was 6.5% above (0.7923): three of the four fragments missed the clients' last 12, 8 and 4 steps. Only the
  streaming row was rerun with it; the overlapped and 4-bit rows are from before (their last rounds synced one
  fragment).
- **Total bytes**: 119.9x fewer with 4-bit streaming than full-parameter FedAvg synced every step (goal >= 100x,
  recorded before the final sync, which adds a whole model's outer gradient up and the steps down in 4 bits);
  streaming alone 14.1x (21x for DiLoCo): its final round uploads the whole model once more.
- **Client memory**: a client's peak RSS (one client's two rounds in a process of its own, by VmHWM) is 5.5 to
  6.9 GB against 0.54 GB of float32 weights: its weights, AdamW moments, snapshot and held fragments, with part of
  its state held twice in serialized form. 2 CPU cores shared with other work, so the wall times are loose."""),
    "async": ("5a46653f3d2d", """- **One client 8x slower**: async reaches the synchronous run's final eval loss (1.5334) in 0.25 of its
  training seconds, 0.384 counted in whole round seconds (async evaluates every one of its 24 versions; goal
  <= 0.5: met either way), and ends at 1.0113 after 48 accepted replies. Replies were at most 4 versions old.
- **Equal speeds**: async-equal 0.995 of sync-equal's eval loss at the same 16 replies (goal within 2%: met),
  with server.version-wait 0.5 (5 of 16 replies one version old). Before the wait's work-time estimate
  dropped each node's first reply (its model load), the same row gave 1.039; with no wait (FedBuff as
  published) 1.029, 9 of 16 replies stale. One run each: Ray's arrival order varies run to run.
- The rows ran one after another on 2 cores (4 Ray actors at 0.5 CPU); sync-slow's training seconds were
  349.8 in an earlier run under other benches' load, 174.9 here: compare ratios within this JSON only."""),
    "quality": ("28eddafd488a", """\
- **Best rule**: `fedavgm(lr=1.5, momentum=0.0)` with `train.keep-optimizer=true` (from FedAvg's best: 7 local
  steps a round, lr 4e-3) reaches 0.985 +- 0.045 of centralized LoRA's gain at 2 epochs over 3 seeds (goal >= 0.98:
  met; the interval's lower end 0.940, goal 0.95: missed), 0.827 at 1 epoch and 1.073 at 4 (seed 0; centralized
  keeps its lr tuned at 2 epochs). Plain FedAvg 0.833: the mean of 8 deltas each trained on other tasks moves each
  task by about an eighth of its client's step; the server step of 1.5 and the kept moments close most of it.
- **Schedule and moments**: keeping the AdamW moments helps (1.3020 -> 1.2501), a cosine decay over 2 rounds does
  not (1.3659); fedadam at server lr 1e-2 is below FedAvg (1.3755).
- **Defaults** (lr 1e-3, fresh AdamW, FedAvg): 0.718, 0.715 of the best rule on the same seed (goal 0.95: missed;
  no default was changed in this run of the bench).
- **Ferret** (K=4096): 0.437 of centralized, 0.525 of FedAvg's gain at the same local steps (its seconds are those
  steps plus the projection), with 538x fewer bytes; its loss rose in the second round (projection noise). The
  equal-seconds lines above mix runs made under different loads (the best rule's seed-0 run took 250 client
  seconds, its later seeds 100): read them as indicative. Sparse zo (`zo.mask=0.001`, twice the steps): 0.059;
  at zo.lr 1e-2 it diverged. Exact match stays 0 for both.
- Seeds 1 and 2, and 1 and 4 epochs, ran only for centralized and the best rule: 2 CPU cores were shared with
  other benches and the test suite, so the client seconds are loose."""),
    "dpo": ("ffc6f9c1a034", """\
- Federated DPO reaches 0.947 (from the base), 0.952 (from SFT) and 0.955 (from SFT, with the NLL term) of the
  centralized reward-accuracy gain (goal >= 0.9: met).
- Exact match from the SFT adapter (goal: not below the start by more than 0.02): **missed with plain DPO**,
  0.286 -> 0.190 federated (0.238 centralized). With 21 generated examples one answer is 0.048, so the goal allows
  no answer lost; plain DPO lowers the likelihood of the chosen answers too (eval loss 0.80 -> 0.93 federated,
  -> 2.18 centralized), the known DPO failure that an NLL term on the chosen answers counters. With `sigmoid,sft`
  exact match rises instead (0.381 federated, 0.571 centralized) and the eval loss falls.
- Federated margins are smaller than centralized ones at about the same accuracy: FedAvg of adapters trained on
  disjoint task families averages the per-family moves, so the global model drifts less from the start (the eval
  loss from the base: +3% federated, +70% centralized).
- Bytes: the federated rows move 4 clients' adapters a round (centralized is a federation of one). The base rows
  ran beside the test suite, so their wall times are not compared."""),
}


def docstring(name: str) -> tuple[str, str, str]:
    """(summary, usage lines, description) of bench/<name>.py's docstring, read without importing it:
    the summary is its first paragraph, the usage its `python bench/...` lines."""
    doc = ast.get_docstring(ast.parse((BENCH / f"{name}.py").read_text())) or ""
    lines = doc.splitlines()
    usage = [x.strip() for x in lines if x.strip().startswith("python bench/")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(x for x in lines if not x.strip().startswith("python bench/")))
    summary, _, rest = text.strip().partition("\n\n")
    return " ".join(summary.split()), "\n".join(usage), rest.strip()


def load(name: str) -> tuple[dict[str, Any] | None, str]:
    path = BENCH / f"{name}.json"
    if not path.exists():
        return None, ""
    raw = path.read_bytes()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()[:12]


def headline(name: str, d: dict[str, Any]) -> list[list[Any]]:
    """suite.py's headline rows of a bench's JSON, with its goals; a figure the JSON lacks (written
    before the bench added it) shows as not recorded, the others as usual."""
    fn = dict((n, f) for n, _, f in suite.SUITE)[name]
    goals = dict(d["goals"]) if isinstance(d.get("goals"), dict) else None
    d = {**d, "goals": goals} if goals is not None else d
    for _ in range(10):
        try:
            rows = fn(d)
            break
        except KeyError as exc:
            if goals is None or exc.args[0] in goals:
                return [[name, f"(its JSON does not give the headline figures: KeyError {exc})", "-", "-", "-"]]
            goals[exc.args[0]] = math.nan
        except (TypeError, ValueError, StopIteration) as exc:
            return [[name, f"(its JSON does not give the headline figures: {type(exc).__name__} {exc})", "-", "-", "-"]]
    else:
        return [[name, "(its JSON does not give the headline figures)", "-", "-", "-"]]
    out = []
    for figure, value, goal, met in rows:
        if isinstance(value, float) and math.isnan(value):
            out.append([name, figure, "not in this JSON (written before the bench measured it)", goal or "-", "-"])
        else:
            out.append([name, figure, value, goal or "-", "-" if not goal else ("yes" if met(value) else "**no**")])
    return out


def render() -> str:
    names = [n for n, _, _ in suite.SUITE]
    data = {n: load(n) for n in names}
    out = ["# Benchmarks", "",
           "<!-- generated by bench/readme.py from bench/*.json: edit the script, not this file -->", "",
           "`make bench` runs every script below in a short mode (fewer rounds, steps and repeats), prints one table of",
           "the headline figures beside their goals and writes `bench/results.json`; `make bench-full` runs each",
           "script with its full settings, each writing `bench/<name>.json` (committed). Short figures are",
           "indicative; the tables below are the full runs. Each script prints a table and writes JSON next to",
           "itself; `python bench/readme.py` rewrites this file from the JSON (`--check` fails when it is stale).",
           "Figures were measured on 2 CPU cores unless a table says otherwise.", ""]
    out += table(["script", "what it measures"], [[f"[`bench/{n}.py`](#{n.replace('_', '_')})", docstring(n)[0]]
                                                  for n in names])
    out += ["", "## Headline figures", "",
            "From each bench's own JSON (its full run), with the goals `bench/suite.py` checks:", ""]
    rows = [row for n in names if data[n][0] is not None for row in headline(n, data[n][0])]
    out += table(["bench", "figure", "measured", "goal", "met"], rows)
    missing = [n for n in names if data[n][0] is None]
    if missing:
        out += ["", "Not recorded yet: " + ", ".join(f"`{n}`" for n in missing) + " (see each section below)."]
    short = BENCH / "results.json"
    if short.exists():
        r = json.loads(short.read_text())
        out += ["", f"### The short suite (`make bench`, {r.get('date', 'undated')})", "",
                "From bench/results.json; each script ran with the short arguments listed, so the figures are "
                "indicative:", ""]
        out += table(["bench", "figure", "measured", "goal", "met"],
                     [[h["bench"], h["figure"], h["value"], h["goal"] or "-",
                       "-" if h["met"] is None else ("yes" if h["met"] else "**no**")] for h in r["headline"]])
        runs = r.get("runs", {})
        if runs:
            out += [""] + table(["bench", "short arguments", "seconds"],
                                [[n, "`" + " ".join(v.get("arguments", [])) + "`" if v.get("arguments") else "(none)",
                                  v.get("seconds")] for n, v in runs.items()])
        if r.get("failed"):
            out += ["", "Failed: " + ", ".join(r["failed"])]
    for n in names:
        summary, usage, text = docstring(n)
        d, digest = data[n]
        out += ["", f"## {n}", "", summary, "", text, ""]
        if usage:
            out += ["```bash", usage, "```", ""]
        if d is None:
            out.append(f"Not recorded yet: `python bench/{n}.py` writes bench/{n}.json.")
            continue
        out += [f"Recorded by `{command(n, d)}` (bench/{n}.json):", ""]
        out += RENDER.get(n, generic)(d)
        if n in NOTES:
            written_for, note = NOTES[n]
            out += [""]
            if digest != written_for:
                out += ["*These notes were written for an earlier run of this bench; check them against the table.*", ""]
            out += note.splitlines()
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when bench/README.md is out of date")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(BENCH.parent)} is out of date: run python bench/readme.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(BENCH.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
