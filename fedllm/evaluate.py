"""Server-side evaluation: loss on response tokens, and exact match from greedy generation.

    metrics = evaluate(model, tokenizer, held_out, data_cfg, batch_size=16, em_examples=16)
    metrics["eval-loss"], metrics["exact-match"]
"""

from __future__ import annotations

from typing import Any

import torch

from fedllm.config import DataConfig
from fedllm.data.templates import IGNORE, collate, cut_prompt, encode, prompt_text


@torch.no_grad()
def eval_loss(model: Any, tokenizer: Any, examples: list[dict[str, str]], cfg: DataConfig,
              batch_size: int = 16) -> float:
    """Mean cross-entropy per response token over all examples (token-weighted)."""
    rows = [encode(tokenizer, e, cfg.max_length, cfg.system_prompt) for e in examples]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        target = batch["labels"][:, 1:]  # (B, T-1)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1),
            ignore_index=IGNORE, reduction="sum",
        )
        total += loss.item()
        count += int((target != IGNORE).sum())
    return total / max(count, 1)


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


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
    hits = sum(normalize(a) == normalize(e["response"]) for a, e in zip(answers, examples))
    return hits / len(examples)


def em_subset(examples: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """A fixed subset of `n` examples spread over families (round-robin)."""
    by_family: dict[str, list[dict[str, str]]] = {}
    for e in examples:
        by_family.setdefault(e.get("family", "all"), []).append(e)
    picked: list[dict[str, str]] = []
    depth = 0
    while len(picked) < min(n, len(examples)):
        for items in by_family.values():
            if depth < len(items) and len(picked) < n:
                picked.append(items[depth])
        depth += 1
    return picked


def evaluate(model: Any, tokenizer: Any, examples: list[dict[str, str]], cfg: DataConfig,
             batch_size: int = 16, em_examples: int = 16, max_new_tokens: int = 16) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return {
            "eval-loss": eval_loss(model, tokenizer, examples, cfg, batch_size),
            "exact-match": exact_match(model, tokenizer, em_subset(examples, em_examples), cfg,
                                       max_new_tokens, batch_size),
        }
    finally:
        model.train(was_training)
