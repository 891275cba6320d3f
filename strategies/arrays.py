"""A method's state in Flower's ArrayRecord form: what `FedLLMStrategy.aggregate_train` returns,
so that Flower's own `Strategy.start` ends with the trained global in `result.arrays`.

    result = strategy.start(grid, ArrayRecord(), num_rounds=3, train_config=ConfigRecord(cfg.to_flat()))
    adapter = {k.removeprefix("global/"): t for k, t in result.arrays.to_torch_state_dict().items()
               if k.startswith("global/")}               # lora, dpo, diloco: the global tensors

The state dict is flattened by path, '/'-joined (`global/<tensor name>`, `downlink/history/0`,
`accumulators`): tensors as they are (bfloat16, which NumPy lacks, as float32: exact), bytes as
uint8 vectors, numbers as 0-d arrays. Strings and None are not arrays and are left out; the
checkpoint (`state_dict()`) keeps them.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY_LACKS = (torch.bfloat16,)  # torch dtypes with no NumPy counterpart: sent as float32


def leaves(state: Any, prefix: str = "") -> Iterator[tuple[str, np.ndarray | torch.Tensor]]:
    """(path, array) for every array-like leaf of a nested state dict, in its order."""
    if isinstance(state, Mapping):
        for key, value in state.items():
            yield from leaves(value, f"{prefix}{key}/")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from leaves(value, f"{prefix}{i}/")
    elif isinstance(state, torch.Tensor):
        yield prefix[:-1], state.float() if state.dtype in NUMPY_LACKS else state
    elif isinstance(state, (bytes, bytearray, memoryview)):
        yield prefix[:-1], np.frombuffer(bytes(state), dtype=np.uint8)
    elif isinstance(state, (bool, int, float, np.ndarray, np.generic)):
        yield prefix[:-1], np.asarray(state)
    # str and None: not arrays


def state_arrays(state: Mapping[str, Any]) -> ArrayRecord:
    """The array leaves of `state` (a method's `state_dict()`) as one ArrayRecord, by path.

    Raises:
        ValueError: two leaves flatten to the same path (a key with '/' in it).
    """
    record = ArrayRecord()
    for path, value in leaves(state):
        if path in record:
            raise ValueError(f"state path {path!r} appears twice when flattened")
        record[path] = Array(value)
    return record
