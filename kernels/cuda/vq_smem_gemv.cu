// Batch 1-8 VQLinear GEMV with the codebooks in shared memory (CUDA C++; vqlib.kernels.cuda_smem_gemv launches it).
//
// Why CUDA C++ next to the Triton kernels: a batch-1 GEMV on ~2-bit VQ weights gathers one codebook entry per code,
// and Triton can only gather through pointers (L1) or `tl.gather` on registers (warp shuffles); neither indexes
// shared memory per thread (docs/kernels.md, "Codebook on chip"). L1's tag rate caps pointer gathers at an estimated
// 2-4x fp16 at 8192x8192, below the 4x target; a shared-memory table as in AQLM's 2x8 kernel and QTIP lifts it.
//
// Layout (docs/kernels.md, "Shared-memory GEMV"):
// - a lane owns VL consecutive vectors of a row ("segment": VL*M <= 16 code bytes, one vector load) and keeps the
//   activations of those VL*D columns for all T tokens in registers (VL*D*T <= 64 floats), so shared memory serves
//   only codebook gathers (AQLM re-reads x from shared memory for every row);
// - L lanes cover a chunk of L*VL vectors of one row, 32/L rows per warp; the block holds the codebooks of the chunk's
//   codebook groups, each entry replicated `copies` times and interleaved (slot = entry * copies + lane % copies), so
//   with copies = 128 / entry bytes a quarter/half/full warp's gathers hit distinct banks whatever the codes are (the
//   trick of AQLM's 2x8 kernel);
// - block (x, y) takes rows x*rows_per_block .. and chunk y (grid y = chunks: the K split); its first code loads are
//   issued before the table fill; each warp pass covers 32/L rows, with the codes of the next 3-4 passes
//   (code_loads_in_flight) in flight during its decode, sums each row over its L lanes with
//   shuffles and writes it: to the output (one chunk) or to fp32 partials that vq_splitk_reduce sums in chunk order
//   (deterministic, no atomics, no zero-initialisation).
// Decode: entry (int8 * codebook scale), summed over the M codebooks in order, times the row/group scale, all in
// fp32 as the reference decode_weight; fp32 multiply-adds with the activations.
//
// After any change, regenerate the shipped PTX (vq_smem_gemv.ptx.xz, one module per kernel; vqlib loads them through
// the CUDA driver, so the user's machine needs no compiler): python -m vqlib.kernels.cuda_smem_gemv (nvcc
// -arch=compute_80 -ptx -O3 with -DVQ_D=... selecting one kernel, or -DVQ_REDUCE_ONLY).
// tests/test_kernels_cuda_smem.py fails while the PTX is older than this file.
// On CPUs the same source is compiled by g++ with vq_emu.h, which runs blocks of threads for the tests.
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define VQ_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
__device__ __forceinline__ float half_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t float_to_half(float f) { return __half_as_ushort(__float2half_rn(f)); }
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ float2 halves_to_float2(uint32_t w) { return __half22float2(*reinterpret_cast<__half2*>(&w)); }
__device__ __forceinline__ uint32_t byte_of(uint32_t w, int i) { return __byte_perm(w, 0u, 0x4440u | i); }
__device__ __forceinline__ int log2_pow2(int v) { return __ffs(v) - 1; }
__device__ __forceinline__ int opaque(int v) {  // a value the compiler cannot treat as loop-invariant
    asm volatile("mov.b32 %0, %0;" : "+r"(v));
    return v;
}
__device__ __forceinline__ float2 half_sum_to_float2(uint32_t a, uint32_t b) {
    return __half22float2(__hadd2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b)));
}
template <bool BF16> __device__ __forceinline__ uint32_t pack_act2(float lo, float hi) {  // two weights, one register
    if constexpr (BF16) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    } else {
        const __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
}
__device__ __forceinline__ uint32_t prmt(uint32_t x, uint32_t y, uint32_t selector) { return __byte_perm(x, y, selector); }
#define VQ_HALF2_OP(name, expr)                                                    \
    __device__ __forceinline__ uint32_t name(uint32_t a, uint32_t b) {             \
        const __half2 r = expr(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b)); \
        return *reinterpret_cast<const uint32_t*>(&r);                             \
    }
VQ_HALF2_OP(h2_add, __hadd2)
VQ_HALF2_OP(h2_sub, __hsub2)
VQ_HALF2_OP(h2_mul, __hmul2)
#define VQ_BF162_OP(name, expr)                                                    \
    __device__ __forceinline__ uint32_t name(uint32_t a, uint32_t b) {             \
        const __nv_bfloat162 r = expr(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b)); \
        return *reinterpret_cast<const uint32_t*>(&r);                             \
    }
VQ_BF162_OP(b2_add, __hadd2)
VQ_BF162_OP(b2_mul, __hmul2)
__device__ __forceinline__ uint32_t h2_fma(uint32_t a, uint32_t b, uint32_t c) {
    const __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b), *reinterpret_cast<__half2*>(&c));
    return *reinterpret_cast<const uint32_t*>(&r);
}
// d += a (16x16, row) * b (16x8, col), fp32 accumulation on the tensor cores (PTX ISA, "mma.m16n8k16").
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (BF16)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#define VQ_HOST_ENTRY(name, Args)
#else
#include "vq_emu.h"
#define VQ_HOST_ENTRY(name, Args) VQ_EMU_ENTRY(name, Args)
#endif

// Kernel arguments, passed by value as one struct (mirrored by ctypes in cuda_smem_gemv.py: keep the order).
struct GemvArgs {
    const void* x;                     // (tokens, in) fp16 or bf16 bits, row stride x_stride elements
    const uint8_t* codes;              // (n, nv, M)
    const void* codebooks;             // (G, M, k, D) fp16 bits or int8
    const uint16_t* codebook_scales;   // (G, M) fp16 bits, int8 codebooks only
    const uint16_t* scales;            // (n, s) fp16 bits, or null
    const void* bias;                  // (n,) bias_kind's dtype, or null
    void* out;                         // (tokens, n) x's dtype
    float* partials;                   // (gridDim.y, tokens, n) when the K range is split over blocks
    int n, nv, in_features, x_stride, tokens;
    int k;                             // entries per codebook (2^B <= 256)
    int group_vecs;                    // vectors per codebook group (0: one codebook set per layer)
    int s, scale_group_vecs;           // scale columns per row; vectors per scale group (0: row scales)
    int lanes_per_row;                 // L: lanes along a row's chunk (power of two <= 32)
    int rows_per_block;                // a multiple of warps * (32 / L); block (x, y): rows x*rows_per_block.., chunk y
    int groups_per_chunk;              // codebook groups held in shared memory per chunk (1 without groups)
    int copies;                        // interleaved replicas of each entry in shared memory
    int bias_kind;                     // 0 none, 1 fp32, 2 fp16, 3 bf16
    int warps_k;                       // smem_mma only: warps of a block side by side along K (a power of two <= 8)
};

struct ReduceArgs {
    const float* partials;             // (splits, tokens, n)
    const void* bias;
    void* out;                         // (tokens, n)
    int n, tokens, splits, bias_kind;
    int bf16;                          // output dtype: 0 fp16, 1 bf16
};

__device__ __forceinline__ float bits_to_float(uint32_t u) {
    union { uint32_t u; float f; } v;
    v.u = u;
    return v.f;
}
__device__ __forceinline__ float bf16_to_float(uint16_t b) { return bits_to_float((uint32_t)b << 16); }
__device__ __forceinline__ uint16_t float_to_bf16(float f) {  // round to nearest even, as torch
    union { float f; uint32_t u; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);  // NaN stays NaN
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
template <bool BF16> __device__ __forceinline__ float act_to_float(uint16_t b) {
    return BF16 ? bf16_to_float(b) : half_to_float(b);
}
__device__ __forceinline__ float load_bias(const void* bias, int kind, int i) {
    if (kind == 1) return static_cast<const float*>(bias)[i];
    if (kind == 2) return half_to_float(static_cast<const uint16_t*>(bias)[i]);
    if (kind == 3) return bf16_to_float(static_cast<const uint16_t*>(bias)[i]);
    return 0.f;
}
__device__ __forceinline__ void store_act(void* out, bool bf16, int i, float v) {
    static_cast<uint16_t*>(out)[i] = bf16 ? float_to_bf16(v) : float_to_half(v);
}

// NB bytes loaded with one instruction (NB a power of two <= 16, the address NB-aligned), read back as 32-bit words
// and bytes. Byte i is one PRMT on the GPU (byte_of); a shift-and-mask per byte tripled the decode's instructions.
template <int NB> struct Bytes;
template <> struct Bytes<1> { uint8_t v; __device__ uint32_t word(int) const { return v; } };
template <> struct Bytes<2> { uint16_t v; __device__ uint32_t word(int) const { return v; } };
template <> struct Bytes<4> { uint32_t v; __device__ uint32_t word(int) const { return v; } };
template <> struct Bytes<8> {
    uint2 v;
    __device__ uint32_t word(int i) const { return i ? v.y : v.x; }
};
template <> struct Bytes<16> {
    uint4 v;
    __device__ uint32_t word(int i) const { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
};
template <int NB> __device__ __forceinline__ uint32_t byte_at(const Bytes<NB>& b, int i) {
    return byte_of(b.word(i >> 2), i & 3);
}
template <int NB> __device__ __forceinline__ Bytes<NB> load_bytes(const uint8_t* p) {
    return *reinterpret_cast<const Bytes<NB>*>(p);
}

// The D values of a codebook entry held as EB bytes: fp16 (EB = 2 D, two per 32-bit word) or int8 (EB = D).
template <int D, int EB, bool INT8>
__device__ __forceinline__ void entry_values(const Bytes<EB>& b, float (&v)[D]) {
    if constexpr (INT8) {
#pragma unroll
        for (int e = 0; e < D; ++e) v[e] = (float)(int8_t)byte_at(b, e);
    } else {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) {
            const float2 pair = halves_to_float2(b.word(i));
            v[2 * i] = pair.x;
            v[2 * i + 1] = pair.y;
        }
    }
}

// Copies the codebooks of groups g0 .. g0+gc-1 (and their int8 scales) into shared memory, each entry `copies`
// times, interleaved: slot (book * k + entry) * copies + c.
// TO_BF16 (smem_mma with bf16 activations): each value is stored as bf16, 2 bytes, whatever the source: fp16 entries
// rounded, int8 entries times their codebook scale (exact in fp32) rounded; the table's entries are then 2 D bytes.
template <int M, int EB, bool INT8, bool TO_BF16 = false>
__device__ void fill_table(const GemvArgs& a, unsigned char* table, float* cb_scale, int g0, int gc) {
    constexpr int D = INT8 ? EB : EB / 2, TEB = TO_BF16 ? 2 * D : EB;  // values per entry; table bytes per entry
    const int entries = gc * M * a.k;
    const uint8_t* src = static_cast<const uint8_t*>(a.codebooks) + (size_t)g0 * M * a.k * EB;
    for (int i = threadIdx.x; i < entries * a.copies; i += blockDim.x) {
        const int entry = i / a.copies;
        const Bytes<EB> value = load_bytes<EB>(src + (size_t)entry * EB);
        uint32_t* dst = reinterpret_cast<uint32_t*>(table + (size_t)i * TEB);
        if constexpr (TO_BF16) {
            float v[D];
            entry_values<D, EB, INT8>(value, v);
            const float s = INT8 ? half_to_float(a.codebook_scales[g0 * M + entry / a.k]) : 1.f;
#pragma unroll
            for (int w = 0; w < D / 2; ++w) dst[w] = pack_act2<true>(v[2 * w] * s, v[2 * w + 1] * s);
        } else {
            *reinterpret_cast<Bytes<EB>*>(dst) = value;
        }
    }
    if (INT8)
        for (int i = threadIdx.x; i < gc * M; i += blockDim.x) cb_scale[i] = half_to_float(a.codebook_scales[g0 * M + i]);
}

// Codebook kinds (a template parameter; the kernel name's last part): fp16 entries summed over M in fp32, exactly as
// the reference ("f16"); int8 entries times their fp16 scale ("i8"); fp16 entries of M = 2 summed as half2 before the
// conversion to fp32 ("f16h": 4 packed adds and 8 conversions per d8 vector instead of 16 conversions and 8 adds,
// the hot loop's largest cost; each weight's sum is rounded once to fp16, as the reference rounds W to fp16 for
// fp16 activations; never bit-exact, so only a measured plan variant, SmemTile.half_sum).
enum { CB_F16 = 0, CB_I8 = 1, CB_F16_HALF_SUM = 2 };

// Adds this lane's segment (VL vectors of one row) to part[t]: decode each vector, dot it with the activations.
// table_m[m]: this lane's replica of codebook m's entry 0; consecutive entries are `stride` (copies * EB) bytes apart.
template <int D, int M, int T, int VL, int EB, int CB>
__device__ __forceinline__ void segment_dot(const Bytes<VL * M>& seg, const unsigned char* const (&table_m)[M],
                                            const float (&cbs)[M], int stride, const float (&xr)[T][VL * D],
                                            float (&part)[T]) {
#pragma unroll
    for (int v = 0; v < VL; ++v) {
        float w[D];
        if constexpr (CB == CB_F16_HALF_SUM) {
            static_assert(M == 2, "the half2 sum pairs two codebooks");
            const Bytes<EB> e0 = *reinterpret_cast<const Bytes<EB>*>(table_m[0] + byte_at(seg, 2 * v) * stride);
            const Bytes<EB> e1 = *reinterpret_cast<const Bytes<EB>*>(table_m[1] + byte_at(seg, 2 * v + 1) * stride);
#pragma unroll
            for (int i = 0; i < D / 2; ++i) {
                const float2 pair = half_sum_to_float2(e0.word(i), e1.word(i));
                w[2 * i] = pair.x;
                w[2 * i + 1] = pair.y;
            }
        } else {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const unsigned char* entry_ptr = table_m[m] + byte_at(seg, v * M + m) * stride;
                float value[D];
                entry_values<D, EB, CB == CB_I8>(*reinterpret_cast<const Bytes<EB>*>(entry_ptr), value);
#pragma unroll
                for (int e = 0; e < D; ++e) {
                    if (CB == CB_I8) value[e] *= cbs[m];
                    w[e] = m == 0 ? value[e] : w[e] + value[e];
                }
            }
        }
#pragma unroll
        for (int t = 0; t < T; ++t)
#pragma unroll
            for (int e = 0; e < D; ++e) part[t] = fmaf(w[e], xr[t][v * D + e], part[t]);
    }
}

// Vectors a lane owns (VL): their activations (VL*D*T floats) stay in registers, and their codes (VL*M bytes) are
// one load of at most 16 bytes. cuda_smem_gemv.lane_vectors computes the same.
template <int D, int M, int T> __host__ __device__ constexpr int lane_vectors() {
    constexpr int by_x = 64 / (D * T) > 0 ? 64 / (D * T) : 1;
    return by_x < 16 / M ? by_x : 16 / M;
}
// Passes of codes each lane has loaded ahead of its decode. Why: by Little's law an H200 (4.8 TB/s, ~0.8 us DRAM
// latency, 132 SMs) needs ~30 KB of loads in flight per SM; two 256-thread blocks x 3 x 16 B = 24 KB at one token.
// 3 for 16-byte segments keeps the one-token kernels within 128 registers without spills (ptxas, sm_90).
template <int SEG_BYTES> __host__ __device__ constexpr int code_loads_in_flight() { return SEG_BYTES >= 16 ? 3 : 4; }
// Threads per block (cuda_smem_gemv.THREADS); the kernels are built for two resident blocks per SM (<= 128 registers).
#define VQ_THREADS 256

// The VL*M code bytes of this lane's segment of `row` (zeros outside the layer or past the block's rows).
template <int VL, int M>
__device__ __forceinline__ Bytes<VL * M> row_codes(const GemvArgs& a, int row, int row_end, int v0, bool lane_ok) {
    Bytes<VL * M> seg{};
    if (lane_ok && row < row_end) seg = load_bytes<VL * M>(a.codes + ((size_t)row * a.nv + v0) * M);
    return seg;
}

// xr[t][i] = activation t at column v0*D + i (zero past in_features, for absent tokens and idle lanes).
template <int D, int T, int VL, bool BF16>
__device__ __forceinline__ void load_activations(const GemvArgs& a, int v0, bool lane_ok, float (&xr)[T][VL * D]) {
#pragma unroll
    for (int t = 0; t < T; ++t)
#pragma unroll
        for (int i = 0; i < VL * D; ++i) {
            const int col = v0 * D + i;
            const bool ok = lane_ok && t < a.tokens && col < a.in_features;
            xr[t][i] = ok ? act_to_float<BF16>(static_cast<const uint16_t*>(a.x)[(size_t)t * a.x_stride + col]) : 0.f;
        }
}

// Per-lane constants of the row passes, read anew in every pass through opaque(): NVVM otherwise unswitches the pass
// loop on each of them (split or not, scales or not, bias kind, token count, writer lane) into ~70 copies of the
// decode, 2 MB of PTX per kernel, which the driver would have to compile at first use. One mov per pass.
enum { LANE_OK = 1, WRITER = 2, SPLIT = 4, HAS_SCALES = 8, BIAS_SHIFT = 4 };
struct PassConsts {
    int flags;   // LANE_OK | WRITER | SPLIT | HAS_SCALES | bias_kind << BIAS_SHIFT
    int tokens;  // a.tokens
    int lanes;   // a.lanes_per_row
};

// Output (t, row) of this block's chunk: to the fp32 partials when K is split, else plus bias to the output.
template <bool BF16>
__device__ __forceinline__ void store_result(const GemvArgs& a, int flags, int tokens, int t, int row, float v) {
    if (flags & SPLIT) {
        a.partials[((size_t)blockIdx.y * tokens + t) * a.n + row] = v;
    } else {
        store_act(a.out, BF16, t * a.n + row, v + load_bias(a.bias, flags >> BIAS_SHIFT, row));
    }
}

// One row of a warp pass: this lane's segment dot, times the row/group scale, summed over the row's L lanes
// (every lane takes part in the shuffles), then stored by the row's first lane.
template <int D, int M, int T, int VL, int EB, bool BF16, int CB>
__device__ __forceinline__ void row_pass(const GemvArgs& a, const PassConsts& c, const Bytes<VL * M>& seg, int row,
                                         int row_end, const unsigned char* const (&table_m)[M], const float (&cbs)[M],
                                         int scale_col, const float (&xr)[T][VL * D]) {
    const int flags = opaque(c.flags), tokens = opaque(c.tokens), L = opaque(c.lanes);
    float part[T];
#pragma unroll
    for (int t = 0; t < T; ++t) part[t] = 0.f;
    if ((flags & LANE_OK) && row < row_end) {
        segment_dot<D, M, T, VL, EB, CB>(seg, table_m, cbs, a.copies * EB, xr, part);
        const float scale = (flags & HAS_SCALES) ? half_to_float(a.scales[(size_t)row * a.s + scale_col]) : 1.f;
#pragma unroll
        for (int t = 0; t < T; ++t) part[t] *= scale;
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
        float v = part[t];
        for (int off = L / 2; off > 0; off >>= 1) v += shfl_xor(v, off);
        if (!(flags & WRITER) || row >= row_end || t >= tokens) continue;
        store_result<BF16>(a, flags, tokens, t, row, v);
    }
}

template <int D, int M, int T, bool BF16, int CB>
__device__ void smem_gemv(const GemvArgs& a) {
    constexpr bool INT8 = CB == CB_I8;
    constexpr int VL = lane_vectors<D, M, T>();
    constexpr int EB = INT8 ? D : 2 * D;  // bytes per codebook entry
    constexpr int DEPTH = code_loads_in_flight<VL * M>();
    VQ_DYNAMIC_SMEM(smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int L = a.lanes_per_row, rows_per_pass = warps * (32 / L);
    const int chunk_vecs = L * VL;                             // this block's K range: chunk blockIdx.y
    const int v0 = blockIdx.y * chunk_vecs + (lane % L) * VL;  // this lane's first vector (host: nv % VL == 0)
    const bool lane_ok = v0 < a.nv;
    const int warp_row0 = blockIdx.x * a.rows_per_block + warp * (32 / L);
    const int row0 = warp_row0 + lane / L, row_end = min(a.n, (int)(blockIdx.x + 1) * a.rows_per_block);

    Bytes<VL * M> ring[DEPTH];  // the first passes' codes: in flight while the table is filled (they do not need it)
#pragma unroll
    for (int i = 0; i < DEPTH; ++i) ring[i] = row_codes<VL, M>(a, row0 + i * rows_per_pass, row_end, v0, lane_ok);
    float xr[T][VL * D];
    load_activations<D, T, VL, BF16>(a, v0, lane_ok, xr);
    const int groups = a.group_vecs ? (a.nv + a.group_vecs - 1) / a.group_vecs : 1;
    const int g0 = a.group_vecs ? blockIdx.y * chunk_vecs / a.group_vecs : 0;
    float* cb_scale = reinterpret_cast<float*>(smem + (size_t)a.groups_per_chunk * M * a.k * a.copies * EB);
    fill_table<M, EB, INT8>(a, smem, cb_scale, g0, min(a.groups_per_chunk, groups - g0));
    block_sync();

    const int book0 = a.group_vecs ? (v0 / a.group_vecs - g0) * M : 0;  // host: a segment lies in one group
    const unsigned char* table_m[M];  // this lane's replica (lane % copies; copies is a power of two) of each book
    float cbs[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        table_m[m] = smem + ((size_t)(book0 + m) * a.k * a.copies + (lane & (a.copies - 1))) * EB;
        cbs[m] = INT8 ? cb_scale[book0 + m] : 1.f;
    }
    const int scale_col = a.scale_group_vecs ? v0 / a.scale_group_vecs : 0;
    const PassConsts consts{(lane_ok ? LANE_OK : 0) | (lane % L == 0 ? WRITER : 0) | (gridDim.y > 1 ? SPLIT : 0) |
                                (a.scales ? HAS_SCALES : 0) | a.bias_kind << BIAS_SHIFT,
                            a.tokens, L};
    const int passes = (row_end - warp_row0 + rows_per_pass - 1) / rows_per_pass;  // uniform over the warp
#pragma unroll 1
    for (int p0 = 0; p0 < passes; p0 += DEPTH) {
#pragma unroll
        for (int j = 0; j < DEPTH; ++j) {  // ring[j] holds pass p0 + j; refill it with pass p0 + j + DEPTH
            if (p0 + j >= passes) break;
            const int row = row0 + (p0 + j) * rows_per_pass;
            const Bytes<VL * M> seg = ring[j];
            const bool load_ok = opaque(consts.flags) & LANE_OK;
            ring[j] = row_codes<VL, M>(a, row + DEPTH * rows_per_pass, row_end, v0, load_ok);
            row_pass<D, M, T, VL, EB, BF16, CB>(a, consts, seg, row, row_end, table_m, cbs, scale_col, xr);
        }
    }
}

// ---- smem_mma: 1-16 tokens on the tensor cores ---------------------------------------------------------------------
// Why: above a few tokens the GEMV's fp32 multiply-adds (D per vector per token) cost more than the memory they save;
// mma.sync multiplies a 16-row x 16-column weight tile by 8 tokens per instruction, so the decode (the same table
// gathers as the GEMV) is paid once for up to 16 tokens (as Marlin and QTIP decode into tensor-core fragments).
// The order of the K columns inside an mma is free as long as both operands agree, so each lane decodes whole
// vectors: in m16n8k16 a lane (g = lane / 4, c = lane % 4) holds columns {2c, 2c+1, 2c+8, 2c+9} of rows g and g+8,
// and here those 4 columns are dims 4s..4s+3 of one vector (k-step s of D/4). Lane c owns J consecutive vectors of
// the warp's 4J (one code load of J*M bytes per row), and its B fragment is the same columns of token 8 nt + g.
// A block of 8 warps: warps_k of them side by side along K (chunk = warps_k * 4J vectors, one table fill), 8 /
// warps_k row tiles of 16 per pass; the warps' partial tiles are summed in shared memory in a fixed order.
template <int D, int M, int NT> __host__ __device__ constexpr int mma_lane_vectors() {  // J (cuda_smem_mma: same)
    return 16 / M < 64 / (D * NT) ? 16 / M : 64 / (D * NT);  // J*M code bytes <= 16; J*D*NT/2 x registers <= 32
}

// xb[nt][j][s] = the B fragment of k-step s of vector j: token 8 nt + g, dims 4s + {0, 1} and 4s + {2, 3} of the
// vector's columns, packed as two activations per register (zero past in_features, tokens and idle lanes).
template <int D, int NT, int J>
__device__ __forceinline__ void load_mma_activations(const GemvArgs& a, int v0, bool lane_ok, int g,
                                                     uint32_t (&xb)[NT][J][D / 4][2]) {
    const uint16_t* x = static_cast<const uint16_t*>(a.x);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < J; ++j)
#pragma unroll
            for (int i = 0; i < D / 2; ++i) {  // the pair of dims 2i, 2i+1
                const int t = 8 * nt + g, col = (v0 + j) * D + 2 * i;
                uint32_t pair = 0;
                if (lane_ok && t < a.tokens) {
                    const uint32_t lo = col < a.in_features ? x[(size_t)t * a.x_stride + col] : 0u;
                    const uint32_t hi = col + 1 < a.in_features ? x[(size_t)t * a.x_stride + col + 1] : 0u;
                    pair = lo | hi << 16;
                }
                xb[nt][j][i / 2][i % 2] = pair;
            }
}

// The D weights of one vector of one row as D/2 half2 (bf16x2) registers, decoded two per instruction (sm_90 SASS per
// d8 M=2 vector, gathers and mma included: ~17 instructions; ~46 with an fp32 decode). fp16 activations: int8 entries
// become halves without a conversion instruction: (b ^ 0x80) placed under the exponent byte 0x64 is the half
// 1024 + 128 + b, minus 1152 is b, exactly (Marlin's trick).
// Rounding: M = 1 fp16 codebooks round each weight once, exactly as the reference (the product of two halves is
// exact in fp32); M = 2 and int8 codebooks round two or three times (pair sum, codebook scale, row scale): at most
// a few fp16 ulps from the reference's W, within the fp16 output tolerance, never bit-compared.
// bf16 activations: the table holds the entries as bf16 (fill_table<..., TO_BF16>: fp16 entries rounded, int8 ones
// times their codebook scale, rounded; bf16's 7-bit mantissa cannot hold the int8 trick's 1152 + b) and the same
// adds and multiplies run in bf16x2: the entry, the pair sum and the product rounded to bf16, and the fp16 row/group
// scale too (a relative 2^-9 per row, bf16's own precision), instead of the reference's one rounding of W; within
// the bf16 output tolerance.
// INT8 here: the table holds int8 entries (fp16 activations only). s2[m]: (codebook m's int8 scale, 1 for fp16 and
// bf16 tables) x the row/group scale, as half2 (bf16x2 for BF16).
template <int D, int M, int J, int EB, bool INT8, bool BF16>
__device__ __forceinline__ void decode_vector_h2(const Bytes<J * M>& seg, int j, const unsigned char* const (&table_m)[M],
                                                 int stride, const uint32_t (&s2)[M], uint32_t (&w2)[D / 2]) {
    static_assert(!(BF16 && INT8), "bf16 tables hold bf16 entries");
    uint32_t v[M][D / 2];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const Bytes<EB> e = *reinterpret_cast<const Bytes<EB>*>(table_m[m] + byte_at(seg, j * M + m) * stride);
#pragma unroll
        for (int i = 0; i < D / 2; ++i) {
            if constexpr (INT8) {  // bytes 2i, 2i+1 of the entry
                const uint32_t biased = e.word(i / 2) ^ 0x80808080u;
                v[m][i] = h2_sub(prmt(biased, 0x64646464u, i % 2 ? 0x4342u : 0x4140u), 0x64806480u);  // 1152 = 0x6480
            } else {
                v[m][i] = e.word(i);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < D / 2; ++i) {
        if constexpr (INT8)
            w2[i] = M == 1 ? h2_mul(v[0][i], s2[0]) : h2_fma(v[M - 1][i], s2[M - 1], h2_mul(v[0][i], s2[0]));
        else if constexpr (BF16)
            w2[i] = b2_mul(M == 1 ? v[0][i] : b2_add(v[0][i], v[M - 1][i]), s2[0]);
        else
            w2[i] = h2_mul(M == 1 ? v[0][i] : h2_add(v[0][i], v[M - 1][i]), s2[0]);
    }
}

// One warp tile (rows g and g+8 of this lane, 8 NT tokens) over the warp's 4J vectors: decode, pack, mma. A lane
// past the row's vectors (only in the last chunk) gathers a zero entry (stride 0; see smem_mma) and adds zeros.
// Rows past the block's end compute garbage nobody stores.
template <int D, int M, int NT, int J, int EB, bool BF16, bool INT8>
__device__ __forceinline__ void mma_tile(const Bytes<J * M> (&seg)[2], const float (&scale)[2],
                                         const unsigned char* const (&table_m)[M], const float (&cbs)[M], int stride,
                                         const uint32_t (&xb)[NT][J][D / 4][2], float (&acc)[NT][4]) {
    uint32_t s2[2][M];  // the scales of each row as half2 / bf16x2
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int m = 0; m < M; ++m) s2[h][m] = pack_act2<BF16>(cbs[m] * scale[h], cbs[m] * scale[h]);
#pragma unroll
    for (int j = 0; j < J; ++j) {
        uint32_t frag[D / 4][4];  // A fragments of the vector's k-steps: {row g, row g+8} x {dims 4s+0/1, 4s+2/3}
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint32_t w2[D / 2];
            decode_vector_h2<D, M, J, EB, INT8, BF16>(seg[h], j, table_m, stride, s2[h], w2);
#pragma unroll
            for (int s = 0; s < D / 4; ++s) {
                frag[s][h] = w2[2 * s];
                frag[s][2 + h] = w2[2 * s + 1];
            }
        }
#pragma unroll
        for (int s = 0; s < D / 4; ++s)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma_16816<BF16>(acc[nt], frag[s], xb[nt][j][s]);
    }
}

// Sums the warps_k partial tiles of each row tile in warp order and stores rows x tokens (row-major partials or out).
template <int NT, bool BF16>
__device__ __forceinline__ void store_mma_pass(const GemvArgs& a, const PassConsts& c, const float* red, int pass_row0,
                                               int row_end) {
    const int flags = opaque(c.flags), tokens = opaque(c.tokens), warps_k = opaque(c.lanes);
    const int rows_log2 = log2_pow2((blockDim.x >> 5) / warps_k) + 4, rows = 1 << rows_log2;  // 16 per row tile
    for (int i = threadIdx.x; i < rows * 8 * NT; i += blockDim.x) {  // shifts and masks: rows is a power of two
        const int t = i >> rows_log2, rr = i & (rows - 1), row = pass_row0 + rr;  // rows fastest: coalesced stores
        if (t >= tokens || row >= row_end) continue;
        const int r = rr & 15, nt = t >> 3, tt = t & 7;
        const int lane = (r & 7) * 4 + (tt >> 1), reg = (r >= 8 ? 2 : 0) + (tt & 1);  // the C fragment of (r, tt)
        const float* tile = red + (size_t)((rr >> 4) * warps_k * NT + nt) * 128 + reg * 32 + lane;
        float v = 0.f;
        for (int kw = 0; kw < warps_k; ++kw) v += tile[kw * NT * 128];  // warp order: deterministic
        store_result<BF16>(a, flags, tokens, t, row, v);
    }
}

template <int D, int M, int NT, bool BF16, int CB>
__device__ void smem_mma(const GemvArgs& a) {
    constexpr bool INT8 = CB == CB_I8;
    constexpr int J = mma_lane_vectors<D, M, NT>();
    constexpr int EB = INT8 ? D : 2 * D;                  // bytes per codebook entry in memory
    constexpr int TEB = BF16 ? 2 * D : EB;                // and in the table (bf16 activations: bf16 entries)
    constexpr bool INT8_TABLE = INT8 && !BF16;
    constexpr int DEPTH = code_loads_in_flight<2 * J * M>();  // two rows per lane
    VQ_DYNAMIC_SMEM(smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
    const int warps_k = a.warps_k, kw = warp % warps_k, warps_n = (blockDim.x >> 5) / warps_k;
    const int chunk_vecs = warps_k * 4 * J, rows_per_pass = warps_n * 16;
    const int v0 = blockIdx.y * chunk_vecs + kw * 4 * J + (lane & 3) * J;  // this lane's first vector
    const bool lane_ok = v0 < a.nv;                                          // host: nv % J == 0
    const int block_row0 = blockIdx.x * a.rows_per_block;
    const int row0 = block_row0 + (warp / warps_k) * 16 + g, row_end = min(a.n, block_row0 + a.rows_per_block);

    Bytes<J * M> ring[DEPTH][2];  // rows row0 and row0 + 8 of the next passes, in flight during the table fill
#pragma unroll
    for (int i = 0; i < DEPTH; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) ring[i][h] = row_codes<J, M>(a, row0 + 8 * h + i * rows_per_pass, row_end, v0, lane_ok);
    uint32_t xb[NT][J][D / 4][2];
    load_mma_activations<D, NT, J>(a, v0, lane_ok, g, xb);
    const int groups = a.group_vecs ? (a.nv + a.group_vecs - 1) / a.group_vecs : 1;
    const int g0 = a.group_vecs ? blockIdx.y * chunk_vecs / a.group_vecs : 0;
    const size_t table_bytes = (size_t)a.groups_per_chunk * M * a.k * a.copies * TEB;
    float* cb_scale = reinterpret_cast<float*>(smem + table_bytes);
    // a zero entry for the lanes past the row's vectors: they gather it (stride 0) instead of branching per vector,
    // and add exact zeros (an entry times their zero activations could be 0 * inf = NaN)
    unsigned char* zero_entry = smem + ((table_bytes + 4 * a.groups_per_chunk * M + 15) & ~(size_t)15);
    float* red = reinterpret_cast<float*>(zero_entry + 16);
    fill_table<M, EB, INT8, BF16>(a, smem, cb_scale, g0, min(a.groups_per_chunk, groups - g0));
    if (threadIdx.x < 4) reinterpret_cast<uint32_t*>(zero_entry)[threadIdx.x] = 0u;
    block_sync();

    const int book0 = a.group_vecs ? (v0 / a.group_vecs - g0) * M : 0;
    const unsigned char* table_m[M];
    float cbs[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        table_m[m] = lane_ok ? smem + ((size_t)(book0 + m) * a.k * a.copies + (lane & (a.copies - 1))) * TEB : zero_entry;
        cbs[m] = INT8_TABLE && lane_ok ? cb_scale[book0 + m] : 1.f;  // a bf16 table holds the scaled entries
    }
    const int stride = lane_ok ? a.copies * TEB : 0;
    const int scale_col = a.scale_group_vecs ? v0 / a.scale_group_vecs : 0;
    const PassConsts consts{(lane_ok ? LANE_OK : 0) | (gridDim.y > 1 ? SPLIT : 0) | (a.scales ? HAS_SCALES : 0) |
                                a.bias_kind << BIAS_SHIFT,
                            a.tokens, warps_k};
    const int passes = (row_end - block_row0 + rows_per_pass - 1) / rows_per_pass;  // uniform over the block
#pragma unroll 1
    for (int p0 = 0; p0 < passes; p0 += DEPTH) {
#pragma unroll
        for (int q = 0; q < DEPTH; ++q) {  // ring[q] holds pass p0 + q; refill it with pass p0 + q + DEPTH
            if (p0 + q >= passes) break;
            const int pass = p0 + q, flags = opaque(consts.flags);
            const Bytes<J * M> seg[2] = {ring[q][0], ring[q][1]};
            float scale[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = row0 + 8 * h + pass * rows_per_pass;
                ring[q][h] = row_codes<J, M>(a, row + DEPTH * rows_per_pass, row_end, v0, flags & LANE_OK);
                const bool scaled = (flags & LANE_OK) && (flags & HAS_SCALES) && row < row_end;
                scale[h] = scaled ? half_to_float(a.scales[(size_t)row * a.s + scale_col]) : 1.f;
            }
            float acc[NT][4] = {};
            mma_tile<D, M, NT, J, TEB, BF16, INT8_TABLE>(seg, scale, table_m, cbs, stride, xb, acc);
            float* slot = red + (size_t)(pass & 1) * (blockDim.x >> 5) * NT * 128;  // double buffer: one sync a pass
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int r = 0; r < 4; ++r) slot[((warp * NT + nt) * 4 + r) * 32 + lane] = acc[nt][r];
            block_sync();
            store_mma_pass<NT, BF16>(a, consts, slot, block_row0 + pass * rows_per_pass, row_end);
        }
    }
}

// out[t, i] = sum over splits of partials (in split order) + bias: the second stage of a split K range.
#if !defined(VQ_D)
extern "C" __global__ void vq_splitk_reduce(const ReduceArgs a) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.tokens * a.n) return;
    float v = 0.f;
    for (int s = 0; s < a.splits; ++s) v += a.partials[(size_t)s * a.tokens * a.n + i];
    store_act(a.out, a.bf16 != 0, i, v + load_bias(a.bias, a.bias_kind, i % a.n));
}
VQ_HOST_ENTRY(vq_splitk_reduce, ReduceArgs)
#endif

// vq_smem_gemv_d{D}_m{M}_t{T}_{f16|bf16}_{f16|i8|f16h}: D in {4, 8}, M in {1, 2}, T (tokens, up to) in {1, 2, 4, 8};
// f16h (CB_F16_HALF_SUM) for M = 2 only. vq_smem_mma_d{D}_m{M}_t{T}_{f16|bf16}_{f16|i8}: T in {8, 16}.
#define VQ_GEMV(D, M, T, XN, BF16, CN, CB)                                                     \
    extern "C" __global__ void __launch_bounds__(VQ_THREADS, 2)                                \
        vq_smem_gemv_d##D##_m##M##_t##T##_##XN##_##CN(const GemvArgs a) {                      \
        smem_gemv<D, M, T, BF16, CB>(a);                                                       \
    }                                                                                          \
    VQ_HOST_ENTRY(vq_smem_gemv_d##D##_m##M##_t##T##_##XN##_##CN, GemvArgs)
#define VQ_MMA(D, M, T, XN, BF16, CN, CB)                                                      \
    extern "C" __global__ void __launch_bounds__(VQ_THREADS, 2)                                \
        vq_smem_mma_d##D##_m##M##_t##T##_##XN##_##CN(const GemvArgs a) {                       \
        smem_mma<D, M, T / 8, BF16, CB>(a);                                                    \
    }                                                                                          \
    VQ_HOST_ENTRY(vq_smem_mma_d##D##_m##M##_t##T##_##XN##_##CN, GemvArgs)
#define VQ_ONE(KIND, ...) KIND(__VA_ARGS__)
#define VQ_ONE_EXPANDED(...) VQ_ONE(__VA_ARGS__)
#if defined(VQ_D)  // one kernel per PTX module (cuda_smem_gemv.build_ptx): the driver JIT-compiles only what runs
VQ_ONE_EXPANDED(VQ_KIND, VQ_D, VQ_M, VQ_T, VQ_XN, VQ_BF16, VQ_CN, VQ_CB)
#elif !defined(VQ_REDUCE_ONLY)
#define VQ_GEMV_CB(D, M, T, XN, BF16) VQ_GEMV(D, M, T, XN, BF16, f16, CB_F16) VQ_GEMV(D, M, T, XN, BF16, i8, CB_I8)
#define VQ_GEMV_X(D, M, T) VQ_GEMV_CB(D, M, T, f16, false) VQ_GEMV_CB(D, M, T, bf16, true)
#define VQ_GEMV_T(D, M) VQ_GEMV_X(D, M, 1) VQ_GEMV_X(D, M, 2) VQ_GEMV_X(D, M, 4) VQ_GEMV_X(D, M, 8)
#define VQ_GEMV_H(D, T) VQ_GEMV(D, 2, T, f16, false, f16h, CB_F16_HALF_SUM) VQ_GEMV(D, 2, T, bf16, true, f16h, CB_F16_HALF_SUM)
#define VQ_GEMV_HT(D) VQ_GEMV_H(D, 1) VQ_GEMV_H(D, 2) VQ_GEMV_H(D, 4) VQ_GEMV_H(D, 8)
#define VQ_MMA_CB(D, M, T, XN, BF16) VQ_MMA(D, M, T, XN, BF16, f16, CB_F16) VQ_MMA(D, M, T, XN, BF16, i8, CB_I8)
#define VQ_MMA_X(D, M, T) VQ_MMA_CB(D, M, T, f16, false) VQ_MMA_CB(D, M, T, bf16, true)
#define VQ_MMA_T(D, M) VQ_MMA_X(D, M, 8) VQ_MMA_X(D, M, 16)
VQ_GEMV_T(4, 1)
VQ_GEMV_T(4, 2)
VQ_GEMV_T(8, 1)
VQ_GEMV_T(8, 2)
VQ_GEMV_HT(4)
VQ_GEMV_HT(8)
VQ_MMA_T(4, 1)
VQ_MMA_T(4, 2)
VQ_MMA_T(8, 1)
VQ_MMA_T(8, 2)
#endif
