// CUDA kernels vs the device's copy bandwidth, timed with CUDA events (manual time).
// Decode paged attention reads K and V once: bytes = 2 * seqs * ctx * Hkv * D * 2.
// Fused elementwise ops: every input read once, every output written once.
#include <benchmark/benchmark.h>
#include <cuda_bf16.h>

#include <numeric>
#include <vector>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/testing.h"

namespace {

struct Timer {
  cudaEvent_t start, stop;
  Timer() { cudaEventCreate(&start); cudaEventCreate(&stop); }
  ~Timer() { cudaEventDestroy(start); cudaEventDestroy(stop); }
  template <typename Fn> double seconds(Fn&& fn) {
    cudaEventRecord(start);
    fn();
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, start, stop);
    return ms / 1e3;
  }
};

void BM_DeviceCopy(benchmark::State& state) {
  if (fastllm::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const size_t bytes = size_t(1) << 30;
  void *a, *b;
  cudaMalloc(&a, bytes);
  cudaMalloc(&b, bytes);
  Timer timer;
  for (auto _ : state) state.SetIterationTime(timer.seconds([&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice); }));
  state.SetBytesProcessed(state.iterations() * 2 * bytes);  // read + write
  cudaFree(a);
  cudaFree(b);
}
BENCHMARK(BM_DeviceCopy)->UseManualTime()->Unit(benchmark::kMicrosecond);

// args: num_seqs, context length (keys per sequence), queries per sequence (1 = decode,
// > 1 = prefill/extend of the last q_len positions on the tensor-core kernel), lds (1:
// the prefill kernel's test-only plain shared-load variant instead of ldmatrix).
// Llama-3-8B shape: 32 q heads, 8 kv heads, head_dim 128, bf16, block 16.
void BM_PagedAttention(benchmark::State& state) {
  if (fastllm::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const int S = state.range(0), ctx = state.range(1), q_len = state.range(2), H = 32, Hkv = 8, D = 128, BS = 16;
  const bool lds = state.range(3) != 0;
  const int T = S * q_len;
  const int blocks_per_seq = (ctx + BS - 1) / BS, num_blocks = S * blocks_per_seq;
  const size_t cache_elems = size_t(num_blocks) * BS * Hkv * D;
  __nv_bfloat16 *q, *out, *kc, *vc;
  int32_t *tables, *lens, *qsl;
  cudaMalloc(&q, size_t(T) * H * D * 2);
  cudaMalloc(&out, size_t(T) * H * D * 2);
  cudaMalloc(&kc, cache_elems * 2);
  cudaMalloc(&vc, cache_elems * 2);
  cudaMemset(q, 0, size_t(T) * H * D * 2);
  cudaMemset(kc, 0, cache_elems * 2);
  cudaMemset(vc, 0, cache_elems * 2);
  std::vector<int32_t> h_tables(num_blocks), h_lens(S, ctx), h_qsl(S + 1);
  std::iota(h_tables.begin(), h_tables.end(), 0);
  for (int s = 0; s <= S; ++s) h_qsl[s] = s * q_len;
  cudaMalloc(&tables, num_blocks * 4);
  cudaMalloc(&lens, S * 4);
  cudaMalloc(&qsl, (S + 1) * 4);
  cudaMemcpy(tables, h_tables.data(), num_blocks * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(lens, h_lens.data(), S * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(qsl, h_qsl.data(), (S + 1) * 4, cudaMemcpyHostToDevice);
  fastllm::cuda::PagedAttentionParams params;
  params.dtype = fastllm::DType::kBF16;
  params.shape = {T, S, H, Hkv, D, BS, blocks_per_seq};
  params.out = out;
  params.query = q;
  params.q_token_stride = int64_t(H) * D;
  params.k_cache = kc;
  params.v_cache = vc;
  params.block_tables = tables;
  params.seq_lens = lens;
  params.query_start_loc = qsl;
  params.scale = 0.0884f;
  params.plan = fastllm::cuda::plan_paged_attention(params.dtype, params.shape, q_len);  // once, as a step does
  if (params.plan.workspace_bytes) cudaMalloc(&params.workspace, params.plan.workspace_bytes);
  Timer timer;
  for (auto _ : state) {
    state.SetIterationTime(timer.seconds([&] {
      lds ? fastllm::cuda::testing::paged_attention_lds(params, nullptr) : fastllm::cuda::paged_attention(params, nullptr);
    }));
  }
  cudaFree(params.workspace);
  if (q_len == 1) {
    state.SetBytesProcessed(state.iterations() * 2 * cache_elems * 2);
  } else {  // causal pairs of the last q_len positions, two matmuls of 2 * D FLOPs each
    const double pairs = double(S) * (double(q_len) * (ctx - q_len) + double(q_len) * (q_len + 1) / 2);
    state.counters["TFLOPs"] = benchmark::Counter(pairs * H * 4 * D * state.iterations() / 1e12,
                                                  benchmark::Counter::kIsRate);
  }
  for (void* p : {(void*)q, (void*)out, (void*)kc, (void*)vc, (void*)tables, (void*)lens, (void*)qsl}) cudaFree(p);
}
BENCHMARK(BM_PagedAttention)
    ->ArgNames({"seqs", "ctx", "q_len", "lds"})
    ->Args({64, 4096, 1, 0})->Args({1, 32768, 1, 0})->Args({1, 4096, 1, 0})
    ->Args({1, 4096, 4096, 0})->Args({8, 2048, 2048, 0})->Args({4, 8192, 512, 0})
    ->Args({1, 4096, 4096, 1})->Args({8, 2048, 2048, 1})->Args({4, 8192, 512, 1})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

// args: rows, cols (attention scores 4096x4096; a 128k vocabulary)
void BM_FusedSoftmax(benchmark::State& state) {
  if (fastllm::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const int64_t rows = state.range(0), cols = state.range(1);
  __nv_bfloat16 *x, *y;
  cudaMalloc(&x, rows * cols * 2);
  cudaMalloc(&y, rows * cols * 2);
  cudaMemset(x, 0, rows * cols * 2);
  Timer timer;
  for (auto _ : state) {
    state.SetIterationTime(timer.seconds([&] {
      fastllm::cuda::fused_softmax(fastllm::cuda::ScalarType::kBF16, y, x, nullptr, rows, cols, rows, 0.088f, true, 0, nullptr);
    }));
  }
  state.SetBytesProcessed(state.iterations() * 2 * rows * cols * 2);
  cudaFree(x);
  cudaFree(y);
}
BENCHMARK(BM_FusedSoftmax)->Args({32 * 1024, 1024})->Args({4096, 4096})->Args({64, 128256})->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// Sampling: float32 logits [rows, vocab], a different temperature per row (row_scale =
// 1 / temperature), no mask. args: rows, vocab.
void BM_FusedSoftmaxRowTemperature(benchmark::State& state) {
  if (fastllm::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const int64_t rows = state.range(0), cols = state.range(1);
  float *x, *y, *row_scale;
  cudaMalloc(&x, rows * cols * 4);
  cudaMalloc(&y, rows * cols * 4);
  cudaMalloc(&row_scale, rows * 4);
  cudaMemset(x, 0, rows * cols * 4);
  std::vector<float> h_scale(rows);
  for (int64_t r = 0; r < rows; ++r) h_scale[r] = 1.f / (0.5f + 0.01f * static_cast<float>(r % 100));
  cudaMemcpy(row_scale, h_scale.data(), rows * 4, cudaMemcpyHostToDevice);
  Timer timer;
  for (auto _ : state) {
    state.SetIterationTime(timer.seconds([&] {
      fastllm::cuda::fused_softmax(fastllm::cuda::ScalarType::kF32, y, x, row_scale, rows, cols, rows, 1.f, false, 0,
                                   nullptr);
    }));
  }
  state.SetBytesProcessed(state.iterations() * 2 * rows * cols * 4);
  for (void* p : {(void*)x, (void*)y, (void*)row_scale}) cudaFree(p);
}
BENCHMARK(BM_FusedSoftmaxRowTemperature)->Args({256, 128256})->Args({4, 128256})->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// args: num_tokens; Llama-3-8B hidden 4096, bf16. Bytes: x in, out out, weight in.
void BM_RmsNorm(benchmark::State& state) {
  if (fastllm::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const int64_t T = state.range(0), hidden = 4096;
  __nv_bfloat16 *x, *out, *weight;
  cudaMalloc(&x, T * hidden * 2);
  cudaMalloc(&out, T * hidden * 2);
  cudaMalloc(&weight, hidden * 2);
  cudaMemset(x, 0, T * hidden * 2);
  cudaMemset(weight, 0, hidden * 2);
  Timer timer;
  for (auto _ : state) {
    state.SetIterationTime(timer.seconds([&] {
      fastllm::cuda::rms_norm(fastllm::cuda::ScalarType::kBF16, out, x, weight, T, hidden, 1e-5f, nullptr);
    }));
  }
  state.SetBytesProcessed(state.iterations() * (2 * T * hidden + hidden) * 2);
  for (void* p : {(void*)x, (void*)out, (void*)weight}) cudaFree(p);
}
BENCHMARK(BM_RmsNorm)->Arg(1)->Arg(64)->Arg(4096)->UseManualTime()->Unit(benchmark::kMicrosecond);

// args: num_tokens; Llama-3-8B intermediate 14336, bf16. Bytes: [T, 2I] in, [T, I] out.
void BM_SiluAndMul(benchmark::State& state) {
  if (fastllm::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const int64_t T = state.range(0), inter = 14336;
  __nv_bfloat16 *x, *out;
  cudaMalloc(&x, T * 2 * inter * 2);
  cudaMalloc(&out, T * inter * 2);
  cudaMemset(x, 0, T * 2 * inter * 2);
  Timer timer;
  for (auto _ : state) {
    state.SetIterationTime(timer.seconds([&] {
      fastllm::cuda::silu_and_mul(fastllm::cuda::ScalarType::kBF16, out, x, T, inter, nullptr);
    }));
  }
  state.SetBytesProcessed(state.iterations() * 3 * T * inter * 2);
  cudaFree(x);
  cudaFree(out);
}
BENCHMARK(BM_SiluAndMul)->Arg(1)->Arg(64)->Arg(4096)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
