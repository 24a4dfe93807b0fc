"""Weight sync: every `sync.interval` learner steps (the paper's N) push the learner's weights into every
engine and bump the policy version.

Methods: 'inprocess' hands tensors to a colocated engine by reference; 'disk' writes one safetensors
folder (atomically) that worker processes or remote vLLM servers load, the portable fallback.
Every push runs under `sync.timeout_s`: past it, a `SyncTimeout` names the engine, never a silent hang.
Left out: NCCL broadcast into engines on other GPUs (needs a GPU vLLM to test against).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file


class SyncTimeout(TimeoutError):
    """A weight push or acknowledgement did not finish within sync.timeout_s."""


def write_weights_folder(state_dict: dict[str, torch.Tensor], folder: str | Path) -> str:
    """Atomically write `state_dict` as `folder/model.safetensors` (tied weights written once)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    seen: dict[int, str] = {}
    tensors = {}
    for k, v in state_dict.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            continue  # tied to an earlier tensor (lm_head = embed_tokens)
        seen[ptr] = k
        tensors[k] = v.detach().to("cpu").contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return str(folder)


def read_weights_folder(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in weight folder {folder}")
    for f in files:
        yield from load_file(str(f)).items()


def run_with_timeout(fn, timeout_s: float, what: str):
    """Run fn() in a helper thread; raise SyncTimeout naming `what` if it exceeds timeout_s."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    th = threading.Thread(target=target, name=f"sync:{what}", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise SyncTimeout(f"weight push to {what} did not finish within sync.timeout_s={timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class WeightSync:
    """Decides when to push and pushes. `targets` expose `load_weights(weights | folder, version)`."""

    def __init__(self, interval: int, method: str = "auto", timeout_s: float = 300.0, folder: str | Path | None = None):
        self.interval = interval
        self.method = method
        self.timeout_s = timeout_s
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="asymre-sync-"))
        self.pushes = 0
        self.last_seconds = 0.0

    def due(self, learner_step: int) -> bool:
        return learner_step > 0 and learner_step % self.interval == 0

    def resolve_method(self, targets: list) -> str:
        if self.method != "auto":
            return self.method
        return "disk" if any(getattr(t, "remote", False) for t in targets) else "inprocess"

    def push(self, state_dict: dict[str, torch.Tensor], version: int, targets: list) -> float:
        """Push `state_dict` into every target and set their version; returns seconds taken."""
        t0 = time.perf_counter()
        method = self.resolve_method(targets)
        if method == "disk":
            path = write_weights_folder(state_dict, self.folder / "latest")
            for i, t in enumerate(targets):
                run_with_timeout(lambda t=t: t.load_weights(path, version), self.timeout_s, f"engine {i} ({type(t).__name__})")
        elif method == "inprocess":
            for i, t in enumerate(targets):
                if getattr(t, "remote", False):
                    raise ValueError("sync.method=inprocess cannot reach a worker process or remote server; use 'disk'")
                run_with_timeout(lambda t=t: t.load_weights(iter(state_dict.items()), version), self.timeout_s,
                                 f"engine {i} ({type(t).__name__})")
        else:
            raise ValueError(f"sync.method={method!r}: expected 'inprocess' or 'disk'")
        self.pushes += 1
        self.last_seconds = time.perf_counter() - t0
        return self.last_seconds
