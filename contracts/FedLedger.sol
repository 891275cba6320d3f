// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title FedLedger: stakes, per-round contribution records, pulled rewards, capped slashing.
/// @notice The owner funds the reward pool and appoints the aggregator (the federated server's
/// account). Clients register with a stake and may commit to an update before the server
/// aggregates it: keccak256(abi.encode(this contract, round, client, update hash)), bound to the
/// committer so that a commitment copied from the mempool is worth nothing to the copier. Each
/// commitment gets the round's next order index (1, 2, ...); a round's commitments close when the
/// aggregator records it. Of identical uploads, the first committed is the original. Per round the aggregator records one Merkle root over the leaves
/// (round, client, score, cumulative reward, update hash) and the global model hash, and
/// allocates the round's rewards from the pool: the cost of a round does not grow with the
/// number of clients. A client pulls its cumulative reward with a Merkle proof of its leaf.
/// The aggregator slashes stake with an evidence hash, never more than the stake. Stake leaves
/// after an unbonding period, during which penalties still apply.
///
/// A stake is never zero: the constructor refuses `minStake` 0 and `register` refuses a payment
/// of 0. A zero-stake account would pass `register` and then fail every call that requires a
/// stake (commit, requestUnbond, withdraw) while its identity bars a second registration: it
/// would be locked for good. An account whose stake reaches zero later (withdrawn, or slashed in
/// full) is done: a new account registers with a new identity.
///
/// Leaves are keccak256(bytes.concat(keccak256(abi.encode(round, client, score, cumulative,
/// updateHash)))) and inner nodes hash their children in sorted order (OpenZeppelin's
/// StandardMerkleTree convention), so a leaf can never pass for an inner node.
contract FedLedger {
    struct Client {
        bytes32 identity; // what the server maps to a Flower node (e.g. hash of its public key)
        uint256 stake;
        uint256 claimed; // cumulative reward paid so far
        uint64 unbondingEnds; // 0 while bonded
    }

    /// What else a round's record holds: the sha256 of the server's manifest of the round (the
    /// content-addressed artifacts `fedllm verify` recomputes it from), who posted it and when.
    struct RoundInfo {
        bytes32 manifest;
        address aggregator;
        uint64 postedAt; // 0: not recorded
    }

    address public immutable owner;
    uint256 public immutable minStake;
    uint256 public immutable unbondingPeriod; // seconds
    bool public immutable burnSlashed; // true: slashed funds are locked forever; false: to the pool

    address public aggregator;
    uint256 public pool; // funded and not allocated to a round
    uint256 public allocated; // allocated to rounds and not claimed yet
    uint256 public burned;
    uint256 public totalStaked;
    uint256 public lastRound;

    mapping(address => Client) public clients;
    mapping(bytes32 => address) public accountOf;
    mapping(uint256 => bytes32) public roundRoot;
    mapping(uint256 => bytes32) public modelHash;
    mapping(address => mapping(uint256 => bytes32)) public commitments;
    mapping(address => mapping(uint256 => uint256)) public commitOrder; // 1-based, in the round
    mapping(uint256 => uint256) public commitCount;
    mapping(uint256 => RoundInfo) public rounds;

    bool private entered;

    event AggregatorSet(address indexed aggregator);
    event Funded(uint256 amount, uint256 pool);
    event Registered(address indexed client, bytes32 indexed identity, uint256 stake);
    event Committed(address indexed client, uint256 indexed round, bytes32 commitment, uint256 order);
    event RoundRecorded(uint256 indexed round, bytes32 root, bytes32 modelHash, uint256 reward, uint256 clients,
        bytes32 manifest);
    event Claimed(address indexed client, uint256 amount, uint256 cumulative);
    event Slashed(address indexed client, uint256 indexed round, uint256 amount, bytes32 evidence, bool burned);
    event UnbondingStarted(address indexed client, uint256 until);
    event Withdrawn(address indexed client, uint256 amount);

    error NotOwner();
    error NotAggregator();
    error NotRegistered();
    error AlreadyRegistered();
    error IdentityTaken();
    error StakeTooLow(uint256 minStake);
    error ZeroMinStake();
    error RoundNotAfter(uint256 lastRound);
    error PoolTooSmall(uint256 pool);
    error BadProof();
    error NothingToClaim();
    error OverAllocated();
    error AlreadyCommitted();
    error RoundClosed(uint256 lastRound);
    error EmptyCommitment();
    error Unbonding();
    error StillBonded(uint256 until);
    error TransferFailed();
    error Reentrant();
    error DirectPayment();

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner();
        _;
    }

    modifier onlyAggregator() {
        if (msg.sender != aggregator) revert NotAggregator();
        _;
    }

    modifier nonReentrant() {
        if (entered) revert Reentrant();
        entered = true;
        _;
        entered = false;
    }

    constructor(address aggregator_, uint256 minStake_, uint256 unbondingPeriod_, bool burnSlashed_) payable {
        if (minStake_ == 0) revert ZeroMinStake();
        owner = msg.sender;
        aggregator = aggregator_;
        minStake = minStake_;
        unbondingPeriod = unbondingPeriod_;
        burnSlashed = burnSlashed_;
        pool = msg.value;
        emit AggregatorSet(aggregator_);
        if (msg.value > 0) emit Funded(msg.value, pool);
    }

    receive() external payable {
        revert DirectPayment(); // untracked funds would be lost: use fund() or register()
    }

    // --- owner --------------------------------------------------------------------------

    function setAggregator(address aggregator_) external onlyOwner {
        aggregator = aggregator_;
        emit AggregatorSet(aggregator_);
    }

    function fund() external payable onlyOwner {
        pool += msg.value;
        emit Funded(msg.value, pool);
    }

    // --- clients ------------------------------------------------------------------------

    function register(bytes32 identity) external payable {
        if (clients[msg.sender].stake != 0 || clients[msg.sender].identity != bytes32(0)) revert AlreadyRegistered();
        if (identity == bytes32(0) || accountOf[identity] != address(0)) revert IdentityTaken();
        if (msg.value == 0 || msg.value < minStake) revert StakeTooLow(minStake); // a zero stake would lock the account
        clients[msg.sender] = Client(identity, msg.value, 0, 0);
        accountOf[identity] = msg.sender;
        totalStaked += msg.value;
        emit Registered(msg.sender, identity, msg.value);
    }

    /// @notice Commit to an update before revealing it (sending it to the server); once per
    /// round, before the round is recorded. `commitment` is keccak256(abi.encode(address(this),
    /// round, msg.sender, updateHash)); the order index ranks it among the round's commitments.
    function commit(uint256 round, bytes32 commitment) external {
        if (clients[msg.sender].stake == 0) revert NotRegistered();
        if (round <= lastRound) revert RoundClosed(lastRound);
        if (commitment == bytes32(0)) revert EmptyCommitment(); // reads as "none" later
        if (commitments[msg.sender][round] != bytes32(0)) revert AlreadyCommitted();
        uint256 order = ++commitCount[round];
        commitments[msg.sender][round] = commitment;
        commitOrder[msg.sender][round] = order;
        emit Committed(msg.sender, round, commitment, order);
    }

    /// @notice Pull the reward owed by the leaf of `round`: its cumulative reward less what
    /// was paid before. The leaf must name the caller.
    function claim(uint256 round, uint256 score, uint256 cumulative, bytes32 updateHash, bytes32[] calldata proof)
        external
        nonReentrant
    {
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(round, msg.sender, score, cumulative, updateHash))));
        if (!verify(proof, roundRoot[round], leaf)) revert BadProof();
        Client storage c = clients[msg.sender];
        if (cumulative <= c.claimed) revert NothingToClaim();
        uint256 amount = cumulative - c.claimed;
        if (amount > allocated) revert OverAllocated();
        c.claimed = cumulative; // effects before the transfer
        allocated -= amount;
        emit Claimed(msg.sender, amount, cumulative);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    /// @notice Start the unbonding period; penalties still apply until it ends.
    function requestUnbond() external {
        Client storage c = clients[msg.sender];
        if (c.stake == 0) revert NotRegistered();
        if (c.unbondingEnds != 0) revert Unbonding();
        c.unbondingEnds = uint64(block.timestamp + unbondingPeriod);
        emit UnbondingStarted(msg.sender, c.unbondingEnds);
    }

    function withdraw() external nonReentrant {
        Client storage c = clients[msg.sender];
        if (c.stake == 0) revert NotRegistered();
        if (c.unbondingEnds == 0 || block.timestamp < c.unbondingEnds) revert StillBonded(c.unbondingEnds);
        uint256 amount = c.stake;
        c.stake = 0;
        totalStaked -= amount;
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    // --- aggregator -----------------------------------------------------------------------

    /// @notice Record a round: one root over every client's leaf, the global model's hash, the
    /// sha256 of the round's manifest, and `reward` moved from the pool to the claimable
    /// allocation (the sum of the round's leaf rewards).
    function recordRound(
        uint256 round,
        bytes32 root,
        bytes32 modelHash_,
        uint256 reward,
        uint256 numClients,
        bytes32 manifest
    ) external onlyAggregator {
        if (round <= lastRound) revert RoundNotAfter(lastRound);
        if (reward > pool) revert PoolTooSmall(pool);
        lastRound = round;
        roundRoot[round] = root;
        modelHash[round] = modelHash_;
        rounds[round] = RoundInfo(manifest, msg.sender, uint64(block.timestamp));
        pool -= reward;
        allocated += reward;
        emit RoundRecorded(round, root, modelHash_, reward, numClients, manifest);
    }

    /// @notice Take up to `amount` of a client's stake (never more than it holds) with the hash
    /// of the evidence; returns what was taken.
    function slash(address client, uint256 round, uint256 amount, bytes32 evidence)
        external
        onlyAggregator
        returns (uint256 taken)
    {
        Client storage c = clients[client];
        if (c.identity == bytes32(0)) revert NotRegistered();
        taken = amount < c.stake ? amount : c.stake;
        c.stake -= taken;
        totalStaked -= taken;
        if (burnSlashed) burned += taken;
        else pool += taken;
        emit Slashed(client, round, taken, evidence, burnSlashed);
    }

    // --- views ------------------------------------------------------------------------------

    function stakeOf(address client) external view returns (uint256) {
        return clients[client].stake;
    }

    function claimedOf(address client) external view returns (uint256) {
        return clients[client].claimed;
    }

    function verify(bytes32[] calldata proof, bytes32 root, bytes32 leaf) public pure returns (bool) {
        bytes32 node = leaf;
        for (uint256 i = 0; i < proof.length; i++) {
            bytes32 p = proof[i];
            node = node < p ? keccak256(abi.encode(node, p)) : keccak256(abi.encode(p, node));
        }
        return root != bytes32(0) && node == root;
    }
}
