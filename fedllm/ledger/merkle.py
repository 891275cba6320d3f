"""Merkle tree of a round's ledger leaves, as contracts/FedLedger.sol verifies it.

A leaf is keccak256(keccak256(abi.encode(round, client, score, cumulative, update_hash)))
(hashed twice, so a 64-byte inner node can never pass for a leaf); an inner node is the
keccak256 of its two children in sorted order, so a proof is a plain list of siblings
(OpenZeppelin's StandardMerkleTree convention). A lone node at the end of a level moves up
unchanged.

    tree = MerkleTree([leaf(1, addr, 700_000, 10**17, h) for ...])
    tree.root, tree.proof(0)
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_abi import encode
from eth_utils import keccak, to_checksum_address


@dataclass(frozen=True)
class Leaf:
    """One client's record of one round; `cumulative` is its reward over all rounds so far."""

    round: int
    client: str
    score: int
    cumulative: int
    update_hash: bytes

    def hash(self) -> bytes:
        body = encode(["uint256", "address", "uint256", "uint256", "bytes32"],
                      [self.round, to_checksum_address(self.client), self.score, self.cumulative,
                       self.update_hash])
        return keccak(keccak(body))


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


class MerkleTree:
    """Levels of hashes from the leaves up; the root and each leaf's proof."""

    def __init__(self, leaves: list[Leaf]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        self.leaves = list(leaves)
        self.levels = [[leaf.hash() for leaf in leaves]]
        while len(self.levels[-1]) > 1:
            level = self.levels[-1]
            up = [hash_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                up.append(level[-1])
            self.levels.append(up)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from leaf `index` to the root."""
        out = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                out.append(level[sibling])
            index //= 2
        return out


def verify(proof: list[bytes], root: bytes, leaf_hash: bytes) -> bool:
    """What FedLedger.verify computes, for tests and for a client checking before it claims."""
    node = leaf_hash
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node == root
