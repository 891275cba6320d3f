import pytest
from transformers import AutoTokenizer

from fedllm.data import IGNORE, collate, encode, prompt_text

pytestmark = pytest.mark.gguf  # the real SmolLM2 GGUF, converted once per session

EX = {"instruction": "Compute the expression.", "input": "2 + 3", "response": "5", "family": "arithmetic"}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_prompt_uses_chat_template_and_system_prompt(tok):
    text = prompt_text(tok, EX, "Answer with the result only.")
    assert text.startswith("<|im_start|>system\nAnswer with the result only.<|im_end|>")
    assert "<|im_start|>user\nCompute the expression.\n2 + 3<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_plain_format_without_chat_template(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = None
    assert prompt_text(tok, EX) == "### Instruction:\nCompute the expression.\n2 + 3\n\n### Response:\n"


def test_labels_cover_response_and_eos_only(tok):
    row = encode(tok, EX, max_length=512, system_prompt="Be brief.")
    ids, labels = row["input_ids"], row["labels"]
    n_prompt = len(tok(prompt_text(tok, EX, "Be brief."), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    answer = labels[n_prompt:]
    assert IGNORE not in answer
    assert answer == ids[n_prompt:]
    assert tok.decode(answer) == "5" + tok.eos_token


def test_truncation_keeps_the_response(tok):
    row = encode(tok, {**EX, "response": "a fairly long answer"}, max_length=8)
    assert len(row["input_ids"]) == 8
    kept = [t for t in row["labels"] if t != IGNORE]
    assert tok.decode(kept) == "a fairly long answer" + tok.eos_token


def test_collate_pads_right_and_masks(tok):
    a, b = encode(tok, EX, 64), encode(tok, {**EX, "input": "12 + 345 + 6789"}, 64)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][0].sum() == len(a["input_ids"])
    assert (batch["labels"][0, len(a["input_ids"]):] == IGNORE).all()
