"""What the adapter-training methods share (lora and the PEFT family, exact-lora, dpo, and diloco
and zo with params=lora): the [lora] section, building, training, saving and reading a PEFT adapter
(engine), per-client ranks and quantization (resources), and LoRA's two halves, which dpo extends.
No method imports another method's folder; they import this."""
