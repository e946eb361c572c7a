"""`fastllm serve MODEL` and `python -m fastllm.serve --model MODEL` take the same flags,
the engine ones shared with `fastllm.generate`."""
from __future__ import annotations

import pytest

from fastllm.cli import main as cli_main
from fastllm.generate import build_parser as generate_parser
from fastllm.serve.server import _check_args, build_parser


def _parse(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    return args


def test_positional_model_equals_flag_and_engine_args_shared():
    a = _parse(["./m", "--max-num-seqs", "8", "--api-key", "k", "--max-queue-len", "4"])
    b = _parse(["--model", "./m", "--max-num-seqs", "8", "--api-key", "k", "--max-queue-len", "4"])
    assert vars(a) | {"model_tag": None} == vars(b) | {"model_tag": None}
    assert a.model == "./m" and a.host == "127.0.0.1" and a.max_num_seqs == 8
    engine_flags = {"model", "dtype", "device", "seed", "num_kv_blocks", "block_size",
                    "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                    "gpu_memory_utilization", "swap_space", "no_prefix_caching",
                    "no_chunked_prefill", "enforce_eager"}
    gen = vars(generate_parser().parse_args([]))
    assert engine_flags <= set(gen) and engine_flags <= set(vars(a))
    assert {k: gen[k] for k in engine_flags} == {k: vars(_parse([]))[k] for k in engine_flags}


@pytest.mark.parametrize("argv", [["a", "--model", "b"], ["--max-queue-len", "0"],
                                  ["--port", "70000"], ["--shutdown-grace", "-1"],
                                  ["--uvicorn-log-level", "loud"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_console_script_dispatch(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastllm serve") and "--api-key" in out and "--max-num-seqs" in out
    assert cli_main([]) == 2 and cli_main(["bogus"]) == 2
    assert cli_main(["--help"]) == 0
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", "--help"])
    assert e.value.code == 0


def test_missing_model_exits_2(tmp_path, capsys):
    from fastllm.serve.server import main
    assert main([str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "error" in capsys.readouterr().err
