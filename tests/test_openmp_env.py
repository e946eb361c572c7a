"""fastllm parks torch's OpenMP workers (OMP_WAIT_POLICY=PASSIVE) when it is imported
before torch, keeps a policy the user chose, and says when torch came first. The OpenMP
runtime itself is asked what it runs with (OMP_DISPLAY_ENV prints its settings)."""
import os
import subprocess
import sys

import pytest

PROGRAM = ("import {first}, {second}, os; import torch; torch.ones(4096).sum(); "
           "from fastllm.openmp_env import prefer_passive_openmp; "
           "print('policy', os.environ.get('OMP_WAIT_POLICY'))")


def _run(first: str, second: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="TRUE", **env_overrides)
    return subprocess.run([sys.executable, "-c", PROGRAM.format(first=first, second=second)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)


def _runtime_policy(stderr: str):
    """OMP_WAIT_POLICY as the OpenMP runtime reports it (None: no report, e.g. not libgomp)."""
    for line in stderr.splitlines():
        if line.strip().startswith("OMP_WAIT_POLICY"):
            return line.split("=", 1)[1].strip().strip("'").upper()
    return None


def test_fastllm_first_makes_openmp_passive():
    out = _run("fastllm", "sys")
    assert "policy PASSIVE" in out.stdout
    reported = _runtime_policy(out.stderr)
    if reported is None:
        pytest.skip("this torch's OpenMP runtime does not report its settings")
    assert reported == "PASSIVE"


def test_a_policy_the_user_set_is_kept():
    out = _run("fastllm", "sys", OMP_WAIT_POLICY="ACTIVE")
    assert "policy ACTIVE" in out.stdout
    assert _runtime_policy(out.stderr) in (None, "ACTIVE")


def test_torch_first_is_left_alone():
    # Too late for the runtime: fastllm must not claim a setting it cannot apply.
    code = ("import torch, os; from fastllm.openmp_env import prefer_passive_openmp; "
            "print(prefer_passive_openmp(), os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.split() == ["False", "None"]
