"""Parallelism: the Communicator (NCCL through fastllm._C on GPUs, gloo on CPU) and, built
on it, tensor / pipeline / data parallel execution. See communicator.py for the contract."""
