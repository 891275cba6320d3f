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
/// Disputes (on when `challengeWindow` > 0). The aggregator keeps a bond of at least
/// `aggregatorBond` on the contract (bondAggregator) to record rounds. For `challengeWindow`
/// seconds after a round is recorded, a registered client other than the round's aggregator may
/// dispute it with a bond of at least `disputeBond`. For `votingPeriod` seconds after that, every
/// registered client but the aggregator (the challenger included) may post the root and model
/// hash it recomputed from the round's manifest (`fedllm verify`), once, weighted by its stake
/// (not while unbonding; and `unbondingPeriod` >= `votingPeriod`, so no stake votes twice).
/// After that anyone resolves it: the answer with the most stake decides, if the votes carry at
/// least `quorumBps` of the stake staked when the dispute opened and no two answers tie.
///  - Upheld (the posted root and model hash win): the challenger's bond is forfeited (to the
///    pool, or burned).
///  - Overturned (another answer wins): the committee's root and model hash replace the posted
///    ones; the aggregator loses up to `aggregatorBond` of its bond; the challenger is owed its
///    bond back and half of that (the rest to the pool, or burned).
///  - Undecided (no quorum, or a tie): the posted round stands, nobody is slashed, the
///    challenger is owed its bond back.
/// A round's leaves are claimable once its window has passed and no dispute is open on any
/// round (a later round's cumulative reward includes the earlier rounds'). Payouts are pulled
/// (collect), so no challenger can block a resolution by refusing a transfer.
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
        Status status;
    }

    enum Status {
        Posted, // not disputed (yet)
        Disputed, // votes open, or closed and not resolved
        Upheld,
        Overturned,
        Undecided
    }

    struct Dispute {
        address challenger;
        uint64 votingEnds;
        bool tied; // two answers share the most stake
        uint128 bond;
        uint128 quorum; // stake the votes must carry for a decision
        uint128 votedWeight;
        uint128 topWeight;
        bytes32 topRoot; // the answer with the most stake so far
        bytes32 topModelHash;
    }

    address public immutable owner;
    uint256 public immutable minStake;
    uint256 public immutable unbondingPeriod; // seconds
    bool public immutable burnSlashed; // true: slashed funds are locked forever; false: to the pool
    uint256 public immutable challengeWindow; // seconds after a round's record; 0: disputes off
    uint256 public immutable votingPeriod; // seconds after a dispute opens
    uint256 public immutable disputeBond; // the least a challenger bonds
    uint256 public immutable aggregatorBond; // the least bond to record rounds; what an overturned round costs
    uint256 public immutable quorumBps; // share of the stake (in 1/10000) the votes must carry

    address public aggregator;
    uint256 public pool; // funded and not allocated to a round
    uint256 public allocated; // allocated to rounds and not claimed yet
    uint256 public burned;
    uint256 public totalStaked;
    uint256 public lastRound;
    uint256 public openDisputes;

    mapping(address => Client) public clients;
    mapping(bytes32 => address) public accountOf;
    mapping(uint256 => bytes32) public roundRoot;
    mapping(uint256 => bytes32) public modelHash;
    mapping(address => mapping(uint256 => bytes32)) public commitments;
    mapping(address => mapping(uint256 => uint256)) public commitOrder; // 1-based, in the round
    mapping(uint256 => uint256) public commitCount;
    mapping(uint256 => RoundInfo) public rounds;
    mapping(uint256 => Dispute) public disputes;
    mapping(uint256 => mapping(bytes32 => uint256)) public weightOf; // round, keccak(root, model hash)
    mapping(uint256 => mapping(address => bool)) public voted;
    mapping(address => uint256) public bondOf; // aggregators' bonds
    mapping(address => uint256) public owed; // what resolved disputes pay out, pulled with collect()

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
    event AggregatorBonded(address indexed aggregator, uint256 amount, uint256 bond);
    event AggregatorUnbonded(address indexed aggregator, uint256 amount);
    event Disputed(uint256 indexed round, address indexed challenger, uint256 bond, uint256 votingEnds);
    event Voted(uint256 indexed round, address indexed verifier, bytes32 root, bytes32 modelHash, uint256 weight);
    event Resolved(uint256 indexed round, Status outcome, bytes32 root, bytes32 modelHash, uint256 slashed);
    event Collected(address indexed account, uint256 amount);

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
    error BadDisputeRules();
    error DisputesOff();
    error ZeroBond();
    error AggregatorBondTooLow(uint256 aggregatorBond);
    error BondLocked(uint256 until);
    error RoundNotRecorded();
    error WindowClosed(uint256 closedAt);
    error AlreadyDisputed();
    error DisputeBondTooLow(uint256 disputeBond);
    error Accused();
    error NotDisputed();
    error VotingClosed(uint256 closedAt);
    error VotingOpen(uint256 until);
    error AlreadyVoted();
    error EmptyRoot();
    error NotFinal(uint256 finalAt);
    error DisputeOpen();

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

    constructor(
        address aggregator_,
        uint256 minStake_,
        uint256 unbondingPeriod_,
        bool burnSlashed_,
        uint256 challengeWindow_,
        uint256 votingPeriod_,
        uint256 disputeBond_,
        uint256 aggregatorBond_,
        uint256 quorumBps_
    ) payable {
        if (minStake_ == 0) revert ZeroMinStake();
        if (
            challengeWindow_ != 0
                && (votingPeriod_ == 0 || disputeBond_ == 0 || aggregatorBond_ == 0 || quorumBps_ == 0
                    || quorumBps_ > 10_000 || unbondingPeriod_ < votingPeriod_)
        ) revert BadDisputeRules(); // a shorter unbonding would let a voter withdraw, re-register and vote again
        challengeWindow = challengeWindow_;
        votingPeriod = votingPeriod_;
        disputeBond = disputeBond_;
        aggregatorBond = aggregatorBond_;
        quorumBps = quorumBps_;
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
    /// was paid before. The leaf must name the caller; with disputes on, the round must be
    /// final (its window passed) and no dispute open.
    function claim(uint256 round, uint256 score, uint256 cumulative, bytes32 updateHash, bytes32[] calldata proof)
        external
        nonReentrant
    {
        if (challengeWindow != 0) {
            if (openDisputes != 0) revert DisputeOpen();
            uint256 finalAt = rounds[round].postedAt + challengeWindow;
            if (block.timestamp < finalAt) revert NotFinal(finalAt);
        }
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
        if (challengeWindow != 0 && bondOf[msg.sender] < aggregatorBond) revert AggregatorBondTooLow(aggregatorBond);
        if (reward > pool) revert PoolTooSmall(pool);
        lastRound = round;
        roundRoot[round] = root;
        modelHash[round] = modelHash_;
        rounds[round] = RoundInfo(manifest, msg.sender, uint64(block.timestamp), Status.Posted);
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

    /// @notice Bond the caller as an aggregator (adds to its bond); with disputes on, recordRound
    /// needs a bond of at least `aggregatorBond`.
    function bondAggregator() external payable {
        if (msg.value == 0) revert ZeroBond();
        bondOf[msg.sender] += msg.value;
        emit AggregatorBonded(msg.sender, msg.value, bondOf[msg.sender]);
    }

    /// @notice Take the caller's aggregator bond back: only once the last recorded round's window
    /// has passed and no dispute is open, so that no round it may have posted can still cost it.
    function withdrawAggregatorBond() external nonReentrant {
        uint256 until = rounds[lastRound].postedAt + challengeWindow;
        if (openDisputes != 0 || block.timestamp < until) revert BondLocked(until);
        uint256 amount = bondOf[msg.sender];
        if (amount == 0) revert NothingToClaim();
        bondOf[msg.sender] = 0;
        emit AggregatorUnbonded(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    // --- disputes ---------------------------------------------------------------------------

    /// @notice Dispute a round within its challenge window, bonding at least `disputeBond`; opens
    /// the vote for `votingPeriod` seconds. One dispute per round.
    function dispute(uint256 round) external payable {
        if (challengeWindow == 0) revert DisputesOff();
        RoundInfo storage r = rounds[round];
        if (r.postedAt == 0) revert RoundNotRecorded();
        if (block.timestamp >= r.postedAt + challengeWindow) revert WindowClosed(r.postedAt + challengeWindow);
        if (r.status != Status.Posted) revert AlreadyDisputed();
        if (clients[msg.sender].stake == 0) revert NotRegistered();
        if (msg.sender == r.aggregator) revert Accused();
        if (msg.value < disputeBond) revert DisputeBondTooLow(disputeBond);
        r.status = Status.Disputed;
        openDisputes += 1;
        uint64 votingEnds = uint64(block.timestamp + votingPeriod);
        Dispute storage d = disputes[round];
        d.challenger = msg.sender;
        d.votingEnds = votingEnds;
        d.bond = uint128(msg.value); // ether's supply is far below 2^128 wei
        d.quorum = uint128(totalStaked * quorumBps / 10_000);
        emit Disputed(round, msg.sender, msg.value, votingEnds);
    }

    /// @notice Post the root and model hash the caller recomputed for a disputed round; once per
    /// verifier, weighted by its stake, before the vote closes.
    function vote(uint256 round, bytes32 root, bytes32 modelHash_) external {
        RoundInfo storage r = rounds[round];
        Dispute storage d = disputes[round];
        if (r.status != Status.Disputed) revert NotDisputed();
        if (block.timestamp >= d.votingEnds) revert VotingClosed(d.votingEnds);
        Client storage c = clients[msg.sender];
        uint256 weight = c.stake;
        if (weight == 0) revert NotRegistered();
        if (c.unbondingEnds != 0) revert Unbonding(); // its stake may leave before the vote closes
        if (msg.sender == r.aggregator) revert Accused();
        if (voted[round][msg.sender]) revert AlreadyVoted();
        if (root == bytes32(0)) revert EmptyRoot(); // a zero root would make the round unclaimable
        voted[round][msg.sender] = true;
        bytes32 answer = keccak256(abi.encode(root, modelHash_));
        uint256 total = weightOf[round][answer] + weight;
        weightOf[round][answer] = total;
        d.votedWeight += uint128(weight);
        if (total > d.topWeight) {
            d.topWeight = uint128(total);
            d.topRoot = root;
            d.topModelHash = modelHash_;
            d.tied = false;
        } else if (total == d.topWeight) {
            d.tied = true; // another answer has as much (this one was below it before the vote)
        }
        emit Voted(round, msg.sender, root, modelHash_, weight);
    }

    /// @notice Close a dispute once its vote has closed (anyone may call): upheld, overturned or
    /// undecided, as the contract's notice says; returns the outcome.
    function resolve(uint256 round) external returns (Status outcome) {
        RoundInfo storage r = rounds[round];
        Dispute storage d = disputes[round];
        if (r.status != Status.Disputed) revert NotDisputed();
        if (block.timestamp < d.votingEnds) revert VotingOpen(d.votingEnds);
        openDisputes -= 1;
        uint256 taken = 0; // from the aggregator's bond: only when overturned
        if (d.votedWeight == 0 || d.votedWeight < d.quorum || d.tied) {
            outcome = Status.Undecided;
            owed[d.challenger] += d.bond;
        } else if (d.topRoot == roundRoot[round] && d.topModelHash == modelHash[round]) {
            outcome = Status.Upheld;
            _forfeit(d.bond);
        } else {
            outcome = Status.Overturned;
            roundRoot[round] = d.topRoot;
            modelHash[round] = d.topModelHash;
            uint256 bond = bondOf[r.aggregator];
            taken = bond < aggregatorBond ? bond : aggregatorBond;
            bondOf[r.aggregator] = bond - taken;
            owed[d.challenger] += d.bond + taken / 2;
            _forfeit(taken - taken / 2);
        }
        r.status = outcome;
        emit Resolved(round, outcome, roundRoot[round], modelHash[round], taken);
    }

    /// @notice Pull what resolved disputes owe the caller.
    function collect() external nonReentrant {
        uint256 amount = owed[msg.sender];
        if (amount == 0) revert NothingToClaim();
        owed[msg.sender] = 0;
        emit Collected(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    function _forfeit(uint256 amount) private {
        if (burnSlashed) burned += amount;
        else pool += amount;
    }

    // --- views ------------------------------------------------------------------------------

    function stakeOf(address client) external view returns (uint256) {
        return clients[client].stake;
    }

    function claimedOf(address client) external view returns (uint256) {
        return clients[client].claimed;
    }

    /// @notice Whether a leaf of `round` may be claimed now (its proof aside).
    function isFinal(uint256 round) external view returns (bool) {
        RoundInfo storage r = rounds[round];
        return r.postedAt != 0 && (challengeWindow == 0 || (openDisputes == 0 && block.timestamp >= r.postedAt + challengeWindow));
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
