"""The update kinds a client can run: LoRA adapters (lora.py) and zeroth-order, seed-based
full-parameter steps (zo.py)."""
