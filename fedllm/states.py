"""States as data only: tensors, arrays and byte strings as safetensors entries, everything
else as JSON with each tensor, byte string, tuple and dict written as a small tagged object.
Nothing is unpickled, so a file someone sends you cannot run code when read. The server's
checkpoints (fedllm.server.checkpoint) and the ledger's artifacts (fedllm.ledger.artifacts) use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_data(obj: Any, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """`obj` as JSON-able data, its tensors, arrays and byte strings moved into `tensors`.

    Raises:
        TypeError: naming where in the state an object of another type sits.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"$t": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "iu" else
                                                                          np.float64))
        return {"$np": key, "dtype": obj.dtype.str}
    if isinstance(obj, (bytes, bytearray)):
        key = f"t{len(tensors)}"
        tensors[key] = torch.frombuffer(bytearray(obj), dtype=torch.uint8).clone() if obj else \
            torch.zeros(0, dtype=torch.uint8)
        return {"$b": key}
    if isinstance(obj, tuple):
        return {"$tuple": [to_data(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_data(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"$d": {k: to_data(v, tensors, f"{where}.{k}") for k, v in obj.items()}}
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {where or 'the top'} (state_dicts hold "
                    "tensors, numbers, strings, bytes, lists, tuples and dicts with string keys)")


def from_data(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `to_data`.

    Raises:
        ValueError: for a tag or tensor reference that is not there.
    """
    if isinstance(data, list):
        return [from_data(x, tensors) for x in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1 and "$t" in data:
        return tensors[data["$t"]]
    if "$np" in data:
        return tensors[data["$np"]].numpy().astype(np.dtype(data["dtype"]))
    if len(data) == 1 and "$b" in data:
        return tensors[data["$b"]].numpy().tobytes()
    if len(data) == 1 and "$tuple" in data:
        return tuple(from_data(x, tensors) for x in data["$tuple"])
    if len(data) == 1 and "$d" in data and isinstance(data["$d"], dict):
        return {k: from_data(v, tensors) for k, v in data["$d"].items()}
    raise ValueError(f"unknown entry {sorted(data)[:3]}")
