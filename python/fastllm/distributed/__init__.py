"""Parallelism: the Communicator (NCCL through fastllm._C on GPUs, gloo on CPU) and, built
on it, tensor / pipeline / data parallel execution. See communicator.py for the contract."""
from fastllm.distributed.sharding import partition_layers, validate_parallel

__all__ = ["partition_layers", "validate_parallel"]
