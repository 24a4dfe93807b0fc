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
import signal
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
    # Every name is written, a tied lm_head too (as its own copy: safetensors refuses shared storage), because
    # vLLM's CPU backend keeps a separately repacked lm_head that only an explicit lm_head.weight refreshes.
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        tensors[k] = t.clone() if t.data_ptr() in seen else t
        seen.add(t.data_ptr())
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
    """Run fn() and raise SyncTimeout naming `what` if it exceeds timeout_s.

    On the main thread a SIGALRM timer interrupts it (the call stays on this thread: vLLM's CPU backend
    binds its OpenMP threads to the main thread, and the same reload ran twice as slow on a helper
    thread). Elsewhere fn runs on a helper thread that is abandoned on timeout."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise SyncTimeout(f"weight push to {what} did not finish within sync.timeout_s={timeout_s}s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
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
        return time.perf_counter() - t0
