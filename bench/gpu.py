"""Accelerator figures: per method, a client's training tokens per second, peak device memory, and a
federated round's time against a plain PEFT + torch loop doing the same steps on the same device;
1, 4 and 8 clients sharing one device in one process (the in-process engine's case); a zeroth-order
client's peak memory against inference's and its perturbation bandwidth against the device's copy
bandwidth; and, on a GPU, z drawn there against z drawn on the CPU (bit for bit).

    python bench/gpu.py                          # here: a tiny Llama-shaped config on the CPU (make bench)
    python bench/gpu.py --sizes 1.7b,8b          # on a GPU: Qwen3-1.7B- and Llama-3-8B-shaped configs
    python bench/gpu.py --sizes 8b --methods qlora --clients 1 --steps 10

Models are built from a transformers config with random weights (nothing is downloaded), saved once
into a scratch folder with a byte-level tokenizer (one token a byte), and every row trains on rows of
exactly --seq tokens (batch --batch, LoRA rank 16). A federated round is fedllm's own: the method's
server half sends train messages, fedllm's client (`client_train.handle`) syncs, trains and uploads,
the rule aggregates and the server applies it (server-side evaluation off). Peak memory is
torch.cuda.max_memory_allocated over the timed rounds or steps, after the warm-up that loads the
model, on a GPU (not measured on the CPU: "-"). Prints a table and writes JSON.

Goals on a GPU (the issue's): 8B QLoRA (r 16, seq 512, batch 4, checkpointing) <= 12 GB and a round
<= 1.05x the plain loop; 8 clients on one GPU >= 0.9x one client's tokens/s; zo peak <= 1.1x
inference, perturbation >= 0.5x the copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).with_suffix(".json")
SIZES = {  # (config class, its arguments); random weights
    "tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)),
    "1.7b": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)),
    "8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)),
}
METHODS = {  # fedllm config of each row (on top of the common one)
    "lora": {},
    "qlora": {"model.quantize": "nf4", "train.gradient-checkpointing": True},
    "exact-lora": {"train.method": "exact-lora"},
    "diloco": {"train.method": "diloco", "diloco.params": "lora", "diloco.fragments": 1},
    "zo": {"train.method": "zo", "zo.num-seeds": 1024, "zo.lr": 1e-6},
}


def build_model(size: str, root: Path, dtype: torch.dtype) -> Path:
    """A random-weight model of `size` with a byte-level tokenizer, saved under `root` (once)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = root / size
    if (path / "config.json").is_file():
        return path
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    kind, kw = SIZES[size]
    config = getattr(transformers, kind)(max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds, not minutes
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def write_data(path: Path, seq: int, n: int) -> Path:
    """Rows whose response alone fills `seq` byte tokens: every training row is exactly `seq` long."""
    text = ("the quick brown fox jumps over the lazy dog " * (seq // 40 + 2))
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"q{i}", "response": text[i % 40:]}) + "\n")
    return path


def flat_config(model_dir: Path, data: Path, work: Path, args: argparse.Namespace, method: str) -> dict[str, Any]:
    flat: dict[str, Any] = {
        "model.name": str(model_dir), "model.dtype": args.dtype, "data.source": str(data), "data.max-length": args.seq,
        "data.eval-fraction": 0.05, "train.local-steps": args.steps, "train.batch-size": args.batch,
        "lora.rank": 16, "lora.alpha": 32, "lora.dropout": 0.0, "server.evaluate": False, "server.min-clients": 1,
        "server.run-dir": str(work), "server.run-name": method, "server.checkpoint": False,
    }
    flat.update(METHODS[method])
    if method == "diloco":  # one fragment: a round runs diloco.inner-steps steps
        flat["diloco.inner-steps"] = args.steps
    return flat


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset() -> None:
    from fedllm.model import MODEL_CACHE

    MODEL_CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def federated_round(flat: dict[str, Any], clients: int, rounds: int) -> dict[str, Any]:
    """`rounds` rounds of fedllm's in-process round with `clients` clients on this process's device:
    the best round's seconds after the first (which warms the model cache and the kernels), and peak
    memory."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedllm.client.round import handle
    from fedllm.config import Config
    from strategies import build

    reset()
    if TaskIdentity._task_id is None:  # Flower stamps messages with the running task's identity (as LocalGrid does)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = Config.from_flat(flat)
    strategy = build(cfg)
    contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                           node_config={"partition-id": n - 1, "num-partitions": clients}) for n in range(1, clients + 1)}
    times, train = [], []  # the best round after the first (which warms the cache and the kernels)
    for rnd in range(1, rounds + 1):
        sync()
        t0 = time.perf_counter()
        msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(cfg.to_flat()), Grid(list(contexts))))
        replies, client_seconds = [], 0.0
        for m in msgs:
            c0 = time.perf_counter()
            replies.append(Message(handle(m.content, contexts[m.metadata.dst_node_id]), reply_to=m))
            sync()
            client_seconds += time.perf_counter() - c0
        result = strategy.round(rnd, replies)
        sync()
        times.append(time.perf_counter() - t0)
        train.append(client_seconds)
        if not result.applied:
            raise SystemExit(f"round {rnd} was not applied: {result.dropped}")
        if rnd == 1 and torch.cuda.is_available():  # the peak of a round, not of loading the model
            torch.cuda.reset_peak_memory_stats()
    best = min(range(1, rounds), key=times.__getitem__)
    return {"round_seconds": times[best], "client_seconds": train[best] / clients, "peak_gib": peak()}


def plain_loop(flat: dict[str, Any], steps: int) -> dict[str, Any]:
    """The same LoRA steps with plain PEFT + torch on the same device: one AdamW, batches of `batch` rows of
    `seq` tokens, bf16 autocast where fedllm's train.precision=auto takes it, checkpointing and NF4 as the
    row's config asks."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fedllm import devices
    from fedllm.config import Config

    reset()
    cfg = Config.from_flat(flat)
    device = devices.resolve(cfg.model.device)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    kw: dict[str, Any] = {"dtype": dtype}
    if cfg.model.quantize != "none":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name, **kw)
    if cfg.model.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=cfg.lora.modules(),
                                             task_type="CAUSAL_LM"))
    if cfg.train.gradient_checkpointing:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    mode = devices.precision(cfg.train.precision, device)
    ids = torch.randint(0, 256, (cfg.train.batch_size, cfg.data.max_length), device=device)
    model.train()

    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            with devices.autocast(device, mode):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    run(1)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = run(steps)
    out = {"seconds": seconds, "peak_gib": peak()}
    del model, opt
    return out


def zo_memory(flat: dict[str, Any]) -> dict[str, Any]:
    """Peak device memory of an inference forward pass and of zo steps on the same batch; the perturbation's
    bandwidth (parameter bytes read and written per second) against a plain copy of the same bytes."""
    from fedllm.config import Config
    from fedllm.methods.zo import engine as zo

    reset()
    cfg = Config.from_flat(flat)
    engine, _ = zo.engine_for(cfg)
    ids = torch.randint(0, 256, (cfg.train.batch_size, cfg.data.max_length))
    batch = {"input_ids": ids, "labels": ids}
    base = peak()
    with torch.no_grad():
        engine.loss(batch)
    inference = peak()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for k in range(2):
        engine.step(batch, k)
    step = peak()
    nbytes = sum(p.numel() * p.element_size() for p in engine.params)
    times = []
    for seed in range(3):
        sync()
        t0 = time.perf_counter()
        zo.perturb_(engine.params, seed + 1, 1e-6, cfg.zo.dist)
        sync()
        times.append(time.perf_counter() - t0)
    big = max(engine.params, key=lambda p: p.numel())
    copy = torch.empty_like(big)
    copies = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        copy.copy_(big)
        sync()
        copies.append(time.perf_counter() - t0)
    perturb_bw = 2 * nbytes / min(times)
    copy_bw = 2 * big.numel() * big.element_size() / min(copies)
    return {"model_gib": base, "inference_peak_gib": inference, "zo_step_peak_gib": step,
            "peak_vs_inference": (step / inference) if inference else None,
            "perturb_gb_s": perturb_bw / 1e9, "copy_gb_s": copy_bw / 1e9, "perturb_vs_copy": perturb_bw / copy_bw}


def z_agreement() -> dict[str, Any]:
    """z drawn on the GPU equals z drawn on the CPU, bit for bit (seeds, offsets, dtypes, both distributions)."""
    from fedllm.methods import counter_rng as rng

    if not torch.cuda.is_available():
        return {"checked": False}
    cases = [(s, o, n, d, t) for s in (1, 2**31 - 2) for o, n in ((0, 1 << 20), (13, 4099))
             for d in ("gaussian", "rademacher") for t in (torch.float32, torch.bfloat16)]
    equal = all(torch.equal(rng.draw(s, o, n, d, t, "cuda").cpu(), rng.draw(s, o, n, d, t, "cpu"))
                for s, o, n, d, t in cases)
    return {"checked": True, "cases": len(cases), "equal": equal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="", help="comma separated: tiny, 1.7b, 8b (default: 1.7b,8b on a GPU, tiny here)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--clients", default="1,4,8", help="clients sharing the device, for the lora rows")
    ap.add_argument("--steps", type=int, default=0, help="local steps a round (default 10 on a GPU, 2 here)")
    ap.add_argument("--seq", type=int, default=0, help="tokens a row (default 512 on a GPU, 64 here)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="", help="model.dtype (default bfloat16 on a GPU, float32 here)")
    ap.add_argument("--work", default="", help="scratch folder for the models (default: a temporary one)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    sizes = [s for s in (args.sizes or ("1.7b,8b" if gpu else "tiny")).split(",") if s]
    args.steps = args.steps or (10 if gpu else 2)
    args.seq = args.seq or (512 if gpu else 64)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    methods = [m for m in args.methods.split(",") if m]
    if "qlora" in methods and importlib.util.find_spec("bitsandbytes") is None:
        methods.remove("qlora")
        print("qlora: bitsandbytes is not installed; row left out")
    clients = [int(c) for c in args.clients.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="fedllm-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    print(f"device: {device}; torch {torch.__version__}; steps {args.steps}, batch {args.batch}, seq {args.seq}, "
          f"{args.dtype}")
    result: dict[str, Any] = {"device": device, "torch": torch.__version__, "steps": args.steps, "batch": args.batch,
                              "seq": args.seq, "dtype": args.dtype, "sizes": {}, "z_agreement": z_agreement()}
    tokens = args.steps * args.batch * args.seq
    for size in sizes:
        model_dir = build_model(size, work, torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
        data = write_data(work / f"rows-{args.seq}.jsonl", args.seq, 64 * max(clients))
        rows: dict[str, Any] = {}
        print(f"\n{size}: {'method':12}{'clients':>8}{'round s':>9}{'plain s':>9}{'ratio':>7}{'tok/s/client':>14}"
              f"{'peak GiB':>10}{'plain GiB':>10}")
        for method in methods:
            flat = flat_config(model_dir, data, work, args, method)
            for n in clients if method == "lora" else [1]:
                fed = federated_round(flat, n, rounds=3)
                row = {**fed, "clients": n, "tokens_per_s_per_client": tokens / fed["client_seconds"],
                       "total_tokens_per_s": n * tokens / fed["round_seconds"]}
                if method in ("lora", "qlora") and n == 1:
                    row["plain"] = plain_loop(flat, args.steps)
                    row["round_vs_plain"] = fed["round_seconds"] / row["plain"]["seconds"]
                rows[f"{method}x{n}"] = row
                plain = row.get("plain", {})
                fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
                print(f"{'':6}{method:12}{n:>8}{fed['round_seconds']:>9.2f}{fmt(plain.get('seconds'), '.2f'):>9}"
                      f"{fmt(row.get('round_vs_plain'), '.3f'):>7}{row['tokens_per_s_per_client']:>14.0f}"
                      f"{fmt(fed['peak_gib'], '.2f'):>10}{fmt(plain.get('peak_gib'), '.2f'):>10}")
        if "lora" in methods and len(clients) > 1:
            one = rows[f"lorax{clients[0]}"]["total_tokens_per_s"]
            for n in clients[1:]:
                rows[f"lorax{n}"]["total_vs_one"] = rows[f"lorax{n}"]["total_tokens_per_s"] / one
                print(f"{'':6}{n} clients on one device: total tokens/s {rows[f'lorax{n}']['total_vs_one']:.3f}x one's")
        if "zo" in methods:
            z = zo_memory(flat_config(model_dir, data, work, args, "zo"))
            rows["zo-memory"] = z
            vs = z["peak_vs_inference"]
            print(f"{'':6}zo: peak {'-' if vs is None else round(vs, 3)}x inference; perturbation "
                  f"{z['perturb_gb_s']:.1f} GB/s = {z['perturb_vs_copy']:.2f}x a copy ({z['copy_gb_s']:.1f} GB/s)")
        result["sizes"][size] = rows
    agree = result["z_agreement"]
    print("\nz on the GPU equals z on the CPU: " + (f"{agree['equal']} ({agree['cases']} cases)" if agree["checked"]
                                                     else "not checked (no GPU)"))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
