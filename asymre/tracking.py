"""Metrics out: every metric goes to `metrics.jsonl` in the run folder (never a tracker alone), and to the
trackers `logging.report_to` names. wandb through its own client: online when wandb finds credentials (WANDB_API_KEY,
`wandb login`'s netrc or settings), offline (said once) when it finds none, and as `WANDB_MODE` says when the user
set it; a resumed run continues the same wandb run (its id is kept in `RUN_DIR/wandb/asymre_run_id`). tensorboard
(RUN_DIR/tensorboard/RUN_NAME), trackio and mlflow through Accelerate's tracker classes (`accelerate.tracking`), each
where its package is installed: a name that is unknown or not installed is refused at start-up (`check_trackers`).
Design choice: wandb keeps its own client for the offline and resume handling above, which Accelerate's WandBTracker
lacks; the others gain nothing from a hand-written client.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from asymre.config import ConfigError

log = logging.getLogger("asymre")

# logging.report_to's names, each with Accelerate's check that its package is installed (the package has the same name)
TRACKERS = {"wandb": "is_wandb_available", "tensorboard": "is_tensorboard_available", "trackio": "is_trackio_available",
            "mlflow": "is_mlflow_available"}


def _installed(name: str) -> bool:
    from accelerate import utils

    return bool(getattr(utils, TRACKERS[name])())  # accelerate 1.15's trackio check can answer None


def check_trackers(report_to: list[str]) -> None:
    """Refuse a tracker name that is unknown or whose package is not installed (a ConfigError naming the key and the
    package): called at start-up, before any model loads."""
    for name in report_to:
        if name not in TRACKERS:
            raise ConfigError(f"logging.report_to: {name!r} is not a tracker asymre logs to ({', '.join(TRACKERS)})")
        if not _installed(name):
            raise ConfigError(f"logging.report_to: {name!r} needs the {name} package, which is not installed (pip install {name})")


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested config as dotted keys with scalar values (lists, dicts and null as JSON text): what tensorboard's
    hparams and mlflow's params accept."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def accelerate_tracker(name: str, run_dir: Path, project: str, run_name: str):
    """Accelerate's tracker for `name` (not wandb), started: tensorboard writes under RUN_DIR/tensorboard/RUN_NAME;
    trackio's project and mlflow's experiment are `logging.project`, the run is `logging.run_name`."""
    from accelerate import PartialState, tracking

    if name == "tensorboard":
        tracker = tracking.TensorBoardTracker(run_name, run_dir / "tensorboard")
    elif name == "trackio":
        tracker = tracking.TrackioTracker(project, name=run_name)  # accelerate passes its run_name to trackio.init as the project
    else:
        tracker = tracking.MLflowTracker(experiment_name=project, run_name=run_name)
    PartialState()  # the recipe's Accelerator made it already; used alone, this logger makes the one-process state the trackers need
    tracker.start()
    return tracker


def wandb_mode(wandb) -> str:
    """'online' or 'offline': what the user set in WANDB_MODE, else online exactly when wandb finds credentials
    (the environment, `wandb login`'s netrc or settings; read locally, no network call)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if wandb.api.api_key else "offline"
    except Exception:  # noqa: BLE001 - a wandb without this API: be safe, stay local
        return "offline"


def wandb_run_id(run_dir: str | Path, resume: bool) -> str:
    """The wandb run id of this run folder: the saved one when the run resumes, else a new one (saved)."""
    path = Path(run_dir) / "wandb" / "asymre_run_id"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 lowercase characters, as wandb's own ids
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


class MetricsLogger:
    def __init__(self, run_dir: str | Path, report_to: list[str], config: dict[str, Any] | None = None, project: str = "asymre",
                 run_name: str = "asymre", tags: list[str] | None = None, enabled: bool = True, resume: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.trackers: list = []  # Accelerate's trackers (tensorboard, trackio, mlflow)
        self._completions = None  # completions.jsonl, opened on first use
        self.t0 = time.time()
        check_trackers(report_to)  # on every rank: all refuse alike
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)
        if "wandb" in report_to:
            import wandb

            mode = wandb_mode(wandb)
            if mode == "offline" and "WANDB_MODE" not in os.environ:
                log.warning("wandb: no credentials found (WANDB_API_KEY, `wandb login`), logging offline to %s "
                            "(sync later with `wandb sync`)", Path(run_dir) / "wandb")
            resume_kw = {"resume": "allow"} if mode == "online" else {}  # offline runs sync into the same id later
            self.wandb = wandb.init(project=project, name=run_name, tags=tags or [], config=config, dir=str(run_dir),
                                    mode=mode, id=wandb_run_id(run_dir, resume), **resume_kw)
        for name in (n for n in report_to if n != "wandb"):
            tracker = accelerate_tracker(name, Path(run_dir), project, run_name)
            if config:
                tracker.store_init_configuration(flat_config(config))
            self.trackers.append(tracker)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v) for k, v in metrics.items()}
        self._fh.write(json.dumps({"step": step, "time": round(time.time() - self.t0, 3), **clean}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        for tracker in self.trackers:
            tracker.log(metrics, step=step)

    def log_completions(self, rows: list[dict[str, Any]], step: int) -> None:
        """The step's sampled completions to `completions.jsonl` (one JSON line each) and, with wandb, to a
        `completions` table: TRL's `log_completions`, so a reward hack can be read, not only plotted."""
        if not self.enabled or not rows:
            return
        if self._completions is None:
            self._completions = open(self.path.parent / "completions.jsonl", "a", buffering=1)
        for row in rows:
            self._completions.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb is not None:
            import wandb

            columns = ["step", "policy_version", "prompt", "completion", "reward", "advantage"]
            if any("messages" in r for r in rows):  # episodes: the whole exchange, tool calls and results, as JSON
                columns.append("messages")
            data = [[step] + [json.dumps(r.get(c)) if c == "messages" else r.get(c) for c in columns[1:]] for r in rows]
            self.wandb.log({"completions": wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._completions is not None:
            self._completions.close()
        self._fh.close()
        if self.wandb is not None:
            self.wandb.finish()
        for tracker in self.trackers:
            tracker.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
