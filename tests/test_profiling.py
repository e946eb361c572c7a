"""fastllm.profiling: NVTX ranges (every backend) and torch.profiler traces."""
import json

import pytest
import torch

from fastllm import profiling
from fastllm.profiling import maybe_profile, nvtx_range


@pytest.fixture(params=["nvtx", "torch", "none"])
def backend(request, monkeypatch):
    """Force each NVTX backend and record the push/pop calls it makes."""
    calls = []
    monkeypatch.setattr(profiling, "nvtx_backend", lambda: request.param)
    if request.param == "nvtx":
        nvtx = pytest.importorskip("nvtx")
        monkeypatch.setattr(nvtx, "push_range", lambda message=None, color=None, **kw: calls.append(("push", message)))
        monkeypatch.setattr(nvtx, "pop_range", lambda **kw: calls.append(("pop",)))
    elif request.param == "torch":
        monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda msg: calls.append(("push", msg)))
        monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    return request.param, calls


def test_nvtx_range_context_manager_and_decorator(backend):
    name, calls = backend

    @nvtx_range("forward")
    def forward(x):
        with nvtx_range("attention"):
            return x * 2

    assert forward(3) == 6
    with pytest.raises(KeyError):
        with nvtx_range("schedule"):
            raise KeyError("propagates")
    expected = [("push", "forward"), ("push", "attention"), ("pop",), ("pop",),
                ("push", "schedule"), ("pop",)]
    assert calls == (expected if name != "none" else [])


def test_nvtx_range_real_backend_is_harmless():
    assert profiling.nvtx_backend() in ("nvtx", "torch", "none")
    with nvtx_range("sample"):
        pass


def test_nvtx_range_rejects_empty_name():
    with pytest.raises(ValueError, match="name"):
        nvtx_range("")


def test_maybe_profile_none_is_a_no_op():
    with maybe_profile(None) as prof:
        assert prof is None


def test_maybe_profile_writes_a_chrome_trace(tmp_path):
    a = torch.randn(32, 32)
    with maybe_profile(tmp_path / "trace") as prof:
        (a @ a).sum()
    assert prof is not None
    traces = list((tmp_path / "trace").glob("fastllm.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert "aten::mm" in profiling.profiler_summary(prof)


def test_maybe_profile_rejects_a_file(tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        with maybe_profile(f):
            pass
