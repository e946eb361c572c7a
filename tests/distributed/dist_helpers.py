"""Run a function on N spawned ranks over gloo (torch.multiprocessing, a file rendezvous:
no port to race for) and collect what each rank returned; a rank that raises fails the
call, and a hang is killed at the timeout (no orphan process)."""
import datetime
import os
import pickle
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world_size: int, *args, timeout_s: float = 120.0) -> list:
    """[fn(rank, world_size, *args) for each rank], each run in its own process."""
    with tempfile.TemporaryDirectory(prefix="fastllm-dist-") as tmp:
        ctx = mp.spawn(_entry, args=(world_size, fn, args, tmp, timeout_s), nprocs=world_size, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks still running after {timeout_s}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _entry(rank, world_size, fn, args, tmp, timeout_s):
    torch.set_num_threads(1)       # the ranks share the host's cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
