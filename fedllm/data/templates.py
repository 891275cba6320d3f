"""Prompt formatting, tokenization with response-only labels, and batching.

The prompt uses the tokenizer's chat template when it has one (a plain instruction format
otherwise). Token ids are built as prompt_ids + response_ids + [eos], so the label mask is
exact: prompt positions get -100 and only response tokens (and the closing eos) count in the
loss.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from fedllm.errors import DataError

IGNORE = -100


def prompt_text(tokenizer: Any, example: dict[str, str], system_prompt: str = "") -> str:
    """The text a model sees before its answer."""
    user = example["instruction"]
    if example.get("input"):
        user = f"{user}\n{example['input']}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}### Instruction:\n{user}\n\n### Response:\n"


def encode(
    tokenizer: Any, example: dict[str, str], max_length: int, system_prompt: str = ""
) -> dict[str, list[int]]:
    """input_ids and labels (-100 on the prompt), at most `max_length` tokens.

    Truncation keeps the response (with its eos) and cuts the prompt from the left, keeping its
    end, where the question and the chat template's assistant header are. The prompt keeps at
    least a quarter of `max_length` (or all of it, if shorter): a response that would leave it
    less is cut from the right, so no example trains on an answer without its question.
    Evaluation cuts generation prompts from the left to `max_length` (`cut_prompt`).
    """
    prompt_ids = tokenizer(prompt_text(tokenizer, example, system_prompt), add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(resp_ids) > max_length:
        floor = min(len(prompt_ids), max_length // 4)  # what the prompt keeps at least
        resp_ids = resp_ids[:max_length - floor]
        prompt_ids = cut_prompt(prompt_ids, max_length - len(resp_ids))
    return {"input_ids": prompt_ids + resp_ids, "labels": [IGNORE] * len(prompt_ids) + resp_ids}


def pair_text(tokenizer: Any, example: dict[str, str], system_prompt: str = "") -> dict[str, str]:
    """A preference pair as TRL's DPO takes it: the prompt as the model sees it before its answer,
    and the chosen and rejected answers (TRL appends the eos to each, as `encode` does)."""
    return {"prompt": prompt_text(tokenizer, example, system_prompt), "chosen": example["response"],
            "rejected": example["rejected"]}


def cut_prompt(ids: list[int], budget: int) -> list[int]:
    """The last `budget` tokens of a prompt (its start goes first when it is too long)."""
    return ids[len(ids) - budget:] if len(ids) > budget else ids


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded rows into (B, T) tensors."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(rows: list[dict[str, list[int]]], batch_size: int, pad_id: int,
            gen: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless collated batches from seeded permutations, epoch after epoch (repeatable).

    A new permutation is drawn from `gen` only when fewer than `batch_size` rows are left, so a
    caller that draws from `gen` between batches sees the same stream every run. With fewer rows
    than `batch_size`, each batch is all of them, reshuffled.

    Raises:
        DataError: for no rows (a client with nothing to train on).
    """
    if not rows:
        raise DataError("data: no training examples to batch (an empty partition)")
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        yield collate([rows[i] for i in picked], pad_id)
