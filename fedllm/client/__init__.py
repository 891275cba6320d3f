"""The client: app (the Flower ClientApp, thin: no torch at import), round (one message's work:
the method's client half, attack simulations and ledger signing at its edges), worker (a SuperNode's
warm worker process) and attacks (the registry of simulated dishonest clients)."""
