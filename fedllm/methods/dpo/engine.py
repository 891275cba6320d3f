"""Local DPO through TRL: one `DPOTrainer` per round on the node's cached PEFT model.

DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290) trains the policy pi on pairs
(x, y_w, y_l) with loss -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) -
log ref(y_l|x)))); TRL's other losses (dpo.loss-type) change that outer function. The policy is
the base plus the LoRA adapter that travels; the reference is frozen:

- dpo.reference=global: the base plus the round's global adapter, as it arrived. TRL copies the
  adapter it is handed into a second adapter named "ref" when the trainer is made, which here is
  right after the sync, so the copy is the global adapter.
- dpo.reference=base: the "ref" copy is removed, and TRL falls back to the base, adapters off.

TRL 1.16 keeps its losses inside `DPOTrainer._compute_loss` (there is no loss function to call
alone), so the trainer runs the round: `max_steps` = train.local-steps, a constant learning rate,
its seeded sampler. What it changes on the model (the "ref" adapter, a fused LM head on the base
model's forward, dropout off, checkpointing's input hook) is undone after the round (`patched`),
so the cached model, which a LoRA run in the same process may share, is the same one every round
(and does not grow a wrapper per round).

    stats = train(model, tokenizer, rows, cfg.train, cfg.dpo, cfg.data.max_length, seed)
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Any, Iterator

import torch

from fedllm import devices
from fedllm.config import TrainConfig
from fedllm.methods.dpo.config import DpoConfig
from fedllm.errors import DataError
from fedllm.methods.adapters import engine as lora
from fedllm.methods.schedule import lr_factor

REF = "ref"  # the name TRL gives the reference adapter
logging.getLogger("trl").setLevel(logging.ERROR)


def train(model: Any, tokenizer: Any, rows: list[dict[str, str]], cfg: TrainConfig, dpo: DpoConfig,
          max_length: int, seed: int, optimizer: torch.optim.Optimizer | None = None,
          clock: tuple[int, int] = (0, 0)) -> dict[str, float]:
    """`cfg.local_steps` DPO optimizer steps (AdamW, TRL's trainer) on preference-pair texts
    (`fedllm.data.pair_text`); returns the round's loss and TRL's reward statistics.
    `optimizer`: step this AdamW (its moments kept by the caller, train.keep-optimizer) instead of
    the trainer's own. `clock`: (this round's first local step, the run's) for train.lr-schedule."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig as TrlConfig
    from trl import DPOTrainer

    datasets.disable_progress_bars()  # TRL's tokenizing map would draw one bar per round
    if not any(len(tokenizer(text=r["prompt"])["input_ids"]) < max_length for r in rows):  # as TRL counts
        raise DataError(f"data.max-length={max_length}: every preference pair's prompt fills it, so TRL leaves "
                        "out every pair; raise data.max-length")
    kept: dict[str, float] = {}

    class Keep(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            kept.update(logs or {})  # the last log: TRL's averages over the round

        def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            # the trainer's scheduler is constant (it resets each group to train.lr after a step): the
            # schedule over the run's steps sets the rate before each one
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, clock[0] + state.global_step, clock[1])

    device = devices.of(model)  # TRL's trainer places the model on its accelerator's device: the current GPU
    mode = devices.precision(cfg.precision, device)
    lora.check_optimizer(cfg, device)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="fedllm-dpo-") as scratch, patched(model), on_device:
        args = TrlConfig(
            output_dir=scratch, max_steps=cfg.local_steps, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0,
            beta=dpo.beta, loss_type=dpo.losses(), loss_weights=dpo.weights(), label_smoothing=dpo.label_smoothing,
            max_length=max_length,  # TRL leaves out a pair whose prompt alone fills it
            seed=seed, data_seed=seed, use_cpu=device.type == "cpu",
            bf16=mode == "bf16", fp16=mode == "fp16",  # TRL's defaults: bf16 and checkpointing
            optim="paged_adamw_8bit" if cfg.optimizer == "paged-adamw-8bit" else "adamw_torch",
            gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, log_level="error",
            dataloader_num_workers=0, precompute_ref_log_probs=False, disable_dropout=True,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Keep()], optimizers=(optimizer, None))
        trainer.remove_callback(PrinterCallback)
        if dpo.reference == "base" and REF in model.peft_config:
            model.delete_adapter(REF)  # TRL then disables the adapters for the reference pass
        result = trainer.train()
    return {
        "train-loss": float(result.training_loss),
        "steps": float(cfg.local_steps),
        "examples-seen": float(cfg.local_steps * cfg.grad_accum * min(cfg.batch_size, len(rows))),
        "train-reward-accuracy": float(kept.get("rewards/accuracies", 0.0)),
        "train-reward-margin": float(kept.get("rewards/margins", 0.0)),
    }


@contextlib.contextmanager
def patched(model: Any) -> Iterator[None]:
    """Undo what a DPOTrainer leaves on the model: the "ref" adapter, the fused-LM-head forward it
    sets on the base model's instance, activation checkpointing and its input-gradient hook, the
    dropout it turns off, training mode."""
    base = model.get_base_model()
    saved = base.__dict__.get("forward")
    dropout = {m: m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    try:
        yield
    finally:
        for module, p in dropout.items():
            module.p = p
        if getattr(base, "_require_grads_hook", None) is not None:  # TRL's enable_input_require_grads
            base.disable_input_require_grads()
        if saved is None:
            base.__dict__.pop("forward", None)
        else:
            base.forward = saved
        if REF in model.peft_config:
            model.delete_adapter(REF)
        model.set_adapter("default")
        lora.checkpointing(model, False)
        model.eval()
