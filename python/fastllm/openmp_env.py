"""torch's OpenMP workers: sleep between parallel regions instead of spinning.

fastllm's CPU kernels run on their own pool (cpp/src/cpu_thread_pool.cc), sized like
torch's, and alternate with torch's GEMMs op by op. GNU OpenMP (the libgomp torch ships)
keeps its workers spinning for a few milliseconds after each region by default, so every
fastllm kernel that follows a GEMM (norms, rotary, attention, silu) shares its cores with
spinning threads: measured on the 2-core bench machine, a 512-token prefill used twice
the CPU time, half of it spin. OMP_WAIT_POLICY=PASSIVE parks them instead (a wake-up of
tens of microseconds per region, against GEMMs of milliseconds).

libgomp reads its environment once, when torch loads it, so this only takes effect when
fastllm is imported before torch (every `python -m fastllm.*` entry point is). A value
the user set is kept.
"""
from __future__ import annotations

import os
import sys


# OMP_WAIT_POLICY as the process started (None: unset): `bench cpu` gives it back to the
# peers it runs in child processes (llama.cpp and transformers measured at their default).
ORIGINAL_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
# Set to 0 to leave OpenMP's wait policy alone (what those children get).
OPT_OUT = "FASTLLM_OMP_PASSIVE"


def prefer_passive_openmp() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless set already (or FASTLLM_OMP_PASSIVE=0); False
    when torch (and so its OpenMP runtime) was loaded first, and the setting can no
    longer apply."""
    if "torch" in sys.modules or os.environ.get(OPT_OUT) == "0":
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True
