"""Secure aggregation (SecAgg+, Bell et al., CCS 2020) for fedllm's Message-API rounds:
`client.secagg_mod` (the client's half, a Flower mod) and `server.secure_round` (the server's
half, one round of the protocol around a method's train round); `core` holds what both share.
Turned on by secagg.enabled; README's "Secure aggregation" says what it protects and what not.
"""
