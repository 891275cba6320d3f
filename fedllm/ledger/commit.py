"""ledger.commit-reveal: what a client commits on chain before its upload leaves (the reveal),
and the commit itself, which `fedllm.client.round.signed` makes; the server reads the
commitments back (`LedgerSession.commitments`) to tell an original from its copies.

    value = commitment(contract, server_round, account.address, update_hash(content))
    order = commit_upload(cfg.ledger, account, contract, server_round, digest, pid)  # 1: first
"""

from __future__ import annotations

from typing import Any

from fedllm.ledger.chain import Ledger, check_commit_reveal, connect, dev_account, simulated_identity, to_wei


def commitment(contract: str, server_round: int, account: str, digest: bytes) -> bytes:
    """What a client commits on chain before it reveals its upload (ledger.commit-reveal):
    keccak256(abi.encode(contract, round, account, update hash)). Bound to the committer, so a
    commitment copied from the mempool is worth nothing to the copier (it does not know the
    update hash behind it)."""
    from eth_abi import encode
    from eth_utils import keccak, to_checksum_address

    return keccak(encode(["address", "uint256", "address", "bytes32"],
                         [to_checksum_address(contract), server_round, to_checksum_address(account), digest]))


def commit_upload(lc: Any, account: Any, contract: str, server_round: int, digest: bytes, pid: int) -> int:
    """ledger.commit-reveal, on the client: commit to the upload on chain (and wait for the
    receipt) before the reply leaves; a simulated client not yet registered registers itself
    first, funded by the dev chain's unlocked account. Returns the commitment's order index.

    Raises:
        LedgerError: when the chain or the contract refuses (e.g. NotRegistered, RoundClosed).
    """
    check_commit_reveal(lc.chain)
    w3 = connect(lc.chain)
    fed = Ledger(w3, contract)
    if lc.client_keys == "simulated" and fed.view("clients", account.address)[0] == bytes(32):
        dev_account(w3, lc.seed, f"client-{pid}", ether=lc.stake + 1.0)  # the same derived key, now funded
        fed.register(account, simulated_identity(contract, pid), to_wei(lc.stake))
    fed.commit(account, server_round, commitment(contract, server_round, account.address, digest))
    return fed.view("commitOrder", account.address, server_round)
