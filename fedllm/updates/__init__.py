"""The update kinds a client can run: LoRA adapters (lora.py)."""
