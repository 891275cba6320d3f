"""Shared fixtures: the real SmolLM2 GGUF converted once per session (tests marked gguf), and a
tiny random Llama with a small byte-level BPE tokenizer this file trains on the built-in tasks,
with SmolLM2's special tokens and ChatML template (fast to train, the same text pipeline as the
real model, and no GGUF conversion: what `make test-fast` runs)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fedllm.config import ModelConfig
from fedllm.model import MODEL_CACHE, convert_gguf, packaged_gguf

logging.getLogger("fedllm").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF, converted to safetensors (real, ~30 s once)."""
    return convert_gguf(packaged_gguf(), model_cache)


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (1024 tokens) trained on the built-in tasks' text, with
    SmolLM2's special tokens (<|im_start|> bos, <|im_end|> eos and pad, <|endoftext|> unk) and
    a ChatML chat template. Any text encodes (bytes are its alphabet); the tasks' words are few
    tokens each, as with a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedllm.config import DataConfig
    from fedllm.data import load_splits

    train, held_out = load_splits(DataConfig())
    texts = [" ".join(str(e.get(k, "")) for k in ("instruction", "input", "response")) for e in train + held_out]
    texts += ["system user assistant Answer with the result only. Be brief. ### Instruction: ### Response:"] * 8
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer random Llama (hidden 64) with the tiny tokenizer and its chat template.

    initializer_range 0.2 (not 0.02) gives the tied embeddings enough norm for the logits to
    move far from uniform, so a few LoRA steps visibly lower the loss.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, initializer_range=0.2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_cfg(tiny_model_dir) -> ModelConfig:
    return ModelConfig(name=str(tiny_model_dir))


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    MODEL_CACHE.clear()
    yield
    MODEL_CACHE.clear()


@pytest.fixture
def task_identity():
    """Flower stamps messages with the running task's identity; outside a run we set one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def reply_to(node: int, content):
    """A reply from `node` to a train message, as Flower's grid would hand it to a strategy."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=out)


def tiny_run_config(tiny_model_dir, tmp_path, **over):
    """The config of a short in-process run of the tiny model (2 rounds of 2 steps, 2 families),
    with `over` on top: for tests that drive `fedllm.server.loop.run` through a LocalGrid."""
    from fedllm.config import Config

    flat = {"model.name": str(tiny_model_dir), "server.run-dir": str(tmp_path), "server.run-name": "run",
            "server.num-rounds": 2, "server.min-clients": 1, "data.families": "parity,arithmetic",
            "data.train-per-family": 8, "data.eval-per-family": 2, "train.local-steps": 2, "lora.dropout": 0.0,
            "server.exact-match-examples": 2, "server.max-new-tokens": 2, **over}
    return Config.from_flat(flat)


def listening(pids) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket that the processes `pids` and their
    descendants listen on (psutil), for the tests that hold a run to loopback."""
    import psutil

    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
    found = set()
    for proc in procs:
        try:
            found |= {(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # it ended meanwhile
            continue
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (::ffff:127.0.0.1, how a dual-stack socket shows it)."""
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback
