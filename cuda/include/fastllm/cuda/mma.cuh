// Warp-level tensor-core MMA (m16n8k16, fp16/bf16 in, fp32 accumulate) and cp.async,
// sm_80+. Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A 16x16 (row-major): a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]
//                        a[2] = A[g][2t+8..+9]   a[3] = A[g+8][2t+8..+9]
//   B 16x8  (K x N):     b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C 16x8  (fp32):      c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
// Each a/b register packs two 16-bit elements, the lower index in the low half.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

// The instructions exist from sm_80 on; older targets compile empty bodies that the
// launcher never reaches (it checks the device's compute capability).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FASTLLM_SM80 1
#else
#define FASTLLM_SM80 0
#endif

namespace fastllm::cuda {

// D (16x8 fp32) += A (16x16) * B (16x8), elements of type TYPE ("f16" or "bf16").
#if FASTLLM_SM80
#define FASTLLM_MMA_M16N8K16(TYPE, c, a, b)                                                              \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                   \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                          \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
#else
#define FASTLLM_MMA_M16N8K16(TYPE, c, a, b) ((void)c, (void)a, (void)b)
#endif

template <typename T> struct MmaType;
template <> struct MmaType<__half> {
  __device__ static void mma(float* c, const uint32_t* a, const uint32_t* b) { FASTLLM_MMA_M16N8K16("f16", c, a, b); }
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct MmaType<__nv_bfloat16> {
  __device__ static void mma(float* c, const uint32_t* a, const uint32_t* b) { FASTLLM_MMA_M16N8K16("bf16", c, a, b); }
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Two 16-bit elements that are not adjacent in memory, packed as one MMA register.
__device__ __forceinline__ uint32_t pack_u16(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Four 8x8 b16 matrices from shared memory: lanes 8i .. 8i+7 give the row addresses
// (16 bytes each) of matrix i; lane l receives in r[i] matrix i's elements
// (row l / 4, cols 2 (l % 4), +1) -- with .trans, (rows 2 (l % 4), +1, col l / 4).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem_row) {
#if FASTLLM_SM80
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
  }
#endif
}

// 16-byte global -> shared copy that bypasses registers; src_bytes 0 zero-fills dst.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
#if FASTLLM_SM80
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if FASTLLM_SM80
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if FASTLLM_SM80
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

}  // namespace fastllm::cuda
