"""Server-side evaluation: loss on response tokens, and every registered metric
(fedllm.evaluation.metrics: exact match, Rouge-L, a plug-in's own) of greedy generation, overall and per
task family (or per label).

    metrics = evaluate(model, tokenizer, held_out, data_cfg, batch_size=16, em_examples=16)
    metrics["eval-loss"], metrics["exact-match"], metrics["rouge-l"]
    metrics["families"]["arithmetic"]  # {"eval-loss", "tokens", "exact-match", "rouge-l", "generated"}

The overall figures are the per-family ones weighted by their counts: eval loss by response
tokens, the metrics by generated examples.
"""

from __future__ import annotations

from typing import Any

import torch

from fedllm.config import DataConfig
from fedllm.data.templates import IGNORE, collate, cut_prompt, encode, prompt_text
from fedllm.evaluation.metrics import METRICS, normalize, rouge_l  # noqa: F401  (normalize, rouge_l: this module's API before)


@torch.no_grad()
def example_losses(model: Any, tokenizer: Any, examples: list[dict[str, str]], cfg: DataConfig,
                   batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed cross-entropy over the response tokens, number of response tokens) per example."""
    rows = [encode(tokenizer, e, cfg.max_length, cfg.system_prompt) for e in examples]
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]  # prompt tuning prepends virtual tokens
        logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        target = batch["labels"][:, 1:]  # (B, T-1)
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")  # (B, T-1)
        out += zip(loss.sum(dim=1).tolist(), (target != IGNORE).sum(dim=1).tolist())
    return out


def eval_loss(model: Any, tokenizer: Any, examples: list[dict[str, str]], cfg: DataConfig,
              batch_size: int = 16) -> float:
    """Mean cross-entropy per response token over all examples (token-weighted)."""
    losses = example_losses(model, tokenizer, examples, cfg, batch_size)
    return sum(s for s, _ in losses) / max(sum(n for _, n in losses), 1)


def pair_logps(model: Any, tokenizer: Any, pairs: list[dict[str, str]], cfg: DataConfig,
               batch_size: int = 16) -> torch.Tensor:
    """(N, 2): log pi(chosen | prompt) and log pi(rejected | prompt) of each preference pair, summed
    over the answer's tokens and its eos (as `encode` builds them: the tokens TRL's DPO scores, for a
    tokenizer that adds no special tokens of its own, as SmolLM2's; one that adds a BOS gets it once
    more in TRL's sequences)."""
    rejected = [{**p, "response": p["rejected"]} for p in pairs]
    losses = example_losses(model, tokenizer, pairs + rejected, cfg, batch_size)
    sums = torch.tensor([-s for s, _ in losses], dtype=torch.float64)
    return torch.stack([sums[:len(pairs)], sums[len(pairs):]], dim=1)


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    """DPO's held-out figures from `pair_logps` of the policy and of a reference: the implicit reward
    r = beta * (log pi - log ref) of each answer; reward-accuracy, the share of pairs whose chosen
    answer has the larger reward (TRL's rewards/accuracies: a tie counts as wrong); reward-margin,
    the mean r(chosen) - r(rejected); preference-accuracy, the share the policy itself gives the
    chosen answer the higher likelihood (reference-free)."""
    rewards = beta * (policy - reference)  # (N, 2)
    margin = rewards[:, 0] - rewards[:, 1]
    return {"reward-accuracy": float((margin > 0).double().mean()), "reward-margin": float(margin.mean()),
            "preference-accuracy": float((policy[:, 0] > policy[:, 1]).double().mean())}


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, examples: list[dict[str, str]], cfg: DataConfig,
                     max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
    """Greedy completions of each example's prompt (left-padded batches)."""
    device = next(model.parameters()).device
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(examples), batch_size):
            prompts = [prompt_text(tokenizer, e, cfg.system_prompt) for e in examples[i:i + batch_size]]
            ids = [cut_prompt(p, cfg.max_length) for p in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
            enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def exact_match(model: Any, tokenizer: Any, examples: list[dict[str, str]], cfg: DataConfig,
                max_new_tokens: int = 16, batch_size: int = 16) -> float:
    """Share of examples whose normalized greedy answer equals the normalized reference."""
    if not examples:
        return 0.0
    answers = generate_answers(model, tokenizer, examples, cfg, max_new_tokens, batch_size)
    return sum(normalize(a) == normalize(e["response"]) for a, e in zip(answers, examples)) / len(examples)


def family_of(example: dict[str, str]) -> str:
    """The example's task family: the built-in suite's, or a file's data.label-field ('all' without one)."""
    return str(example.get("family", "all"))


def em_subset(examples: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """A fixed subset of `n` examples spread over families (round-robin)."""
    by_family: dict[str, list[dict[str, str]]] = {}
    for e in examples:
        by_family.setdefault(family_of(e), []).append(e)
    picked: list[dict[str, str]] = []
    depth = 0
    while len(picked) < min(n, len(examples)):
        for items in by_family.values():
            if depth < len(items) and len(picked) < n:
                picked.append(items[depth])
        depth += 1
    return picked


def evaluate(model: Any, tokenizer: Any, examples: list[dict[str, str]], cfg: DataConfig,
             batch_size: int = 16, em_examples: int = 16, max_new_tokens: int = 16) -> dict[str, Any]:
    """Eval loss over `examples`; every registered metric over `em_subset(examples, em_examples)`;
    the same per family under "families" when the examples carry more than one label."""
    was_training = model.training
    model.eval()
    try:
        losses = example_losses(model, tokenizer, examples, cfg, batch_size)
        picked = em_subset(examples, em_examples)
        answers = generate_answers(model, tokenizer, picked, cfg, max_new_tokens, batch_size) if picked else []
    finally:
        model.train(was_training)
    metrics = METRICS.entries()
    families: dict[str, dict[str, Any]] = {}
    for e, (loss, tokens) in zip(examples, losses):
        f = families.setdefault(family_of(e), {"loss-sum": 0.0, "tokens": 0, "generated": 0,
                                               "sums": {m.name: 0.0 for m in metrics}})
        f["loss-sum"] += loss
        f["tokens"] += tokens
    for e, answer in zip(picked, answers):
        f = families[family_of(e)]
        f["generated"] += 1
        for m in metrics:
            f["sums"][m.name] += float(m.impl(answer, e["response"]))
    tokens = sum(f["tokens"] for f in families.values())
    out: dict[str, Any] = {"eval-loss": sum(f["loss-sum"] for f in families.values()) / max(tokens, 1)}
    for m in metrics:
        out[m.name] = sum(f["sums"][m.name] for f in families.values()) / len(picked) if picked else 0.0
    if len(families) > 1:
        out["families"] = {name: {
            "eval-loss": f["loss-sum"] / max(f["tokens"], 1), "tokens": f["tokens"],
            **{m.name: f["sums"][m.name] / f["generated"] if f["generated"] else None for m in metrics},
            "generated": f["generated"]} for name, f in sorted(families.items())}
    return out
