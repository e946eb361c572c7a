"""The one door to `fastllm._C`.

Every tensor crosses as DLPack (the extension never links libtorch); CUDA launches
run on torch's current stream. When the extension is missing, or has no kernel for
the tensor's device, the pure-torch reference in `fastllm.reference` runs instead, so
the Python layers work everywhere. Shapes are documented in `fastllm.reference`.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import site
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.dlpack import to_dlpack

from fastllm import envs, reference

try:
    from fastllm import _C
except ImportError:  # source checkout without a build: the references run
    _C = None

# The KV block pool: C++ when built, else its pure-Python twin (same contract and ids).
BlockAllocator = _C.BlockAllocator if _C is not None else reference.BlockAllocator
_CUDA_OPS = frozenset(_C.build_info()["cuda_ops"]) if _C is not None else frozenset()
# The head dims the CUDA paged_attention is compiled for: C++'s one table (paged_attention.h).
PAGED_ATTENTION_HEAD_DIMS = tuple(_C.build_info()["paged_attention_head_dims"]) if _C is not None else ()


def native_available() -> bool:
    return _C is not None


def cuda_available() -> bool:
    """True when the extension has CUDA kernels and a GPU + driver can run them."""
    return _C is not None and _C.cuda_available()


def build_info() -> dict:
    """What was compiled: {'cuda': bool, 'cuda_archs': str, 'cuda_ops': [...], ...}."""
    return dict(_C.build_info()) if _C is not None else {"native": False}


def hash_block(parent_hash: int, token_ids) -> int:
    """Chained 64-bit hash of a full KV block: (parent block's hash, its token ids)."""
    if _C is not None:
        return _C.hash_block(parent_hash, list(token_ids))
    return hash((parent_hash, tuple(token_ids))) & 0xFFFFFFFFFFFFFFFF


def _native_for(op: str, tensor: torch.Tensor) -> bool:
    """Whether `_C` has a kernel of `op` for this tensor's device (CPU: all ops)."""
    if _C is None:
        return False
    if tensor.device.type == "cpu":
        return True
    return tensor.device.type == "cuda" and op in _CUDA_OPS


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _dl1(t: torch.Tensor):
    """One DLPack capsule; detach() (about a microsecond) only for a tensor that needs it
    (to_dlpack refuses tensors that require grad): the hot path's inference tensors don't."""
    return to_dlpack(t.detach() if t.requires_grad else t)


def _dl(*tensors):
    return [_dl1(t) for t in tensors]


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write key/value rows [T, Hkv, D] into the paged caches at slot_mapping [T]. key and
    value may be views of the fused qkv output (any token stride, [Hkv, D] contiguous)."""
    if _native_for("reshape_and_cache", key):
        _C.reshape_and_cache(*_dl(key, value, k_cache, v_cache, slot_mapping), _stream(key))
    else:
        reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def cuda_paged_attention_supports(head_dim: int) -> bool:
    """Whether this build has a CUDA paged_attention kernel for head_dim (else the torch
    reference runs on CUDA tensors, which reads sizes back to the host: no CUDA graphs)."""
    return "paged_attention" in _CUDA_OPS and head_dim in PAGED_ATTENTION_HEAD_DIMS


def torch_paged_attention_available() -> bool:
    """Whether this torch has paged varlen flash attention (block_table), on a CUDA build."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return torch.cuda.is_available() and "block_table" in inspect.signature(varlen_attn).parameters


@functools.cache
def _torch_paged_ok() -> bool:
    return torch_paged_attention_available()


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class AttentionPlan:
    """How one step's paged attention runs, decided once (plan_attention) and passed to
    every layer's paged_attention call.

    backend: "native" (fastllm._C: the CPU kernel, or the CUDA kernels `kernels` picked),
    "torch" (CUDA prefill on torch's paged flash attention, FASTLLM_PREFILL_BACKEND=torch)
    or "reference" (the torch reference: no _C, or no CUDA kernel for this head_dim)."""
    backend: str
    max_query_len: Optional[int] = None
    # _C.PagedAttentionPlan ("native"): the sizes it was made for and, on CUDA, prefill
    # kernel or not, the split count and the workspace bytes.
    kernels: Any = None
    workspace: Optional[torch.Tensor] = None  # float32 split-context partials (CUDA), or None


def plan_attention(*, num_tokens: int, num_seqs: int, max_blocks_per_seq: int, max_query_len: Optional[int],
                   num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                   device) -> AttentionPlan:
    """The plan of a step: T tokens of S sequences, block tables max_blocks_per_seq wide,
    the longest q_len known on the host (None: unknown), for layers of this shape, dtype
    and device. FASTLLM_PREFILL_BACKEND is read here, for the steps it could apply to
    (CUDA, fp16/bf16, max_query_len > 1; ValueError when it is not valid)."""
    device = torch.device(device)
    kind = device.type
    if (kind == "cuda" and max_query_len is not None and max_query_len > 1
            and dtype in (torch.float16, torch.bfloat16) and envs.FASTLLM_PREFILL_BACKEND == "torch"):
        if not _torch_paged_ok():
            raise RuntimeError(f"FASTLLM_PREFILL_BACKEND=torch needs torch.nn.attention.varlen.varlen_attn "
                               f"with block_table, which torch {torch.__version__} does not have")
        return AttentionPlan("torch", max_query_len)
    if _C is None or kind not in ("cpu", "cuda") or (kind == "cuda" and not cuda_paged_attention_supports(head_dim)):
        return AttentionPlan("reference", max_query_len)
    index = -1 if kind == "cpu" else (device.index if device.index is not None else torch.cuda.current_device())
    kernels = _C.plan_paged_attention(_DTYPE_NAMES.get(dtype, str(dtype)), num_tokens, num_seqs, num_heads,
                                      num_kv_heads, head_dim, block_size, max_blocks_per_seq,
                                      -1 if max_query_len is None else int(max_query_len), index)
    workspace = None
    if kernels.workspace_bytes:  # from torch's caching allocator (inside a capture: the graph's pool)
        workspace = torch.empty(kernels.workspace_bytes // 4, dtype=torch.float32, device=device)
    return AttentionPlan("native", max_query_len, kernels, workspace)


def _plan_call(query, k_cache, block_tables, max_query_len) -> AttentionPlan:
    """A plan for one call on its own (callers without a step's plan: tests, benches)."""
    return plan_attention(num_tokens=query.shape[0], num_seqs=block_tables.shape[0],
                          max_blocks_per_seq=block_tables.shape[1], max_query_len=max_query_len,
                          num_heads=query.shape[1], num_kv_heads=k_cache.shape[2], head_dim=query.shape[2],
                          block_size=k_cache.shape[1], dtype=query.dtype, device=query.device)


def torch_paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                          scale: float, max_query_len: int) -> None:
    """paged_attention's contract on torch's flash attention (fp16/bf16, CUDA): causal with
    the queries at the end of each sequence (flash-attention's bottom-right alignment)."""
    from torch.nn.attention.varlen import varlen_attn
    max_keys = block_tables.shape[1] * k_cache.shape[1]
    out.copy_(varlen_attn(query, k_cache, v_cache, query_start_loc, None, int(max_query_len), max_keys,
                          scale=float(scale), window_size=(-1, 0), enable_gqa=True,
                          seqused_k=seq_lens, block_table=block_tables))


def paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                    max_query_len: int | None = None, plan: AttentionPlan | None = None) -> None:
    """out[T, H, D] = causal attention of query[T, H, D] over each sequence's paged K/V.

    query may be a view with any token stride (the q part of the fused qkv output).
    plan: the step's plan (plan_attention), made once for every layer; without one, this
    call is planned alone from max_query_len, the longest q_len in the batch known on the
    host (1 runs the CUDA decode kernel alone, what CUDA graphs capture; > 1 sends
    sequences with q_len > 1 to the tensor-core prefill kernel; None means unknown)."""
    if plan is None:
        plan = _plan_call(query, k_cache, block_tables, max_query_len)
    if plan.backend == "torch":
        torch_paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                              scale, plan.max_query_len)
    elif plan.backend == "native":
        if not _dense_rows(query):
            query = query.contiguous()
        workspace = None if plan.workspace is None else to_dlpack(plan.workspace)
        _C.paged_attention(*_dl(out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc),
                           float(scale), plan.kernels, workspace, _stream(query))
    else:
        reference.paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens,
                                  query_start_loc, scale)


def _dense_rows(t: torch.Tensor) -> bool:
    """Whether each token's [heads, head_dim] is dense and starts 16-byte aligned."""
    heads, dim = t.shape[1], t.shape[2]
    return ((dim == 1 or t.stride(2) == 1) and (heads == 1 or t.stride(1) == dim)
            and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0)


def fused_softmax(out, scores, scale: float = 1.0, causal_offset: int | None = None,
                  row_scale: torch.Tensor | None = None) -> None:
    """out = softmax(scale * row_scale[r] * scores) over the last dim, causal if
    causal_offset is given (row r keeps columns <= r + causal_offset). row_scale: float32
    [num_rows] (num_rows = scores.numel() / scores.shape[-1]) on scores' device, or None.
    Sampling uses scale = 1 / temperature, or row_scale = 1 / temperature per row."""
    if _native_for("fused_softmax", scores):
        _C.fused_softmax(*_dl(out, scores), float(scale), causal_offset is not None,
                         int(causal_offset or 0),
                         None if row_scale is None else _dl1(row_scale),
                         _stream(scores))
    else:
        reference.fused_softmax(out, scores, scale, causal_offset, row_scale)


# -- fused decoder-layer ops: CUDA kernels and fp32 CPU kernels; other CPU dtypes run the --
# -- torch reference after the same argument checks (so a bad argument is named everywhere) --

def _run_fused(op: str, tensors: tuple, scalars: tuple = ()) -> None:
    """The kernel `op` on CUDA tensors and on float32 CPU tensors (one crossing into _C,
    which checks the arguments and runs); other CPU dtypes: the same checks (when _C is
    built), then the torch reference (HF's rounding points in fp16/bf16)."""
    first = tensors[0]
    if _C is not None:
        if first.is_cuda and op in _CUDA_OPS:
            getattr(_C, op)(*_dl(*tensors), *scalars, _stream(first))
            return
        if first.is_cpu and first.dtype == torch.float32:
            getattr(_C, op)(*_dl(*tensors), *scalars, 0)
            return
        getattr(_C, "check_" + op)(*_dl(*tensors))
    getattr(reference, op)(*tensors, *scalars)


def rms_norm(out, x, weight, eps: float) -> None:
    """out [T, hidden] = weight [hidden] * dtype(x * rsqrt(mean(x^2) + eps)) (LlamaRMSNorm)."""
    _run_fused("rms_norm", (out, x, weight), (float(eps),))


def fused_add_rms_norm(x, residual, weight, eps: float) -> None:
    """In place, x and residual [T, hidden]: residual += x, then x = rms_norm(residual)."""
    _run_fused("fused_add_rms_norm", (x, residual, weight), (float(eps),))


def silu_and_mul(out, x) -> None:
    """x [T, 2I] = [gate | up] -> out [T, I] = silu(gate) * up."""
    _run_fused("silu_and_mul", (out, x))


def rotary_embedding(query, key, cos, sin) -> None:
    """Rotate-half RoPE in place on query [T, H, D] and key [T, Hkv, D] (views of the
    fused qkv output are fine: any token stride); cos, sin [T, D/2] in their dtype."""
    _run_fused("rotary_embedding", (query, key, cos, sin))


# -- linear layers on GGUF-quantized weights -------------------------------------------------

_pool_threads = None


def _sync_cpu_threads() -> None:
    """Size the CPU kernels' pool to torch's intra-op thread count (one pool's worth of
    threads in all: torch's workers sleep while ours run and the reverse)."""
    global _pool_threads
    n = torch.get_num_threads()
    if n != _pool_threads:
        _C.set_cpu_num_threads(n)
        _pool_threads = n


def quant_block_shape(ggml_type: int) -> tuple:
    """(weights per block, bytes per block) of a ggml type; ValueError if unsupported."""
    if ggml_type not in reference.GGML_BLOCKS:
        raise ValueError(f"ggml_type {ggml_type} is not supported by quant_linear "
                         f"(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)")
    return reference.GGML_BLOCKS[ggml_type]


def quant_linear(x, weight, ggml_type: int, bias=None, out=None):
    """-> out [T, N] float32 = x [T, K] float32 @ W^T (+ bias [N] float32); W: uint8
    [N, row_bytes], a GGUF tensor's blocks as stored (row_bytes = K / block * block_bytes)."""
    if out is None:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    if _C is not None and x.is_cpu:  # the decode step's hot path: no stream, no op table
        if torch.get_num_threads() != _pool_threads:
            _sync_cpu_threads()
        _C.quant_linear(to_dlpack(out), _dl1(x), to_dlpack(weight), None if bias is None else _dl1(bias),
                        ggml_type, 0)
    elif _native_for("quant_linear", x):
        _C.quant_linear(to_dlpack(out), _dl1(x), to_dlpack(weight),
                        None if bias is None else _dl1(bias), int(ggml_type), _stream(x))
    else:
        quant_block_shape(ggml_type)
        reference.quant_linear(out, x, weight, ggml_type, bias)
    return out


def quant_dequantize(weight, ggml_type: int, in_features: int, use_native: bool = True, out=None):
    """uint8 blocks [N, row_bytes] -> float32 [N, in_features] (the CPU kernels' decoder;
    use_native=False, or no _C: the float64 reference, rounded). out: a contiguous float32
    [N, in_features] CPU tensor to write (and return) instead of a new one."""
    if out is None:
        out = torch.empty(weight.shape[0], in_features, dtype=torch.float32)
    if use_native and _C is not None and weight.is_cpu:
        if torch.get_num_threads() != _pool_threads:
            _sync_cpu_threads()
        _C.quant_dequantize(to_dlpack(out), to_dlpack(weight), int(ggml_type))
    else:
        quant_block_shape(ggml_type)
        out.copy_(reference.quant_dequantize(weight.cpu(), ggml_type, in_features))
    return out


def quant_cpu_isa() -> str:
    """Which build of the CPU quantized kernels runs here: 'avx2' or 'generic'."""
    return _C.quant_cpu_isa() if _C is not None else "reference"


def quant_cpu_force_generic(generic: bool) -> None:
    """Run the portable CPU kernels even on an AVX2 CPU (tests cover both builds)."""
    if _C is not None:
        _C.quant_cpu_force_generic(bool(generic))


def set_cpu_int8_activations(on: bool) -> None:
    """Whether the CPU kernels of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K weights (AVX2
    build; any number of tokens, each row alone) round x to int8 blocks first, as
    llama.cpp does (the default), or multiply the fp32 x exactly. Process-wide;
    reference.quantize_activations_q8 / _q8k are the rounding."""
    if _C is not None:
        _C.quant_cpu_set_int8_activations(bool(on))


# -- the CPU decoder: every decoder layer of a CPU step in one call (fastllm/cpu_decoder_op.h) --

def cpu_decoder_available() -> bool:
    """Whether this fastllm._C has the CPU decoder (an extension built before it has not)."""
    return _C is not None and hasattr(_C, "CpuDecoder")


class CpuDecoder:
    """The C++ decoder over a model's layer weights (fp32 activations, CPU tensors).

    layers: one (input_norm, post_norm, qkv, o, gate_up, down) per layer; norms float32
    [hidden]; each linear (segments, bias): segments [(ggml_type, uint8 [rows, row_bytes])]
    in output-row order (GGUF blocks, or F32/F16/BF16 rows as bytes), bias float32 [out] or
    None. Every tensor is checked here, once (ValueError naming the layer and tensor), and
    kept referenced: the C++ side holds raw pointers to them."""

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, eps: float, scale: float, layers: list):
        if not cpu_decoder_available():
            raise RuntimeError("CpuDecoder needs a fastllm._C built with it (rebuild the extension)")
        self._weights = [t for layer in layers for t in _layer_tensors(layer)]
        specs = [(_dl1(inorm), _dl1(pnorm), *(_linear_spec(lin) for lin in linears))
                 for inorm, pnorm, *linears in layers]
        self._op = _C.CpuDecoder(int(hidden_size), int(num_heads), int(num_kv_heads), int(head_dim),
                                 int(intermediate_size), float(eps), float(scale), specs)
        self._bound = ()   # weak references to the bound cache tensors (never kept alive here)

    @property
    def num_layers(self) -> int:
        return self._op.num_layers

    def forward(self, hidden, residual, has_residual: bool, cos, sin, kv_caches: list, slot_mapping,
                block_tables, seq_lens, query_start_loc) -> None:
        """In place: hidden [T, hidden] float32 (in: the embeddings or the previous layer's
        output; out: the last layer's MLP output), residual [T, hidden] (in when
        has_residual, else written; out: the residual stream); cos, sin [T, D/2];
        kv_caches one (k_cache, v_cache) per layer, rebound when they are other tensors than
        the last step's; the paged metadata as AttentionMetadata holds it."""
        if not self._same_caches(kv_caches):
            self._op.bind_kv_caches([(_dl1(k), _dl1(v)) for k, v in kv_caches])
            self._bound = tuple(weakref.ref(t) for pair in kv_caches for t in pair)
        if torch.get_num_threads() != _pool_threads:
            _sync_cpu_threads()
        self._op.forward(*_dl(hidden, residual), bool(has_residual),
                         *_dl(cos, sin, slot_mapping, block_tables, seq_lens, query_start_loc))

    def _same_caches(self, kv_caches: list) -> bool:
        bound = self._bound
        if len(bound) != 2 * len(kv_caches):
            return False
        for i, (k, v) in enumerate(kv_caches):
            if bound[2 * i]() is not k or bound[2 * i + 1]() is not v:
                return False
        return True


def _layer_tensors(layer) -> list:
    input_norm, post_norm, *linears = layer
    tensors = [input_norm, post_norm]
    for segments, bias in linears:
        tensors += [w for _, w in segments] + ([] if bias is None else [bias])
    return tensors


def _linear_spec(linear) -> tuple:
    segments, bias = linear
    return [(_dl1(w), int(t)) for t, w in segments], None if bias is None else _dl1(bias)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Structured outputs, in place: logits[rows[i], t] = -inf unless token t is allowed by
    bitmask row i (bit t % 32 of word t // 32). logits [S, V] float32/16/bf16; bitmask
    [R, ceil(V/32)] int32; rows [R] int64 (distinct). Only the R rows are touched.
    CPU and CUDA run xgrammar's kernels (over a batch-sized mask: on CPU only the R rows are
    visited, on CUDA the other rows allow everything); fastllm.reference.apply_token_bitmask is the twin
    they are tested against, and runs where xgrammar is missing or refuses the input."""
    if logits.dim() != 2 or bitmask.dim() != 2 or rows.dim() != 1 or bitmask.shape[0] != rows.shape[0]:
        raise ValueError(f"apply_token_bitmask: logits [S, V], bitmask [R, W] and rows [R] expected, "
                         f"got {tuple(logits.shape)}, {tuple(bitmask.shape)}, {tuple(rows.shape)}")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"apply_token_bitmask: bitmask must be int32, got {bitmask.dtype}")
    if rows.numel() == 0:
        return
    kernel = _xgrammar_bitmask_kernel()
    device = logits.device.type
    if kernel is not None and bitmask.shape[1] * 32 >= logits.shape[1] and device not in _XGRAMMAR_FAILED:
        try:
            _xgrammar_apply(kernel, logits, bitmask, rows)
            return
        except Exception as e:  # noqa: BLE001 -- e.g. its CUDA kernel cannot be built here
            # A failure is its argument checks or its kernel build, before any write.
            _XGRAMMAR_FAILED.add(device)
            logging.getLogger(__name__).warning(
                "xgrammar's token-bitmask kernel failed on %s (%s); using the torch one", device, e)
    reference.apply_token_bitmask(logits, bitmask, rows)


# Device types where xgrammar's kernel failed once: the torch twin runs there from then on.
_XGRAMMAR_FAILED: set = set()


@functools.lru_cache(maxsize=1)
def _xgrammar_bitmask_kernel():
    try:
        import xgrammar
    except ImportError:
        return None
    return xgrammar.apply_token_bitmask_inplace


def _xgrammar_apply(kernel, logits, bitmask, rows) -> None:
    vocab_size = logits.shape[1]
    if logits.device.type == "cpu":
        # Its CPU loop reads mask row r for logits row r, over the indices given: scatter the
        # R mask rows into a batch-sized mask (a few KB per row, not the logits' MBs).
        if rows.numel() == logits.shape[0] and torch.equal(rows, torch.arange(rows.numel())):
            kernel(logits, bitmask, vocab_size=vocab_size, backend="cpu")
            return
        full = torch.empty((logits.shape[0], bitmask.shape[1]), dtype=torch.int32)
        full.index_copy_(0, rows, bitmask)
        kernel(logits, full, vocab_size=vocab_size, indices=rows.tolist(), backend="cpu")
        return
    # CUDA: a full-batch mask whose other rows allow everything (-1), so no host list of
    # indices (a device -> host read) is needed.
    full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32, device=logits.device)
    full.index_copy_(0, rows.to(logits.device), bitmask.to(logits.device, non_blocking=True))
    kernel(logits, full, vocab_size=vocab_size)


# -- NCCL (fastllm/nccl.h): libnccl opened at run time, ops on the tensor's current stream -----

def nccl_library_candidates() -> list:
    """Where libnccl is looked for, in order: $FASTLLM_NCCL_SO alone when set (a wrong path is
    an error, never silently replaced); else the libnccl.so.2 of torch's CUDA wheels
    (site-packages/nvidia/nccl/lib: torch's own site-packages first, listed even when absent
    so an error names it, then any other sys.path or site directory that has one), then
    libnccl.so.2 on the loader's search path."""
    if envs.FASTLLM_NCCL_SO:
        return [envs.FASTLLM_NCCL_SO]
    wheel_lib = os.path.join("nvidia", "nccl", "lib", "libnccl.so.2")
    torch_site = os.path.dirname(os.path.dirname(os.path.realpath(torch.__file__)))
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:                    # some virtualenv layouts lack these
        pass
    found = [os.path.join(r, wheel_lib) for r in roots if r and os.path.isfile(os.path.join(r, wheel_lib))]
    return list(dict.fromkeys([os.path.join(torch_site, wheel_lib), *found, "libnccl.so.2"]))


@functools.cache
def _nccl_library(candidates: tuple):
    return _C.NcclLibrary.open(list(candidates))   # failures raise, and are not cached


def nccl_library():
    """The loaded libnccl (path, version); RuntimeError naming every path tried."""
    if _C is None:
        raise RuntimeError("NCCL needs fastllm._C, which is not built in this installation")
    return _nccl_library(tuple(nccl_library_candidates()))


def nccl_unique_id() -> bytes:
    """A new ncclUniqueId (128 bytes): made by one rank, given to every rank of the group."""
    return nccl_library().unique_id()


def nccl_comm_init(unique_id: bytes, world_size: int, rank: int, device: torch.device):
    """This rank's NCCL communicator on `device` (collective: blocks until every rank joins)."""
    device = torch.device(device)
    with torch.cuda.device(device):         # ncclCommInitRank binds to the current device
        return _C.NcclCommunicator(nccl_library(), unique_id, world_size, rank, device.index)


def nccl_all_reduce(comm, x: torch.Tensor) -> None:
    comm.all_reduce(to_dlpack(x.detach()), _stream(x))


def nccl_all_gather(comm, out: torch.Tensor, x: torch.Tensor) -> None:
    """out (world_size * x.numel() elements) <- every rank's x, rank order."""
    comm.all_gather(to_dlpack(out.detach()), to_dlpack(x.detach()), _stream(x))


def nccl_broadcast(comm, x: torch.Tensor, src: int) -> None:
    comm.broadcast(to_dlpack(x.detach()), int(src), _stream(x))


def nccl_send(comm, x: torch.Tensor, dst: int) -> None:
    comm.send(to_dlpack(x.detach()), int(dst), _stream(x))


def nccl_recv(comm, x: torch.Tensor, src: int) -> None:
    comm.recv(to_dlpack(x.detach()), int(src), _stream(x))


def nccl_close(comm, abort: bool = False) -> None:
    """ncclCommDestroy, or ncclCommAbort when a peer died (abort never waits on peers)."""
    if abort:
        comm.abort()
    else:
        comm.destroy()
