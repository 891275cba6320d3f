"""The server's evaluation of the global state, as one object the round loop calls.

    with Evaluator(cfg, method, held_out) as evaluate:
        row.update(evaluate(server_round))      # {} when the round is not due

Due before round 1, after the last round, and every server.eval-every rounds: held-out loss, exact
match and Rouge-L (per family: fedllm.evaluation.held_out), the method's own figures (a server half with
`evaluate(model, held_out)`: dpo's rewards), and the lm-eval tasks of server.eval-tasks, fedllm's own
written from the run's held-out split into a fresh temporary folder (nothing planted in a run
directory is read as a task). `evaluate_run` is `fedllm eval`: lm-eval tasks on a finished run's
result.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from fedllm.server import checkpoint
from fedllm.config import Config
from fedllm.errors import FedLLMError
from fedllm.evaluation.held_out import evaluate
from fedllm.evaluation.harness import parse_tasks, run_tasks, task_manager, write_tasks
from fedllm.methods import ServerHalf, data_splits
from fedllm.reporting.runlog import write_atomically
from strategies import build


class Evaluator:
    """Evaluates the method's global model on the held-out examples when a round is due."""

    def __init__(self, cfg: Config, method: ServerHalf, held_out: list[dict[str, str]]) -> None:
        self.cfg, self.method, self.held_out = cfg, method, held_out
        self.tasks = parse_tasks(cfg.server.eval_tasks)
        self._folder = tempfile.TemporaryDirectory(prefix="fedllm-tasks-") if self.tasks else None
        # unknown tasks fail here, before round 1
        self.manager = (eval_tasks(cfg, Path(self._folder.name), held_out, method.tokenizer)
                        if self._folder is not None else None)

    def due(self, server_round: int) -> bool:
        every, last = self.cfg.server.eval_every, self.cfg.server.num_rounds
        return self.cfg.server.evaluate and (server_round in (0, last) or (every > 0 and not server_round % every))

    def __call__(self, server_round: int) -> dict[str, Any]:
        """The figures of the global state after `server_round` (0: before round 1), or {}."""
        if not self.due(server_round):
            return {}
        s = self.cfg.server
        with self.method.model() as model:
            out = evaluate(model, self.method.tokenizer, self.held_out, self.cfg.data, s.eval_batch_size,
                           s.exact_match_examples, s.max_new_tokens)
            if hasattr(self.method, "evaluate"):  # a method's own figures (dpo: held-out rewards)
                out.update(self.method.evaluate(model, self.held_out))
            if self.tasks:
                out["lm-eval"] = run_tasks(model, self.method.tokenizer, self.tasks, self.cfg.data, limit=s.eval_limit,
                                           batch_size=s.eval_batch_size, manager=self.manager)
        return out

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def eval_tasks(cfg: Config, folder: Path, examples: list[dict[str, str]], tokenizer: Any = None) -> Any:
    """fedllm's own lm-eval tasks over `examples` written into `folder`, and lm-eval's task manager
    for server.eval-tasks with them and server.eval-include-path.

    Raises:
        ConfigError: naming server.eval-tasks (an unknown task) or server.eval-include-path.
    """
    write_tasks(folder, examples, cfg.data, cfg.server.max_new_tokens, tokenizer)
    includes = [Path(p.strip()).expanduser() for p in cfg.server.eval_include_path.split(",") if p.strip()]
    return task_manager(parse_tasks(cfg.server.eval_tasks), [Path(folder), *includes], key="server.eval-tasks",
                        include_key="server.eval-include-path")


def evaluate_run(run_dir: Path, tasks: list[str], include_path: list[Path] = (), limit: int = 0,
                 batch_size: int = 16) -> dict[str, dict[str, float]]:
    """lm-eval figures of a run's result (the global model of its last checkpoint: the adapter on
    its base, or the zo-rebuilt model), on `tasks`; fedllm's own tasks are written from the run's
    held-out split into a fresh temporary folder. Writes RUN_DIR/lm-eval/results.json.

    Raises:
        FedLLMError: for a folder that is not a run, one without a checkpoint, an unknown task, or a
            task whose data cannot be loaded.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FedLLMError(f"{run_dir}: not a fedllm run directory (no config.json)")
    if not (run_dir / checkpoint.FILE).is_file():
        raise FedLLMError(f"{run_dir}: no {checkpoint.FILE} to rebuild the result from (server.checkpoint was off, "
                          "or no round finished)")
    out = run_dir / "lm-eval"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FedLLMError(f"{out}: not a folder of this run (a link or a file); remove it")
    ckpt = checkpoint.read(run_dir / checkpoint.FILE)
    # the adapter comes from the checkpoint: server.init-from's folder may be gone by now
    cfg = Config.from_flat(checkpoint.saved_config(ckpt)).replace(server__init_from="")
    _, held_out = data_splits(cfg)
    with tempfile.TemporaryDirectory(prefix="fedllm-tasks-") as tmp:
        folder = write_tasks(Path(tmp), held_out, cfg.data, cfg.server.max_new_tokens)
        manager = task_manager(tasks, [folder, *include_path])  # unknown tasks fail before the model loads
        strategy = build(cfg)
        checkpoint.restore(strategy, ckpt, str(run_dir / checkpoint.FILE))
        write_tasks(folder, held_out, cfg.data, cfg.server.max_new_tokens, strategy.method.tokenizer)  # its prompts
        with strategy.method.model() as model:
            figures = run_tasks(model, strategy.method.tokenizer, tasks, cfg.data, limit=limit,
                                batch_size=batch_size, manager=manager)
    out.mkdir(exist_ok=True)
    write_atomically(out / "results.json", json.dumps(
        {"round": ckpt["round"], "tasks": tasks, "limit": limit, "results": figures}, indent=2) + "\n")
    return figures
