"""web3 bridge to contracts/FedLedger.sol: connect, deploy or attach, and send signed calls.

    w3 = connect("tester")                                   # in-process EVM (py-evm), no set-up
    owner = dev_account(w3, seed=0)                          # a funded key on a dev chain
    ledger = Ledger.deploy(w3, owner, aggregator=owner.address, min_stake=to_wei(0.5))
    ledger.register(client, identity, stake=to_wei(1.0))
    gas = ledger.record_round(owner, 1, tree.root, model_hash, reward, n, manifest).gas_used

Every transaction is signed here with a local key (eth-account) and sent raw, so the same code
runs on the embedded chain, on anvil, and on any JSON-RPC node. A revert raises LedgerError
with the contract's error name (e.g. "NotAggregator").

Clients sign what they send: `sign_update` binds (contract, round, update hash) to the
client's account, and the server recovers that account from the reply (`reply_account`), so
nobody can earn or lose stake in another's name.
"""

from __future__ import annotations

import ast
import importlib.resources
import contextlib
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any

from fedllm.protocol import CONFIG, LEDGER
from fedllm.errors import FedLLMError
from fedllm.files import FileFormatError, read_json, read_text

ARTIFACTS = Path(str(importlib.resources.files("fedllm.contracts")))  # contracts/artifacts, as package data
LEDGER_RECORD = LEDGER  # the reply's record with the client's account and signature


class LedgerError(FedLLMError):
    """A chain, key or contract error."""


def _web3() -> Any:
    try:
        import web3
    except ImportError as err:
        raise LedgerError("ledger.enabled needs web3: pip install 'fedllm[ledger]'") from err
    return web3


def to_wei(ether: float | str) -> int:
    """Ether (a config float such as 0.1) to wei, exactly as written in decimal."""
    return int(Decimal(str(ether)) * 10**18)


def artifact(name: str) -> dict[str, Any]:
    """The compiled ABI and bytecode of contracts/<name>.sol (contracts/artifacts/<name>.json)."""
    path = ARTIFACTS / f"{name}.json"
    if not path.exists():
        raise LedgerError(f"{path}: contract artifact missing (run `npm install && npm run build` in contracts/)")
    try:
        return read_json(path, {"abi": list, "bytecode": str, "deployedBytecode": str})
    except FileFormatError as err:
        raise LedgerError(f"{err} (rebuild it: `npm install && npm run build` in contracts/)") from None


def connect(chain: str) -> Any:
    """A Web3 for "tester" (an in-process py-evm chain) or a JSON-RPC URL (http, https)."""
    web3 = _web3()
    if chain == "tester":
        return web3.Web3(web3.EthereumTesterProvider())
    if chain.startswith(("http://", "https://")):
        w3 = web3.Web3(web3.Web3.HTTPProvider(chain, request_kwargs={"timeout": 30}))
    else:
        raise LedgerError(f"ledger.chain: {chain!r} is neither 'tester' nor an http(s) URL")
    if not w3.is_connected():
        raise LedgerError(f"ledger.chain: no JSON-RPC node answers at {chain}")
    return w3


def same_runtime(code: bytes, expected: bytes) -> bool:
    """Whether deployed `code` is the artifact's runtime code: equal everywhere but in the
    32-byte slots that the compiler leaves zero for immutables (set by the constructor)."""
    if len(code) != len(expected):
        return False
    slots = bytearray(len(expected))  # 1 where an immutable may sit
    start = None
    for i, b in enumerate(expected + b"\x01"):
        if b == 0 and start is None:
            start = i
        elif b != 0 and start is not None:
            if i - start >= 32:
                slots[start:i] = b"\x01" * (i - start)
            start = None
    return all(a == b or m for a, b, m in zip(code, expected, slots))


def check_address(value: str, field: str) -> str:
    """A 0x-prefixed 20-byte address, checksummed if it has mixed case.

    Raises:
        LedgerError: naming `field` for anything else.
    """
    from eth_utils import is_address, is_checksum_address, to_checksum_address

    text = value.strip()
    if not is_address(text):
        raise LedgerError(f"{field}: {value!r} is not an address (0x and 40 hex digits)")
    if text != text.lower() and text[2:] != text[2:].upper() and not is_checksum_address(text):
        raise LedgerError(f"{field}: {value!r} has a wrong checksum (mixed case that does not match the address)")
    return to_checksum_address(text)


def read_key(spec: str, field: str) -> Any:
    """A LocalAccount from "env:NAME" (a hex key in that variable) or "file:PATH" (a hex key on
    its first line).

    Raises:
        LedgerError: naming `field` for a missing variable or file or a malformed key.
    """
    from eth_account import Account

    kind, _, where = spec.partition(":")
    if kind == "env":
        text = os.environ.get(where)
        if text is None:
            raise LedgerError(f"{field}: environment variable {where} is not set")
    elif kind == "file":
        try:
            text = (read_text(Path(where).expanduser(), limit=1 << 16).splitlines() or [""])[0]
        except FileFormatError as err:
            raise LedgerError(f"{field}: cannot read a key: {err}") from None
    else:
        raise LedgerError(f"{field}: expected 'env:NAME' or 'file:PATH', got {spec!r}")
    try:
        return Account.from_key(text.strip())
    except Exception as err:  # eth-keys raises several kinds for a bad key
        raise LedgerError(f"{field}: not a private key ({type(err).__name__})") from err


def derived_account(seed: int, role: str) -> Any:
    """A deterministic account for simulation (its key is public: never use it on a real chain)."""
    from eth_account import Account
    from eth_utils import keccak

    return Account.from_key(keccak(text=f"fedllm-simulation:{seed}:{role}"))


def dev_account(w3: Any, seed: int, role: str = "owner", ether: float = 1000.0) -> Any:
    """A derived account funded from the node's first unlocked account (the embedded chain's and
    anvil's dev accounts); for simulations and tests.

    Raises:
        LedgerError: on a chain with no unlocked account to fund it from.
    """
    account = derived_account(seed, role)
    if w3.eth.get_balance(account.address) < to_wei(ether) // 2:
        if not w3.eth.accounts:
            raise LedgerError("ledger.owner-key: required on a chain without unlocked dev accounts")
        tx = w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": account.address, "value": to_wei(ether)})
        w3.eth.wait_for_transaction_receipt(tx)
    return account


def transfer(w3: Any, sender: Any, to: str, value: int) -> None:
    """Send `value` wei from a local account."""
    tx = {"from": sender.address, "to": to, "value": value, "nonce": w3.eth.get_transaction_count(sender.address),
          "gas": 21_000, "chainId": w3.eth.chain_id, **_fees(w3)}
    _send(w3, sender, tx)


def preflight(cfg: Any) -> None:
    """Check the [ledger] settings before a run starts: web3 importable, artifacts present, the
    chain answers, keys readable, the contract deployed.

    Raises:
        LedgerError: naming the first setting that fails.
    """
    lc = cfg.ledger
    artifact("FedLedger")
    if lc.commit_reveal:
        check_commit_reveal(lc.chain)
        if cfg.server.mode == "async":  # a stale reply answers a round that may be recorded (closed) already
            raise LedgerError("ledger.commit-reveal: not with server.mode=async, whose stale replies answer rounds "
                              "whose commitments may have closed")
    w3 = connect(lc.chain)
    for field, spec in (("ledger.owner-key", lc.owner_key), ("ledger.aggregator-key", lc.aggregator_key)):
        if spec:
            read_key(spec, field)
    if lc.contract:
        Ledger(w3, lc.contract)  # the address's checksum, and FedLedger's runtime code there
    elif not lc.owner_key and not w3.eth.accounts:
        raise LedgerError("ledger.owner-key: required to deploy on a chain without unlocked dev accounts")


@dataclass
class Receipt:
    gas_used: int
    tx_hash: str


class Ledger:
    """One deployed FedLedger contract."""

    def __init__(self, w3: Any, address: str) -> None:
        self.w3 = w3
        art = artifact("FedLedger")
        self.address = check_address(address, "ledger.contract")
        code = bytes(w3.eth.get_code(self.address) or b"")
        if not code:
            raise LedgerError(f"ledger.contract: no contract at {address}")
        if not same_runtime(code, bytes.fromhex(art["deployedBytecode"][2:])):
            raise LedgerError(f"ledger.contract: the contract at {address} is not this fedllm's FedLedger "
                              "(its runtime code differs from contracts/artifacts/FedLedger.json)")
        self.contract = w3.eth.contract(address=self.address, abi=art["abi"])
        self.errors = _error_selectors(art["abi"])

    @classmethod
    def deploy(cls, w3: Any, owner: Any, aggregator: str, min_stake: int, unbonding_seconds: int = 86_400,
               burn_slashed: bool = False, pool: int = 0, disputes: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)) -> "Ledger":
        """`disputes`: fedllm.ledger.dispute.DisputeRules (window, voting, bonds, quorum); window 0: off."""
        art = artifact("FedLedger")
        factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        try:
            tx = factory.constructor(aggregator, min_stake, unbonding_seconds, burn_slashed, *disputes).build_transaction(
                {"from": owner.address, "value": pool, "nonce": w3.eth.get_transaction_count(owner.address)})
            receipt = _send(w3, owner, tx)
        except LedgerError:
            raise
        except Exception as err:  # a revert in the constructor (e.g. ZeroMinStake, BadDisputeRules)
            raise LedgerError(f"FedLedger constructor: {_reason(_error_selectors(art['abi']), err)}") from err
        ledger = cls(w3, receipt.contractAddress)
        ledger.deploy_gas = receipt.gasUsed
        return ledger

    # --- calls ------------------------------------------------------------------------------
    def send(self, sender: Any, fn: str, *args: Any, value: int = 0) -> Receipt:
        """Sign and send `fn(*args)` from `sender`; raises LedgerError with the revert's name."""
        call = getattr(self.contract.functions, fn)(*args)
        try:
            tx = call.build_transaction({"from": sender.address, "value": value,
                                         "nonce": self.w3.eth.get_transaction_count(sender.address)})
            receipt = _send(self.w3, sender, tx)
        except LedgerError:
            raise
        except Exception as err:
            raise LedgerError(f"FedLedger.{fn}: {self.reason(err)}") from err
        return Receipt(receipt.gasUsed, receipt.transactionHash.to_0x_hex())

    def reason(self, err: Exception) -> str:
        """The contract error's name for a revert (custom errors come back as a selector)."""
        return _reason(self.errors, err)

    def view(self, fn: str, *args: Any) -> Any:
        return getattr(self.contract.functions, fn)(*args).call()

    def register(self, client: Any, identity: bytes, stake: int) -> Receipt:
        return self.send(client, "register", identity, value=stake)

    def commit(self, client: Any, server_round: int, update_hash: bytes) -> Receipt:
        return self.send(client, "commit", server_round, update_hash)

    def fund(self, owner: Any, value: int) -> Receipt:
        return self.send(owner, "fund", value=value)

    def record_round(self, aggregator: Any, server_round: int, root: bytes, model_hash: bytes, reward: int,
                     num_clients: int, manifest: bytes = bytes(32)) -> Receipt:
        """Post a round: root, model hash, the reward it allocates, its manifest's sha256."""
        return self.send(aggregator, "recordRound", server_round, root, model_hash, reward, num_clients, manifest)

    def slash(self, aggregator: Any, client: str, server_round: int, amount: int, evidence: bytes) -> Receipt:
        return self.send(aggregator, "slash", self.w3.to_checksum_address(client), server_round, amount, evidence)

    def claim(self, client: Any, leaf: Any, proof: list[bytes]) -> Receipt:
        return self.send(client, "claim", leaf.round, leaf.score, leaf.cumulative, leaf.update_hash, proof)

    def stake_of(self, address: str) -> int:
        return self.view("stakeOf", self.w3.to_checksum_address(address))

    def claimed_of(self, address: str) -> int:
        return self.view("claimedOf", self.w3.to_checksum_address(address))

    @cached_property
    def min_stake(self) -> int:
        return self.view("minStake")


def _send(w3: Any, sender: Any, tx: dict[str, Any]) -> Any:
    signed = sender.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
    if receipt.status != 1:
        raise LedgerError(f"transaction {tx_hash.to_0x_hex()} reverted")
    return receipt


def _reason(errors: dict[str, str], err: Exception) -> str:
    """The contract error's name for a revert (custom errors come back as a selector)."""
    data = getattr(err, "data", None)
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        return errors.get(data[:10], data)
    text = str(err)
    raw = re.search(r"b(['\"]).*\1", text)  # py-evm puts the raw revert bytes in the message
    if raw:
        with contextlib.suppress(ValueError, SyntaxError):
            selector = "0x" + ast.literal_eval(raw.group(0))[:4].hex()
            return errors.get(selector, text)
    return text


def _fees(w3: Any) -> dict[str, int]:
    base = w3.eth.get_block("latest").get("baseFeePerGas", 0)
    tip = 10**9
    return {"maxFeePerGas": 2 * base + tip, "maxPriorityFeePerGas": tip}


def _error_selectors(abi: list[dict[str, Any]]) -> dict[str, str]:
    from eth_utils import function_signature_to_4byte_selector

    out = {}
    for item in abi:
        if item["type"] == "error":
            sig = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
            out["0x" + function_signature_to_4byte_selector(sig).hex()] = item["name"]
    return out


# --- what clients sign --------------------------------------------------------------------------
def update_hash(content: Any) -> bytes:
    """keccak256 over a reply's update: every array and byte value outside the metrics and
    ledger records, with their names, in sorted order. Client and server compute it alike."""
    from eth_utils import keccak

    parts = []
    for name in sorted(content.array_records):
        record = content.array_records[name]
        for key in sorted(record):
            parts += [f"{name}/{key}".encode(), bytes(record[key].data)]
    for name in sorted(content.config_records):
        if name in (LEDGER_RECORD, CONFIG):
            continue
        record = content.config_records[name]
        for key in sorted(record):
            values = record[key] if isinstance(record[key], list) else [record[key]]
            parts += [f"{name}/{key}".encode()] + [v for v in values if isinstance(v, bytes)]
    return keccak(b"".join(len(p).to_bytes(8, "big") + p for p in parts))


def update_digest(contract: str, server_round: int, digest: bytes) -> bytes:
    from eth_abi import encode
    from eth_utils import keccak, to_checksum_address

    return keccak(encode(["address", "uint256", "bytes32"], [to_checksum_address(contract), server_round, digest]))


def check_commit_reveal(chain: str) -> None:
    if chain == "tester":
        raise LedgerError("ledger.commit-reveal: clients send their own commit transactions, so ledger.chain must be "
                          "a node's URL they reach (e.g. anvil's), not the server's in-process 'tester' chain")


def simulated_identity(contract: str, pid: int) -> bytes:
    """The identity a simulated client (ledger.client-keys=simulated) registers under: unique
    per partition and contract."""
    return update_digest(contract, pid, bytes(32))


def sign_update(account: Any, contract: str, server_round: int, digest: bytes) -> bytes:
    """The client's EIP-191 signature over (contract, round, update hash)."""
    from eth_account.messages import encode_defunct

    message = encode_defunct(primitive=update_digest(contract, server_round, digest))
    return bytes(account.sign_message(message).signature)


def reply_account(content: Any, contract: str, server_round: int) -> tuple[str, bytes]:
    """(the account that signed the reply's update, the update hash).

    Raises:
        LedgerError: when the reply lacks the ledger record or its signature does not match.
    """
    from eth_account import Account
    from eth_account.messages import encode_defunct

    record = content.config_records.get(LEDGER_RECORD)
    if record is None or not isinstance(record.get("signature"), bytes):
        raise LedgerError("reply lacks the ledger signature")
    digest = update_hash(content)
    try:
        signer = Account.recover_message(encode_defunct(primitive=update_digest(contract, server_round, digest)),
                                         signature=record["signature"])
    except Exception as err:  # malformed signature bytes
        raise LedgerError(f"bad ledger signature: {err}") from err
    if signer.lower() != str(record.get("account", "")).lower():
        raise LedgerError("ledger signature is not the named account's")
    return signer, digest
