// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

interface ILedger {
    function register(bytes32 identity) external payable;
    function claim(uint256 round, uint256 score, uint256 cumulative, bytes32 updateHash, bytes32[] calldata proof)
        external;
}

/// @notice Test-only attacker: a registered client whose receive() claims again, to show that
/// FedLedger.claim cannot be re-entered (the whole claim reverts).
contract ReentrantClaimer {
    ILedger public immutable ledger;
    uint256 private round;
    uint256 private score;
    uint256 private cumulative;
    bytes32 private updateHash;
    bytes32[] private proof;
    uint256 public reentries;

    constructor(ILedger ledger_) {
        ledger = ledger_;
    }

    function join(bytes32 identity) external payable {
        ledger.register{value: msg.value}(identity);
    }

    function attack(uint256 round_, uint256 score_, uint256 cumulative_, bytes32 updateHash_, bytes32[] calldata proof_)
        external
    {
        (round, score, cumulative, updateHash, proof) = (round_, score_, cumulative_, updateHash_, proof_);
        ledger.claim(round, score, cumulative, updateHash, proof);
    }

    receive() external payable {
        reentries += 1;
        ledger.claim(round, score, cumulative, updateHash, proof);
    }
}
