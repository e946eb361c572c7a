"""Run a function on N spawned CPU ranks over gloo (torch.multiprocessing, a free port).

    results = run_ranks(fn, world_size, *args)    # fn(rank, world_size, *args) -> picklable

Each rank's return value comes back through a file; a rank that raises fails the call
with its traceback (torch.multiprocessing.spawn's ProcessRaisedException).
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world_size, port, out_dir, args):
    torch.set_num_threads(1)          # N ranks on a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(fn, world_size, free_port(), out_dir, args),
                 nprocs=world_size, join=True)
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
