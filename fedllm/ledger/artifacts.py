"""Content-addressed artifacts: what a round's scores, flags, aggregate and rewards depend on,
written so that anyone holding the run directory can recompute the round (`fedllm verify`).

RUN_DIR/ledger/artifacts/<sha256>.<ext> holds each blob under the sha256 of its bytes:
- `.safetensors`: a state (the strategy's before the round, an update's delta, the flags'
  history), as data only: tensors in safetensors, the rest in its header's JSON
  (fedllm.states: nothing is unpickled);
- `.json`: the run config, the validation examples, and each round's manifest.

A round's manifest names every input by its sha256 (the state before the round, each accepted
update, the config, the validation examples, the flags' history) with the values the chain or
the server supplied (who signed what, the commitments' order, the reward budget, each account's
cumulative reward before the round, the thread count), and the round's outputs (flags, scores,
rewards, the Merkle root, the model hash). The sha256 of the manifest's bytes is posted on
chain with the round's root (FedLedger.recordRound's `manifest`), so no artifact can change
after the round without `fedllm verify` noticing: a blob's name is its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fedllm.errors import FedLLMError
from fedllm.states import from_data, to_data

MANIFEST_FORMAT = 1
META_KEY = "fedllm-artifact"


class ArtifactError(FedLLMError):
    """An artifact is missing, altered or unreadable."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value (sorted keys, no spaces, a final newline)."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


class Store:
    """A folder of blobs named by the sha256 of their bytes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, digest: str, ext: str) -> Path:
        return self.root / f"{digest}.{ext}"

    def put(self, data: bytes, ext: str) -> str:
        """Write `data` (once: a blob already there is kept) and return its sha256 in hex."""
        digest = sha256(data)
        path = self.path(digest, ext)
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def get(self, digest: str, ext: str) -> bytes:
        """The blob named `digest`, checked against its name.

        Raises:
            ArtifactError: naming the file when it is missing or its bytes do not hash to its name.
        """
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ArtifactError(f"{self.root}: {digest!r} is not a sha256 artifact name")
        path = self.path(digest, ext)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: artifact missing (deleted after the round was posted?)") from None
        if sha256(data) != digest:
            raise ArtifactError(f"{path}: artifact altered (its sha256 is {sha256(data)}, not its name)")
        return data

    # --- typed blobs ------------------------------------------------------------------------------
    def put_json(self, obj: Any) -> str:
        return self.put(canonical_json(obj), "json")

    def get_json(self, digest: str) -> Any:
        data = self.get(digest, "json")
        try:
            return json.loads(data)
        except ValueError as err:
            raise ArtifactError(f"{self.path(digest, 'json')}: not JSON ({err})") from None

    def put_state(self, obj: Any) -> str:
        """A state (tensors, numbers, strings, bytes, lists, tuples, dicts with string keys)."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        meta = json.dumps(to_data(obj, tensors), sort_keys=True)
        return self.put(save(tensors, metadata={META_KEY: meta}), "safetensors")

    def get_state(self, digest: str) -> Any:
        from safetensors.torch import load

        data = self.get(digest, "safetensors")
        path = self.path(digest, "safetensors")
        try:
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {}).get(META_KEY)
            return from_data(json.loads(meta), load(data))
        except Exception as err:  # a foreign file under a valid name: data only, nothing ran
            raise ArtifactError(f"{path}: not a fedllm state ({type(err).__name__}: {err})") from None


class Trail:
    """One run's artifacts: the config and the validation examples once, then each round the
    strategy's state before it, its accepted updates and the flags' history, and its manifest."""

    def __init__(self, root: Path, strategy: Any, flat_config: dict[str, Any], validation: list[Any]) -> None:
        self.store = Store(root)
        self.strategy = strategy
        self.config = self.store.put_json(flat_config)
        self.validation = self.store.put_json(validation)
        self.state = self.store.put_state(strategy.state_dict())

    def inputs(self, server_round: int, contract: str, signers: dict[int, tuple[str, bytes]], result: Any,
               history: dict[str, Any], commitments: tuple[set[int], dict[int, int]]) -> dict[str, Any]:
        """The round's inputs (`result`: its RoundResult; `history`: the flags' history before it;
        `commitments`: what the chain said of them), every artifact by sha256; the strategy's state
        after the round becomes the next round's state before."""
        broken, order = commitments
        updates = [{"node": str(u.node_id), "num-examples": u.num_examples, "metrics": u.metrics,
                    "bytes-up": u.bytes_up, "delta": self.store.put_state(u.delta)} for u in result.updates]
        out = {"format": MANIFEST_FORMAT, "round": server_round, "contract": contract, "config": self.config,
               "validation": self.validation, "state-before": self.state,
               "history-before": self.store.put_state(history), "updates": updates,
               "dropped": [[str(node), reason] for node, reason in result.dropped],
               "signers": {str(n): [a, d.hex()] for n, (a, d) in sorted(signers.items())},
               "commitments": {"broken": sorted(str(n) for n in broken),
                               "order": {str(n): i for n, i in sorted(order.items())}},
               "threads": torch.get_num_threads(), "torch": torch.__version__}
        self.state = self.store.put_state(self.strategy.state_dict())
        return out

    def manifest(self, inputs: dict[str, Any], budget: int, before: dict[str, int], rows: list[Any],
                 leaves: list[Any], root: bytes, model_hash: bytes) -> str:
        """Write the round's manifest (its inputs and outputs: the reward budget, each account's
        cumulative reward before it, each client's leaf, the root and the model hash); its sha256."""
        return self.store.put_json({
            **inputs, "budget": budget, "cumulative-before": before, "root": root.hex(),
            "model-hash": model_hash.hex(), "clients": [
                {"node": str(node), "account": account, "score-fixed": leaf.score, "flags": fl,
                 "cumulative": leaf.cumulative} for (node, account, _, _, fl), leaf in zip(rows, leaves)]})
