// Runs vq_smem_gemv.cu's kernels on a CPU, for tests without a GPU (g++ -std=c++20 -include-free: the .cu includes
// this header when __CUDACC__ is not defined). Blocks run one after another; each CUDA thread of a block is a
// std::thread, so __syncthreads is a barrier of the block and a warp shuffle is a write, a barrier of the warp, a read
// and a second barrier. It checks the kernels' logic (indexing, masking, the shared-memory table, the lane sums), not
// what only a GPU can get wrong (memory ordering, alignment faults, bank conflicts): vqlib.kernels checks each
// kernel's output on the GPU itself before it may run (triton_crossover).
#pragma once
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint2 {
    uint32_t x, y;
};
struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};
struct float2 {
    float x, y;
};

struct EmuBlock {  // what the threads of the running block share
    std::vector<unsigned char> smem;
    std::unique_ptr<std::barrier<>> block_barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
    std::vector<float> exchange;       // one slot per thread, for shuffles
    std::vector<uint32_t> fragments;  // six registers per thread (A and B of mma_16816)
};

inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
inline EmuBlock* emu_block = nullptr;

#define VQ_DYNAMIC_SMEM(name) unsigned char* name = emu_block->smem.data()
using std::min;

inline float half_to_float(uint16_t h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
inline uint16_t float_to_half(float f) {
    _Float16 v = (_Float16)f;  // round to nearest even
    uint16_t h;
    std::memcpy(&h, &v, 2);
    return h;
}
inline uint16_t float_to_half_exact(double d) {  // one rounding of a double to half (to nearest even)
    _Float16 v = (_Float16)d;
    uint16_t h;
    std::memcpy(&h, &v, 2);
    return h;
}
inline float2 halves_to_float2(uint32_t w) { return float2{half_to_float(w & 0xffffu), half_to_float(w >> 16)}; }
inline uint32_t byte_of(uint32_t w, int i) { return (w >> (8 * i)) & 0xffu; }
inline int opaque(int v) { return v; }
inline int log2_pow2(int v) { return __builtin_ctz((unsigned)v); }
inline float half_add(uint16_t a, uint16_t b) {  // one fp16 rounding of the exact sum, as __hadd2
    const _Float16 sum = (_Float16)((double)half_to_float(a) + (double)half_to_float(b));  // exact, then rounded
    return (float)sum;
}
inline float2 half_sum_to_float2(uint32_t a, uint32_t b) {
    return float2{half_add(a & 0xffffu, b & 0xffffu), half_add(a >> 16, b >> 16)};
}
inline float fmaf_emu(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#define fmaf fmaf_emu

inline void block_sync() { emu_block->block_barrier->arrive_and_wait(); }
inline float shfl_xor(float v, int lane_mask) {
    const unsigned tid = threadIdx.x, warp = tid / 32;
    emu_block->exchange[tid] = v;
    emu_block->warp_barriers[warp]->arrive_and_wait();
    const float other = emu_block->exchange[tid ^ (unsigned)lane_mask];
    emu_block->warp_barriers[warp]->arrive_and_wait();
    return other;
}

// Activations as the tensor cores take them: two fp16 or bf16 values per 32-bit register, rounded to nearest even.
inline uint16_t emu_float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
template <bool BF16> inline float emu_act_to_float(uint32_t bits) {
    if (BF16) {
        const uint32_t u = bits << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    return half_to_float((uint16_t)bits);
}
template <bool BF16> inline uint32_t pack_act2(float lo, float hi) {
    const uint32_t l = BF16 ? emu_float_to_bf16(lo) : float_to_half(lo), h = BF16 ? emu_float_to_bf16(hi) : float_to_half(hi);
    return l | h << 16;
}
inline uint32_t prmt(uint32_t x, uint32_t y, uint32_t selector) {  // __byte_perm
    const uint64_t bytes = (uint64_t)y << 32 | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= (uint32_t)((bytes >> (8 * ((selector >> (4 * i)) & 7))) & 0xffu) << (8 * i);
    return r;
}
// half2 arithmetic, each half rounded once to nearest even (the exact result in double, then to _Float16)
template <class F> inline uint32_t half2_map(uint32_t a, uint32_t b, uint32_t c, F f) {
    uint32_t r = 0;
    for (int i = 0; i < 2; ++i) {
        auto h = [&](uint32_t w) { return (double)half_to_float((uint16_t)(w >> (16 * i))); };
        r |= (uint32_t)float_to_half_exact(f(h(a), h(b), h(c))) << (16 * i);
    }
    return r;
}
inline uint32_t h2_add(uint32_t a, uint32_t b) { return half2_map(a, b, 0u, [](double x, double y, double) { return x + y; }); }
inline uint32_t h2_sub(uint32_t a, uint32_t b) { return half2_map(a, b, 0u, [](double x, double y, double) { return x - y; }); }
inline uint32_t h2_mul(uint32_t a, uint32_t b) { return half2_map(a, b, 0u, [](double x, double y, double) { return x * y; }); }
// bf16x2 arithmetic: the exact result (double) rounded once to bf16 (float first: exact for these sums and products
// of bf16 values except in extreme exponent ranges)
template <class F> inline uint32_t bf162_map(uint32_t a, uint32_t b, F f) {
    uint32_t r = 0;
    for (int i = 0; i < 2; ++i) {
        auto h = [&](uint32_t w) { return (double)emu_act_to_float<true>((w >> (16 * i)) & 0xffffu); };
        r |= (uint32_t)emu_float_to_bf16((float)f(h(a), h(b))) << (16 * i);
    }
    return r;
}
inline uint32_t b2_add(uint32_t a, uint32_t b) { return bf162_map(a, b, [](double x, double y) { return x + y; }); }
inline uint32_t b2_mul(uint32_t a, uint32_t b) { return bf162_map(a, b, [](double x, double y) { return x * y; }); }
inline uint32_t h2_fma(uint32_t a, uint32_t b, uint32_t c) {
    return half2_map(a, b, c, [](double x, double y, double z) { return x * y + z; });
}

// mma.sync.m16n8k16.row.col (f32 accumulation), warp-collective: every lane posts its fragments, then each computes
// its own four outputs from the PTX ISA's fragment layout (lane = 4 g + c; A: rows g / g+8, columns 2c, 2c+1 and
// +8; B: rows 2c, 2c+1 and +8, column g; C: rows g / g+8, columns 2c, 2c+1). Products are exact in fp32; the sum
// runs over k in order (the tensor cores round differently: within the tests' tolerance, never bit-compared).
template <bool BF16> inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const unsigned tid = threadIdx.x, warp = tid / 32, base = 32 * warp, lane = tid % 32;
    uint32_t* f = emu_block->fragments.data();
    for (int i = 0; i < 4; ++i) f[6 * tid + i] = a[i];
    f[6 * tid + 4] = b[0];
    f[6 * tid + 5] = b[1];
    emu_block->warp_barriers[warp]->arrive_and_wait();
    auto half_of = [](uint32_t reg, int k) { return emu_act_to_float<BF16>(k & 1 ? reg >> 16 : reg & 0xffffu); };
    auto A = [&](int row, int k) {  // lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
        return half_of(f[6 * (base + (row % 8) * 4 + (k % 8) / 2) + (row >= 8) + 2 * (k >= 8)], k);
    };
    auto B = [&](int k, int col) { return half_of(f[6 * (base + col * 4 + (k % 8) / 2) + 4 + (k >= 8)], k); };
    const int g = lane / 4, c = lane % 4;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * c + (i & 1);
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
        out[i] = d[i] + sum;
    }
    emu_block->warp_barriers[warp]->arrive_and_wait();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// Runs kernel(args) over a grid of (gx, gy) blocks of `threads` threads with `smem_bytes` of dynamic shared memory.
template <class Args>
void emu_launch(void (*kernel)(Args), const Args& args, unsigned gx, unsigned gy, unsigned threads, size_t smem_bytes) {
    blockDim = Dim3{threads, 1, 1};
    gridDim = Dim3{gx, gy, 1};
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
            EmuBlock block;
            block.smem.assign(smem_bytes + 16, 0xA5);  // garbage, as uninitialised shared memory
            block.block_barrier = std::make_unique<std::barrier<>>(threads);
            for (unsigned w = 0; w < (threads + 31) / 32; ++w)
                block.warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
            block.exchange.assign(threads, 0.f);
            block.fragments.assign(6 * threads, 0u);
            emu_block = &block;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t)
                pool.emplace_back([&, t] {
                    threadIdx = Dim3{t, 0, 0};
                    blockIdx = Dim3{bx, by, 0};
                    kernel(args);
                });
            for (auto& th : pool) th.join();
            emu_block = nullptr;
        }
}

// Each kernel K gets a host entry point K_emu(args, gx, gy, threads, smem_bytes) for ctypes.
#define VQ_EMU_ENTRY(name, Args)                                                                       \
    extern "C" void name##_emu(Args args, unsigned gx, unsigned gy, unsigned threads, size_t smem) { \
        emu_launch<Args>(name, args, gx, gy, threads, smem);                                         \
    }
