// The shared-memory side of benchmarks/bench_gather_gpu.py: the same pseudo-random codes (one 32-bit LCG per
// code slot, as the Triton probe) gathered from a codebook copied once per block into shared memory, optionally
// replicated COPIES times so that lanes spread over different banks (AQLM keeps its 2x8 codebooks replicated
// against bank conflicts). Triton cannot index shared memory per thread; this measures what CUDA C++ could gain.
//
// Regenerate the PTX that bench_gather_gpu.py loads through the CUDA driver (no compiler on the GPU machine):
//   nvcc -arch=compute_80 -ptx benchmarks/gather_probe_smem.cu -o benchmarks/gather_probe_smem.ptx
//
// One thread handles SLOTS code slots per iteration (8: as the Triton GEMV's d4 tile on 128 threads). Entries are
// WORDS 32-bit words (1: d4 int8, 2: d4 fp16, 4: d8 fp16); each gathered entry is converted to float and summed,
// as the kernels do before their multiply-adds.
#include <cuda_fp16.h>
#include <stdint.h>

#define SLOTS 8

template <int WORDS> struct Entry;  // one codebook entry, loaded with one shared-memory instruction
template <> struct Entry<1> { uint32_t w; };
template <> struct Entry<2> { uint2 w; };
template <> struct Entry<4> { uint4 w; };

__device__ __forceinline__ float int8x4_sum(uint32_t w) {
    return (float)(int8_t)(w & 0xff) + (float)(int8_t)((w >> 8) & 0xff) + (float)(int8_t)((w >> 16) & 0xff) +
           (float)(int8_t)(w >> 24);
}

__device__ __forceinline__ float half2_sum(uint32_t w) {
    float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    return f.x + f.y;
}

__device__ __forceinline__ float entry_sum(Entry<1> e) { return int8x4_sum(e.w); }  // d4 int8
__device__ __forceinline__ float entry_sum(Entry<2> e) { return half2_sum(e.w.x) + half2_sum(e.w.y); }  // d4 fp16
__device__ __forceinline__ float entry_sum(Entry<4> e) {  // d8 fp16
    return half2_sum(e.w.x) + half2_sum(e.w.y) + half2_sum(e.w.z) + half2_sum(e.w.w);
}

template <int WORDS>
__device__ void gather(const uint32_t* __restrict__ codebook, float* __restrict__ out, int iters, int kcb_log2,
                       int copies) {
    extern __shared__ __align__(16) uint32_t table[];  // copies x (entries x WORDS)
    const int entries = 1 << kcb_log2;
    const int words = entries * WORDS;
    for (int i = threadIdx.x; i < words * copies; i += blockDim.x) table[i] = codebook[i % words];
    __syncthreads();
    const Entry<WORDS>* mine = reinterpret_cast<const Entry<WORDS>*>(table + (threadIdx.x % copies) * words);
    uint32_t state[SLOTS];
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) state[s] = (blockIdx.x * blockDim.x + threadIdx.x) * SLOTS + s;
    float acc = 0.f;
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
            state[s] = state[s] * 1664525u + 1013904223u;
            uint32_t code = (state[s] >> 16) & (entries - 1);
            acc += entry_sum(mine[code]);
        }
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

extern "C" __global__ void smem_gather_w1(const uint32_t* cb, float* out, int iters, int kcb_log2, int copies) {
    gather<1>(cb, out, iters, kcb_log2, copies);
}
extern "C" __global__ void smem_gather_w2(const uint32_t* cb, float* out, int iters, int kcb_log2, int copies) {
    gather<2>(cb, out, iters, kcb_log2, copies);
}
extern "C" __global__ void smem_gather_w4(const uint32_t* cb, float* out, int iters, int kcb_log2, int copies) {
    gather<4>(cb, out, iters, kcb_log2, copies);
}
