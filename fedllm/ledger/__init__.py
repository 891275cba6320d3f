"""The contribution ledger: chain (the web3 bridge to FedLedger on an Ethereum-compatible chain),
session (the server's ledger rounds: scores, flags, rewards, penalties, commitments), scoring (the
contribution scorers and flags, a registry) and merkle (the per-round commitment tree)."""
