"""The client's half of SecAgg+: a Flower mod for the Message API.

    app = ClientApp(mods=[secagg_mod, dp_clipping])     # fedllm.client.app

A message carrying the `secagg` config record is one stage of the server's protocol
(fedllm.secagg.server); anything else passes through. The stages, for one round:

1. setup: two fresh key pairs (one to encrypt shares, one to agree masks); the public keys go up.
2. share: a random self-mask seed b; Shamir shares of b and of the mask private key, one per
   neighbour (and one kept), each encrypted for its holder; the ciphertexts, a commitment to b and
   a hash of every share go up (the server routes ciphertexts it cannot read, and checks the
   shares holders return against the hashes).
3. train: the shares addressed to this node are decrypted and kept; the train message goes on to
   the app (the method trains as usual); its upload arrays (and example weight) are quantized,
   masked with PRG(b) and the pairwise masks of the live neighbours, and only that goes up.
4. unmask: for each node the server says survived, this node's share of its b; for each node it
   says dropped, this node's share of its mask key; never both for one node, once a round, and
   only with at least threshold live holders; then the round's keys and shares are wiped.

The keys and shares live in context.state between stages; a setup message starts a round over.
The mod imports no torch.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedllm.errors import FedLLMError
from fedllm.protocol import CONFIG, LEDGER, METRICS
from fedllm.secagg import core

STATE = "secagg-state"  # context.state: this node's keys, seed and shares for the round in progress


class SecAggError(FedLLMError):
    """A stage message this node cannot take part in (the reply is an error)."""


def secagg_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Take part in the server's SecAgg+ stages; pass every other message through."""
    record = msg.content.config_records.get(core.SECAGG)
    if record is None:
        return call_next(msg, context)
    stage = record.get("stage")
    if stage == "train":
        return _train(msg, context, call_next, record)
    handlers = {"setup": _setup, "share": _share, "unmask": _unmask}
    if stage not in handlers:
        raise SecAggError(f"secagg: unknown stage {stage!r}")
    return Message(RecordDict({core.SECAGG: handlers[stage](record, context)}), reply_to=msg)


def _held(context: Context, record: ConfigRecord, stage: str) -> ConfigRecord:
    """This round's state, which must have reached `stage`."""
    state = context.state.config_records.get(STATE)
    if state is None or state.get("round") != record.get("round"):
        raise SecAggError(f"secagg: no key setup for round {record.get('round')!r} (a restarted protocol: "
                          "the server starts the round again)")
    if state.get("stage") != stage:
        raise SecAggError(f"secagg: round {record.get('round')}: stage {record.get('stage')!r} after "
                          f"{state.get('stage')!r}")
    return state


def _ints(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise SecAggError(f"secagg: {key!r} is not a list of node ids")
    return list(value)


def _blobs(record: ConfigRecord, key: str, count: int) -> list[bytes]:
    value = record.get(key, [])
    if not isinstance(value, list) or len(value) != count or not all(isinstance(x, bytes) for x in value):
        raise SecAggError(f"secagg: {key!r} is not {count} byte strings")
    return list(value)


def _setup(record: ConfigRecord, context: Context) -> ConfigRecord:
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

    keys = [generate_key_pairs() for _ in range(2)]  # (share encryption, mask agreement)
    params = {k: record[k] for k in ("round", "threshold", "bits", "clip-range", "max-weight", "levels")}
    for k in ("threshold", "bits", "max-weight", "levels"):
        if not isinstance(params[k], int) or isinstance(params[k], bool) or params[k] < 1:
            raise SecAggError(f"secagg: {k} must be a positive integer, got {params[k]!r}")
    if not 20 <= params["bits"] <= 62 or not 0 < float(params["clip-range"]) < float("inf"):
        raise SecAggError("secagg: bits or clip-range out of range")
    neighbours = _ints(record, "neighbours")
    holders = len(set(neighbours)) + 1
    if params["threshold"] < 2 or 2 * params["threshold"] <= holders:
        raise SecAggError(f"secagg: threshold {params['threshold']} is not a majority of {holders} share holders")
    context.state[STATE] = ConfigRecord({
        **params, "stage": "setup", "neighbours": neighbours,
        "sk-enc": private_key_to_bytes(keys[0][0]), "sk-mask": private_key_to_bytes(keys[1][0])})
    return ConfigRecord({"pk-enc": public_key_to_bytes(keys[0][1]), "pk-mask": public_key_to_bytes(keys[1][1])})


def _share(record: ConfigRecord, context: Context) -> ConfigRecord:
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    state = _held(context, record, "setup")
    ids = _ints(record, "ids")
    pk_enc, pk_mask = _blobs(record, "pk-enc", len(ids)), _blobs(record, "pk-mask", len(ids))
    own, t = context.node_id, int(state["threshold"])
    if len(set(ids)) != len(ids) or not set(ids) <= set(state["neighbours"]):
        raise SecAggError("secagg: the share list names nodes that are not this node's neighbours")
    if len(ids) + 1 < t:
        raise SecAggError(f"secagg: {len(ids) + 1} share holders left, fewer than the threshold {t}")
    seed = os.urandom(32)
    b_shares = create_shares(seed, t, len(ids) + 1)
    sk_shares = create_shares(bytes(state["sk-mask"]), t, len(ids) + 1)
    sk_enc = bytes_to_private_key(bytes(state["sk-enc"]))
    cts = []
    for j, pk, b_share, sk_share in zip(ids, pk_enc, b_shares[1:], sk_shares[1:]):
        try:
            key = generate_shared_key(sk_enc, bytes_to_public_key(pk))
        except Exception as err:  # a public key that does not parse, or is not on the curve
            raise SecAggError(f"secagg: node {j}'s public key: {type(err).__name__}") from None
        cts.append(encrypt(key, share_keys_plaintext_concat(own, j, b_share, sk_share)))
    state.update({"stage": "share", "seed": seed, "ids": ids, "pk-enc": pk_enc, "pk-mask": pk_mask,
                  "src": [own], "b-shares": [b_shares[0]], "sk-shares": [sk_shares[0]]})
    # commitments to each holder's shares: the server checks what holders return against them
    return ConfigRecord({"dst": ids, "ct": cts, "commit": core.digest(seed),
                         "b-hashes": [hashlib.sha256(x).digest() for x in b_shares],
                         "sk-hashes": [hashlib.sha256(x).digest() for x in sk_shares]})


def _train(msg: Message, context: Context, call_next: Any, record: ConfigRecord) -> Message:
    started = time.perf_counter()
    state = _held(context, record, "share")
    own, t, ids = context.node_id, int(state["threshold"]), list(state["ids"])
    peers = _ints(record, "peers")
    if not set(peers) <= set(ids):
        raise SecAggError("secagg: the live peers are not nodes this node shared keys with")
    if len(peers) + 1 < t:
        raise SecAggError(f"secagg: {len(peers) + 1} share holders left, fewer than the threshold {t}")
    bad = _receive_shares(record, state, own)

    del msg.content[core.SECAGG]  # the app (and the DP mod) see the plain train message
    app_started = time.perf_counter()
    reply = call_next(msg, context)
    app_seconds = time.perf_counter() - app_started
    if reply.has_error():
        return reply
    content = reply.content
    x, layout = _flatten(content)
    if not np.isfinite(x).all():
        raise SecAggError("secagg: the update has non-finite values")
    metrics = dict(content.metric_records[METRICS])
    n = metrics.pop("num-examples", None)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not n > 0:
        raise SecAggError(f"secagg: the app's reply has no positive num-examples ({n!r})")
    weight = min(float(n), state["max-weight"]) / state["max-weight"]
    run = msg.content.config_records.get(CONFIG, {})
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(
        f"{run.get('train.seed', 0)}:{record['round']}:{context.node_config.get('partition-id', own)}".encode()
    ).digest()[:8], "little"))
    y, metrics["secagg-clipped"] = _masked(x, weight, state, own, peers, rng)
    metrics["secagg-seconds"] = time.perf_counter() - started - app_seconds  # decrypting and masking
    out = RecordDict({
        METRICS: MetricRecord(metrics),
        core.SECAGG: ConfigRecord({"layout": core.layout_bytes(layout), "bad": bad}),
        core.MASKED: ArrayRecord({"y": Array(y.astype(core.wire_dtype(int(state["bits"]))))}),
    })
    if LEDGER in content.config_records:  # the app signed its plain upload: sign what goes up instead
        from fedllm.client.round import config_from_request, node_partition, signed

        out = signed(out, msg.content, context, config_from_request(msg.content), node_partition(context)[0])
    return Message(out, reply_to=msg)


def _receive_shares(record: ConfigRecord, state: Any, own: int) -> list[int]:
    """Decrypt the key shares routed to this node into its state; returns the senders whose
    packets did not decrypt (the server drops them and this node both)."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    srcs = _ints(record, "src")
    cts = _blobs(record, "ct", len(srcs))
    sk_enc = bytes_to_private_key(bytes(state["sk-enc"]))
    pk_enc = dict(zip(list(state["ids"]), state["pk-enc"]))
    got_src, got_b, got_sk, bad = list(state["src"]), list(state["b-shares"]), list(state["sk-shares"]), []
    for src, ct in zip(srcs, cts):
        try:
            if src not in pk_enc or src in got_src:
                raise ValueError("not a neighbour, or a second packet")
            plain = decrypt(generate_shared_key(sk_enc, bytes_to_public_key(pk_enc[src])), ct)
            a, b, b_share, sk_share = share_keys_plaintext_separate(plain)
            if (a, b) != (src, own):
                raise ValueError("addressed to another pair")
        except Exception:  # Fernet's InvalidToken, a bad key, a short packet: that sender's shares are unusable
            bad.append(src)
            continue
        got_src.append(src)
        got_b.append(b_share)
        got_sk.append(sk_share)
    state.update({"stage": "train", "src": got_src, "b-shares": got_b, "sk-shares": got_sk})
    return bad


def _masked(x: np.ndarray, weight: float, state: Any, own: int, peers: list[int],
            rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The weighted update in fixed point plus this node's self mask and its pairwise masks with
    the live peers, mod 2^bits; and how many values were clipped."""
    bits = int(state["bits"])
    q, clipped = core.quantize(x, weight, float(state["clip-range"]), int(state["levels"]), rng)
    y = q + core.stream(bytes(state["seed"]), q.size, bits)
    sk_mask, pk_mask = bytes(state["sk-mask"]), dict(zip(list(state["ids"]), state["pk-mask"]))
    for j in peers:
        y += core.pair_mask(own, j, sk_mask, bytes(pk_mask[j]), q.size, bits)
    return y & core.modulus_mask(bits), clipped


def _flatten(content: RecordDict) -> tuple[np.ndarray, list[tuple[str, str, str, list[int]]]]:
    """Every float array of the reply's array records (by record, then key), as one float64
    vector, and its layout. The upload must be arrays: a byte payload would go up unmasked."""
    for name in content.config_records:
        if name != LEDGER:
            raise SecAggError(f"secagg: the method's upload {name!r} is not arrays; secure aggregation sums float "
                              "arrays (leave compression.up empty)")
    parts, layout = [], []
    for name in sorted(content.array_records):
        rec = content.array_records[name]
        for key in sorted(rec):
            arr = rec[key].numpy()
            if arr.dtype.name not in core.FLOATS:
                raise SecAggError(f"secagg: upload array {name}/{key} is {arr.dtype}, not floating point")
            parts.append(arr.astype(np.float64).ravel())
            layout.append((name, key, arr.dtype.name, list(arr.shape)))
    if not parts:
        raise SecAggError("secagg: the app's reply has no arrays to aggregate")
    return np.concatenate(parts), layout


def _unmask(record: ConfigRecord, context: Context) -> ConfigRecord:
    state = _held(context, record, "train")
    own = context.node_id
    b_of, sk_of = set(_ints(record, "b-of")), set(_ints(record, "sk-of"))
    if b_of & sk_of or own in sk_of:
        raise SecAggError("secagg: asked for both shares of one node (or for this live node's mask key)")
    if len(b_of) < int(state["threshold"]):
        raise SecAggError(f"secagg: {len(b_of)} live share holders, fewer than the threshold {state['threshold']}")
    state["stage"] = "done"  # one answer a round: a second request could name the other share of a node
    held = dict(zip(state["src"], zip(state["b-shares"], state["sk-shares"])))
    b_ids = sorted(b_of & held.keys())
    sk_ids = sorted(sk_of & held.keys())
    for secret in ("sk-enc", "sk-mask", "seed", "b-shares", "sk-shares"):  # nothing of this round is needed again
        state.pop(secret, None)
    return ConfigRecord({"b-ids": b_ids, "b-shares": [held[i][0] for i in b_ids],
                         "sk-ids": sk_ids, "sk-shares": [held[i][1] for i in sk_ids]})
