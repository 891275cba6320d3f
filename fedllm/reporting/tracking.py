"""Experiment trackers (server.trackers) through accelerate's tracking module, offline and
inside the run directory:

    tensorboard  RUN_DIR/tensorboard/          event files (`tensorboard --logdir RUN_DIR/tensorboard`)
    mlflow       RUN_DIR/mlruns/               an MLflow store: mlflow.db (SQLite) and artifacts/
                                               (`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlruns/mlflow.db`)
    wandb        RUN_DIR/wandb/                offline mode (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it)
    aim          RUN_DIR/.aim                  an Aim repository (`aim up --repo RUN_DIR`)

Each round's metrics row goes out as scalars at step = round (eval loss, exact match, Rouge-L,
per-family figures, lm-eval figures, bytes per round and cumulative, times); the config goes
in as hyperparameters; the report as an artifact where the tracker keeps files (MLflow, wandb).
A resumed run continues the same tracker runs (their ids are kept in RUN_DIR/trackers.json; a
damaged one stops the run before round 1, left as it is). A tracker that fails is turned off with a
warning: it never stops a run.

Each tracker is one entry of TRACKERS: a factory `make(run_dir, previous_id) -> Tracker` (the
accelerate GeneralTracker shape: start, store_init_configuration, log, finish), with metadata
`package` (checked before the run), `run_id(tracker)` (kept to resume the same tracker run) and
`save(tracker, report, summary)` (what it keeps at the end). A user's own is one registration
in a module server.plugins names.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.files import FileFormatError, read_json
from fedllm.registry import Registry
from fedllm.reporting.runlog import write_atomically

log = logging.getLogger(__name__)

IDS = "trackers.json"
IDS_SPEC = {"*": str}  # tracker name -> its run id (fedllm.files' spec)


class Tracker(Protocol):
    """What Trackers calls on a started tracker (accelerate's GeneralTracker has these)."""

    def start(self) -> None: ...

    def store_init_configuration(self, values: dict[str, Any]) -> None: ...

    def log(self, values: dict[str, float], step: int | None = None) -> None: ...

    def finish(self) -> None: ...


TRACKERS: Registry[Callable[[Path, "str | None"], Tracker]] = Registry("tracker", "server.trackers")


def check_installed(cfg: Config) -> list[str]:
    """server.trackers, each registered (built-in or from server.plugins) and its package importable.

    Raises:
        ConfigError: naming the first tracker that is unknown or whose package is missing.
    """
    names = cfg.server.tracker_names()
    for name in names:
        package = TRACKERS.get(name).meta.get("package")
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"server.trackers: {name} needs the {package} package "
                              "(pip install 'fedllm[trackers]')")
    return names


def tracking_uri(run_dir: Path) -> str:
    """The run's MLflow store: a SQLite file in the run directory (MLflow 3 keeps its plain-file
    store in maintenance mode and refuses it by default)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlruns' / 'mlflow.db'}"


def metric_name(name: str) -> str:
    """A name every tracker takes (MLflow allows letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def scalars(row: dict[str, Any], totals: dict[str, float]) -> dict[str, float]:
    """A metrics row as flat scalars; `totals` carries the cumulative bytes between rounds.
    Family and task names are made safe for every tracker (`metric_name`)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
            out[key] = float(value)
    for name, figures in (row.get("families") or {}).items():
        for key, value in figures.items():
            if isinstance(value, (int, float)):
                out[metric_name(f"families/{name}/{key}")] = float(value)
    for task, figures in (row.get("lm-eval") or {}).items():
        for key, value in figures.items():
            out[metric_name(f"lm-eval/{task}/{key}")] = float(value)
    for key in ("bytes-up", "bytes-down"):
        if isinstance(row.get(key), dict):
            out[key] = float(sum(row[key].values()))
            totals[key] = totals.get(key, 0.0) + out[key]
            out[f"{key}-cumulative"] = totals[key]
    return out


def read_ids(path: Path) -> dict[str, str]:
    """RUN_DIR/trackers.json: {tracker: its run id}, so a resumed run continues the same runs ({}
    when there is none).

    Raises:
        FileFormatError: naming the file when it is damaged; it is left as it is (the run stops
            before round 1 rather than lose the tracker runs' ids).
    """
    if not path.exists():
        return {}
    try:
        return read_json(path, IDS_SPEC, limit=1 << 20)
    except FileFormatError as err:
        raise FileFormatError(f"{err} (remove it to start new tracker runs)") from None


class Trackers:
    """The run's trackers; `log(row)` after each round, `finish(report)` at the end."""

    def __init__(self, cfg: Config, run_dir: Path, rows: list[dict[str, Any]] = ()) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.active: dict[str, Any] = {}
        self.totals: dict[str, float] = {}
        for row in rows:  # a resumed run's cumulative bytes go on from where it stopped
            scalars(row, self.totals)
        names = check_installed(cfg)
        if not names:
            return
        ids_file = self.run_dir / IDS
        ids = read_ids(ids_file)
        hparams = {k: v for k, v in cfg.to_flat().items() if isinstance(v, (bool, int, float, str))}
        for name in names:
            try:
                tracker = self._make(name, ids.get(name))
                tracker.start()
                if name not in ids:
                    tracker.store_init_configuration(hparams)
                ids[name] = self._id(name, tracker)
                self.active[name] = tracker
            except Exception as err:  # a tracker is a view of the run, never a reason to stop it
                log.warning("server.trackers: %s not started (%s: %s)", name, type(err).__name__, err)
        write_atomically(ids_file, json.dumps({k: v for k, v in ids.items() if v is not None}, indent=2) + "\n")

    def _make(self, name: str, previous: str | None) -> Tracker:
        return TRACKERS.get(name).impl(self.run_dir, previous)

    @staticmethod
    def _id(name: str, tracker: Tracker) -> str | None:
        run_id = TRACKERS.get(name).meta.get("run_id")
        return run_id(tracker) if run_id else None

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row, self.totals)
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(values, step=int(row["round"]))
            except Exception as err:
                log.warning("server.trackers: %s turned off after an error (%s: %s)", name, type(err).__name__, err)
                self.active.pop(name)

    def finish(self, report: Path | None = None, summary: dict[str, Any] | None = None) -> None:
        for name, tracker in self.active.items():
            try:
                save = TRACKERS.get(name).meta.get("save")
                if save:
                    save(tracker, report if report is not None and report.exists() else None, summary)
                tracker.finish()
            except Exception as err:
                log.warning("server.trackers: %s did not finish cleanly (%s: %s)", name, type(err).__name__, err)
        self.active = {}


# --- the built-in trackers, through accelerate -----------------------------------------------
def _tensorboard(run_dir: Path, previous: str | None) -> Tracker:
    from accelerate import tracking

    return tracking.TensorBoardTracker(run_dir.name, run_dir / "tensorboard")


def _tensorboard_save(tracker: Any, report: Path | None, summary: Mapping[str, Any] | None) -> None:
    if summary:
        tracker.writer.add_text("summary", "    " + json.dumps(summary, indent=2).replace("\n", "\n    "))


def _mlflow(run_dir: Path, previous: str | None) -> Tracker:
    import mlflow
    from accelerate import tracking

    (run_dir / "mlruns").mkdir(exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(run_dir))
    return tracking.MLflowTracker(experiment_name="fedllm", run_id=previous, run_name=run_dir.name,
                                  logging_dir=(run_dir / "mlruns" / "artifacts").as_uri())


def _mlflow_save(tracker: Any, report: Path | None, summary: Mapping[str, Any] | None) -> None:
    if report is not None:
        tracker.log_artifact(str(report))


_WANDB_DIRS: set[str] = set()  # the wandb folders this process pointed into a run directory


def _wandb(run_dir: Path, previous: str | None) -> Tracker:
    from accelerate import tracking

    os.environ.setdefault("WANDB_SILENT", "true")
    for name, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        if name not in os.environ or name in _WANDB_DIRS:  # the user's own setting wins
            os.environ[name] = str(run_dir / "wandb" / sub)  # its service's logs too: not in ~/.cache
            _WANDB_DIRS.add(name)
    return tracking.WandBTracker("fedllm", name=run_dir.name, dir=str(run_dir), mode="offline",
                                 id=previous, resume="allow" if previous else None)


def _wandb_save(tracker: Any, report: Path | None, summary: Mapping[str, Any] | None) -> None:
    if report is not None:
        tracker.run.save(str(report), base_path=str(report.parent), policy="now")


def _aim(run_dir: Path, previous: str | None) -> Tracker:
    from accelerate import tracking

    return tracking.AimTracker(run_dir.name, str(run_dir), system_tracking_interval=None,
                               **({"run_hash": previous} if previous else {}))


TRACKERS.register("tensorboard", _tensorboard, package="tensorboard", save=_tensorboard_save)
TRACKERS.register("mlflow", _mlflow, package="mlflow", run_id=lambda t: t.active_run.info.run_id, save=_mlflow_save)
TRACKERS.register("wandb", _wandb, package="wandb", run_id=lambda t: t.run.id, save=_wandb_save)
TRACKERS.register("aim", _aim, package="aim", run_id=lambda t: t.writer.hash)
