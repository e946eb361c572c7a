// fastllm._C: the only pybind11 code. Tensors arrive as DLPack capsules ("dltensor",
// not consumed: the Python caller keeps the torch tensor alive for the call).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <iterator>
#include <optional>

#include "fastllm/block_allocator.h"
#include "fastllm/cpu_decoder_op.h"
#include "fastllm/errors.h"
#include "fastllm/nccl.h"
#include "fastllm/ops.h"
#include "fastllm/quant_ops.h"
#include "fastllm/tensor_view.h"

namespace py = pybind11;
using fastllm::TensorView;

static TensorView view(const py::capsule& capsule, const char* name) {
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    throw fastllm::ArgTypeError(std::string(name) + ": expected an unconsumed DLPack capsule ('dltensor')");
  }
  return TensorView::from_dlpack(managed->dl_tensor, name);
}

// Linear layers on GGUF-quantized weights (fastllm/quant_ops.h) and the CPU kernels' pool.
static void def_quant_ops(py::module_& m) {
  m.def("quant_linear", [](py::capsule out, py::capsule x, py::capsule weight, py::object bias, int ggml_type,
                           int64_t stream) {
    auto o = view(out, "out"), xv = view(x, "x"), w = view(weight, "weight");
    std::optional<TensorView> b;
    if (!bias.is_none()) b = view(bias.cast<py::capsule>(), "bias");
    py::gil_scoped_release release;
    fastllm::quant_linear(o, xv, w, b ? &*b : nullptr, ggml_type, stream);
  });
  m.def("quant_dequantize", [](py::capsule out, py::capsule weight, int ggml_type) {
    auto o = view(out, "out"), w = view(weight, "weight");
    py::gil_scoped_release release;
    fastllm::quant_dequantize(o, w, ggml_type);
  });
  m.def("quant_block_shape", &fastllm::quant_block_shape, py::arg("ggml_type"),
        "(block_elems, block_bytes) of a ggml type the quantized kernels handle");
  m.def("quant_cpu_isa", &fastllm::quant_cpu_isa, "the CPU quantized kernels' build: 'avx2' or 'generic'");
  m.def("quant_cpu_force_generic", &fastllm::quant_cpu_force_generic, py::arg("generic"));
  m.def("quant_cpu_set_int8_activations", &fastllm::quant_cpu_set_int8_activations, py::arg("on"));
  m.def("cpu_num_threads", &fastllm::cpu_num_threads);
  m.def("set_cpu_num_threads", &fastllm::set_cpu_num_threads, py::arg("n"));
}

// The CPU decoder (fastllm/cpu_decoder_op.h). A linear arrives as ([(weight, ggml_type)],
// bias or None), a layer as (input_norm, post_norm, qkv, o, gate_up, down): capsules
// whose tensors the Python wrapper keeps alive as long as the decoder.
// Every bad tensor, a dtype from_dlpack cannot read included, is a ValueError here.
static TensorView decoder_view(const py::handle& capsule, const std::string& name) {
  try {
    return view(capsule.cast<py::capsule>(), name.c_str());
  } catch (const fastllm::ArgTypeError& e) {
    throw fastllm::ArgValueError(e.what());
  }
}

static fastllm::LinearTensors linear_tensors(const py::handle& spec_obj, const std::string& name) {
  const auto spec = spec_obj.cast<py::tuple>();
  fastllm::LinearTensors t;
  for (const auto& item : spec[0].cast<py::list>()) {
    const auto segment = item.cast<py::tuple>();
    t.segments.emplace_back(decoder_view(segment[0], name + ".segment" + std::to_string(t.segments.size())),
                            segment[1].cast<int>());
  }
  if (!spec[1].is_none()) t.bias = decoder_view(spec[1], name + ".bias");
  return t;
}

// Layer i as (input_norm, post_norm, qkv, o, gate_up, down), named as the model names them.
static fastllm::DecoderLayerTensors layer_tensors(const py::handle& spec_obj, size_t i) {
  const auto l = spec_obj.cast<py::tuple>();
  const std::string p = "layers." + std::to_string(i) + ".";
  return {decoder_view(l[0], p + "input_layernorm.weight"), decoder_view(l[1], p + "post_attention_layernorm.weight"),
          linear_tensors(l[2], p + "self_attn.qkv_proj"), linear_tensors(l[3], p + "self_attn.o_proj"),
          linear_tensors(l[4], p + "mlp.gate_up_proj"), linear_tensors(l[5], p + "mlp.down_proj")};
}

static void def_cpu_decoder(py::module_& m) {
  using Op = fastllm::CpuDecoderOp;
  py::class_<Op>(m, "CpuDecoder", "every decoder layer of a CPU step in one call (fp32 activations)")
      .def(py::init([](int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t intermediate, float eps, float scale, const py::list& layers) {
             const fastllm::cpu::DecoderShape shape{hidden, num_heads, num_kv_heads, head_dim, intermediate, eps,
                                                   scale};
             std::vector<fastllm::DecoderLayerTensors> tensors;
             for (const auto& item : layers) tensors.push_back(layer_tensors(item, tensors.size()));
             return std::make_unique<Op>(shape, tensors);
           }),
           py::arg("hidden_size"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("intermediate_size"), py::arg("eps"), py::arg("scale"), py::arg("layers"))
      .def_property_readonly("num_layers", &Op::num_layers)
      .def("bind_kv_caches", [](Op& op, const py::list& caches) {
        std::vector<std::pair<TensorView, TensorView>> views;
        for (const auto& item : caches) {
          const auto pair = item.cast<py::tuple>();
          const std::string name = "kv_caches[" + std::to_string(views.size()) + "].";
          views.emplace_back(decoder_view(pair[0], name + "k_cache"), decoder_view(pair[1], name + "v_cache"));
        }
        op.bind_kv_caches(views);
      }, py::arg("kv_caches"))
      .def("forward", [](Op& op, py::capsule hidden, py::capsule residual, bool has_residual, py::capsule cos,
                         py::capsule sin, py::capsule slot_mapping, py::capsule block_tables, py::capsule seq_lens,
                         py::capsule query_start_loc) {
        const fastllm::DecoderStepTensors step{
            decoder_view(hidden, "hidden"), decoder_view(residual, "residual"), decoder_view(cos, "cos"),
            decoder_view(sin, "sin"), decoder_view(slot_mapping, "slot_mapping"),
            decoder_view(block_tables, "block_tables"), decoder_view(seq_lens, "seq_lens"),
            decoder_view(query_start_loc, "query_start_loc"), has_residual};
        py::gil_scoped_release release;
        op.forward(step);
      });
}

// The NCCL communicator (fastllm/nccl.h). Every call that can block on peers or enqueue
// releases the GIL: ncclCommInitRank waits for every rank to join.
static void def_nccl(py::module_& m) {
  py::class_<fastllm::NcclLibrary, std::shared_ptr<fastllm::NcclLibrary>>(m, "NcclLibrary",
                                                                          "libnccl opened at run time")
      .def_static("open", &fastllm::NcclLibrary::open, py::arg("candidates"),
                  "the first candidate path that is an NCCL library; RuntimeError naming every path tried")
      .def_property_readonly("path", &fastllm::NcclLibrary::path)
      .def_property_readonly("version", &fastllm::NcclLibrary::version)
      .def("unique_id", [](const fastllm::NcclLibrary& lib) { return py::bytes(lib.unique_id()); });
  using Comm = fastllm::NcclCommunicator;
  py::class_<Comm>(m, "NcclCommunicator", "one rank's ncclComm_t; ops enqueue on `stream` and never sync")
      .def(py::init([](std::shared_ptr<fastllm::NcclLibrary> lib, py::bytes unique_id, int world_size, int rank,
                       int device) {
             std::string id = unique_id;
             py::gil_scoped_release release;
             return std::make_unique<Comm>(std::move(lib), id, world_size, rank, device);
           }),
           py::arg("library"), py::arg("unique_id"), py::arg("world_size"), py::arg("rank"), py::arg("device"))
      .def_property_readonly("rank", &Comm::rank)
      .def_property_readonly("world_size", &Comm::world_size)
      .def_property_readonly("device", &Comm::device)
      .def("all_reduce", [](Comm& c, py::capsule x, int64_t stream) {
        auto v = view(x, "x");
        py::gil_scoped_release release;
        c.all_reduce(v, stream);
      }, py::arg("x"), py::arg("stream"))
      .def("all_gather", [](Comm& c, py::capsule out, py::capsule x, int64_t stream) {
        auto o = view(out, "out"), v = view(x, "x");
        py::gil_scoped_release release;
        c.all_gather(o, v, stream);
      }, py::arg("out"), py::arg("x"), py::arg("stream"))
      .def("broadcast", [](Comm& c, py::capsule x, int root, int64_t stream) {
        auto v = view(x, "x");
        py::gil_scoped_release release;
        c.broadcast(v, root, stream);
      }, py::arg("x"), py::arg("root"), py::arg("stream"))
      .def("send", [](Comm& c, py::capsule x, int peer, int64_t stream) {
        auto v = view(x, "x");
        py::gil_scoped_release release;
        c.send(v, peer, stream);
      }, py::arg("x"), py::arg("peer"), py::arg("stream"))
      .def("recv", [](Comm& c, py::capsule x, int peer, int64_t stream) {
        auto v = view(x, "x");
        py::gil_scoped_release release;
        c.recv(v, peer, stream);
      }, py::arg("x"), py::arg("peer"), py::arg("stream"))
      .def("destroy", [](Comm& c) {
        py::gil_scoped_release release;
        c.destroy();
      })
      .def("abort", [](Comm& c) {
        py::gil_scoped_release release;
        c.abort();
      });
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm native core: KV block allocator and CPU/CUDA kernels (DLPack in)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastllm::ArgTypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const fastllm::ArgValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("cuda_available", &fastllm::cuda_available, "True when CUDA kernels are built and a GPU can run them");
  m.def("build_info", [] {
    py::dict info;
    info["native"] = true;
    info["cuda"] = fastllm::cuda_compiled();
    info["cuda_archs"] = fastllm::cuda_archs();
    info["cuda_ops"] = fastllm::cuda_ops();
    // The head dims the CUDA paged_attention is compiled for (the C++ table; fastllm.ops reads it here).
    info["paged_attention_head_dims"] = std::vector<int>(std::begin(fastllm::kPagedAttentionHeadDims),
                                                         std::end(fastllm::kPagedAttentionHeadDims));
    return info;
  });
  m.def("hash_block", [](uint64_t parent_hash, const std::vector<int64_t>& token_ids) {
    return fastllm::hash_block(parent_hash, token_ids.data(), token_ids.size());
  }, py::arg("parent_hash"), py::arg("token_ids"));

  // Ops release the GIL: the CPU kernels are multithreaded and CUDA launches are async.
  m.def("reshape_and_cache", [](py::capsule key, py::capsule value, py::capsule k_cache, py::capsule v_cache,
                                py::capsule slot_mapping, int64_t stream) {
    auto k = view(key, "key"), v = view(value, "value"), kc = view(k_cache, "k_cache"),
         vc = view(v_cache, "v_cache"), sm = view(slot_mapping, "slot_mapping");
    py::gil_scoped_release release;
    fastllm::reshape_and_cache(k, v, kc, vc, sm, stream);
  });
  py::class_<fastllm::PagedAttentionPlan>(m, "PagedAttentionPlan",
                                          "How one step's paged attention runs (plan_paged_attention)")
      .def_property_readonly("num_tokens", [](const fastllm::PagedAttentionPlan& p) { return p.shape.num_tokens; })
      .def_property_readonly("num_seqs", [](const fastllm::PagedAttentionPlan& p) { return p.shape.num_seqs; })
      .def_property_readonly("max_blocks_per_seq",
                             [](const fastllm::PagedAttentionPlan& p) { return p.shape.max_blocks_per_seq; })
      .def_readonly("device", &fastllm::PagedAttentionPlan::device)
      .def_readonly("prefill_kernel", &fastllm::PagedAttentionPlan::prefill_kernel)
      .def_readonly("num_splits", &fastllm::PagedAttentionPlan::num_splits)
      .def_readonly("keys_per_split", &fastllm::PagedAttentionPlan::keys_per_split)
      .def_readonly("workspace_bytes", &fastllm::PagedAttentionPlan::workspace_bytes)
      .def("__repr__", [](const fastllm::PagedAttentionPlan& p) { return "PagedAttentionPlan(" + fastllm::describe(p) + ")"; });
  m.def("plan_paged_attention", [](const std::string& dtype, int64_t num_tokens, int64_t num_seqs, int64_t num_heads,
                                   int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                   int64_t max_blocks_per_seq, int64_t max_query_len, int device) {
    const fastllm::PagedAttentionShape shape{num_tokens, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                             max_blocks_per_seq};
    return fastllm::plan_paged_attention(fastllm::float_dtype_from_name(dtype), shape, max_query_len, device);
  }, py::arg("dtype"), py::arg("num_tokens"), py::arg("num_seqs"), py::arg("num_heads"), py::arg("num_kv_heads"),
     py::arg("head_dim"), py::arg("block_size"), py::arg("max_blocks_per_seq"), py::arg("max_query_len"),
     py::arg("device"), "the step's plan; device -1 for CPU tensors, max_query_len -1 when unknown");
  m.def("paged_attention", [](py::capsule out, py::capsule query, py::capsule k_cache, py::capsule v_cache,
                              py::capsule block_tables, py::capsule seq_lens, py::capsule query_start_loc,
                              float scale, const fastllm::PagedAttentionPlan* plan, py::object workspace,
                              int64_t stream) {
    auto o = view(out, "out"), q = view(query, "query"), kc = view(k_cache, "k_cache"),
         vc = view(v_cache, "v_cache"), bt = view(block_tables, "block_tables"), sl = view(seq_lens, "seq_lens"),
         qsl = view(query_start_loc, "query_start_loc");
    std::optional<TensorView> ws;
    if (!workspace.is_none()) ws = view(workspace.cast<py::capsule>(), "workspace");
    py::gil_scoped_release release;
    fastllm::paged_attention(o, q, kc, vc, bt, sl, qsl, scale, plan, ws ? &*ws : nullptr, stream);
  }, py::arg("out"), py::arg("query"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
     py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("scale"), py::arg("plan").none(true),
     py::arg("workspace").none(true), py::arg("stream"));
  m.def("fused_softmax", [](py::capsule out, py::capsule scores, float scale, bool causal, int64_t causal_offset,
                            py::object row_scale, int64_t stream) {
    auto o = view(out, "out"), s = view(scores, "scores");
    std::optional<TensorView> rs;
    if (!row_scale.is_none()) rs = view(row_scale.cast<py::capsule>(), "row_scale");
    py::gil_scoped_release release;
    fastllm::fused_softmax(o, s, scale, causal, causal_offset, rs ? &*rs : nullptr, stream);
  });

  // Fused decoder-layer ops: CUDA kernels; check_<op> runs the same argument validation
  // alone, for the CPU tensors that fastllm.ops hands to the torch reference.
  m.def("rms_norm", [](py::capsule out, py::capsule x, py::capsule weight, float eps, int64_t stream) {
    auto o = view(out, "out"), xv = view(x, "x"), w = view(weight, "weight");
    py::gil_scoped_release release;
    fastllm::rms_norm(o, xv, w, eps, stream);
  });
  m.def("check_rms_norm", [](py::capsule out, py::capsule x, py::capsule weight) {
    fastllm::check_rms_norm(view(out, "out"), view(x, "x"), view(weight, "weight"));
  });
  m.def("fused_add_rms_norm", [](py::capsule x, py::capsule residual, py::capsule weight, float eps, int64_t stream) {
    auto xv = view(x, "x"), r = view(residual, "residual"), w = view(weight, "weight");
    py::gil_scoped_release release;
    fastllm::fused_add_rms_norm(xv, r, w, eps, stream);
  });
  m.def("check_fused_add_rms_norm", [](py::capsule x, py::capsule residual, py::capsule weight) {
    fastllm::check_fused_add_rms_norm(view(x, "x"), view(residual, "residual"), view(weight, "weight"));
  });
  m.def("silu_and_mul", [](py::capsule out, py::capsule x, int64_t stream) {
    auto o = view(out, "out"), xv = view(x, "x");
    py::gil_scoped_release release;
    fastllm::silu_and_mul(o, xv, stream);
  });
  m.def("check_silu_and_mul", [](py::capsule out, py::capsule x) {
    fastllm::check_silu_and_mul(view(out, "out"), view(x, "x"));
  });
  m.def("rotary_embedding", [](py::capsule query, py::capsule key, py::capsule cos, py::capsule sin, int64_t stream) {
    auto q = view(query, "query"), k = view(key, "key"), c = view(cos, "cos"), s = view(sin, "sin");
    py::gil_scoped_release release;
    fastllm::rotary_embedding(q, k, c, s, stream);
  });
  m.def("check_rotary_embedding", [](py::capsule query, py::capsule key, py::capsule cos, py::capsule sin) {
    fastllm::check_rotary_embedding(view(query, "query"), view(key, "key"), view(cos, "cos"), view(sin, "sin"));
  });

  def_quant_ops(m);
  def_cpu_decoder(m);
  def_nccl(m);

  py::class_<fastllm::BlockAllocator>(m, "BlockAllocator", "Fixed pool of KV blocks with a prefix cache (LRU)")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def("allocate", &fastllm::BlockAllocator::allocate)
      .def("free", &fastllm::BlockAllocator::free, py::arg("block_id"))
      .def("share", &fastllm::BlockAllocator::share, py::arg("block_id"))
      .def("lookup", &fastllm::BlockAllocator::lookup, py::arg("block_hash"))
      .def("register", &fastllm::BlockAllocator::register_block, py::arg("block_id"), py::arg("block_hash"))
      .def("reset_prefix_cache", &fastllm::BlockAllocator::reset_prefix_cache)
      .def("ref_count", &fastllm::BlockAllocator::ref_count, py::arg("block_id"))
      .def("block_hash", &fastllm::BlockAllocator::block_hash, py::arg("block_id"))
      .def_property_readonly("num_blocks", [](const fastllm::BlockAllocator& a) { return a.stats().num_blocks; })
      .def_property_readonly("num_free", [](const fastllm::BlockAllocator& a) { return a.stats().num_free; })
      .def_property_readonly("num_in_use", [](const fastllm::BlockAllocator& a) { return a.stats().num_in_use; })
      .def_property_readonly("num_cached", [](const fastllm::BlockAllocator& a) { return a.stats().num_cached; })
      .def_property_readonly("hits", [](const fastllm::BlockAllocator& a) { return a.stats().hits; })
      .def_property_readonly("queries", [](const fastllm::BlockAllocator& a) { return a.stats().queries; })
      .def_property_readonly("evictions", [](const fastllm::BlockAllocator& a) { return a.stats().evictions; });
}
