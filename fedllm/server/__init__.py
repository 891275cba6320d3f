"""The server: app (the Flower ServerApp), loop (the recipe: set up, rounds, finish), round (one
round as a value, plain or secure attempts, retries), evaluator (the global state's figures, and
`fedllm eval`), checkpoint (per-round checkpoints, resume) and grid (the in-process engine's Grid)."""
