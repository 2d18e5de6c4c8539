// Small-M (1..16 rows) fused low-rank linear and low-rank MLP: one cooperative launch per call.
//
// Why one launch: at batch 1..16 a factored layer is bound by launches and by streaming its weights,
// not by FLOPs. The second factor needs all of the first's output, which a plain launch cannot wait
// for; a cooperative launch (all blocks co-resident, grid.sync() between steps) can, and it is
// capturable in a CUDA graph. Thread-block clusters (sm_90) were not used: a cluster spans at most 16
// SMs, a fraction of the chip's DRAM bandwidth, while the cooperative grid uses every SM on sm_80 and
// sm_90 alike.
//
// Layout of one call (see small_m_plan.h for the tiling):
//   1. every block zeroes its share of the accumulated fp32 buffer (if a step accumulates);
//   2. every block issues cp.async copies of its weight tiles of ALL steps into shared memory;
//   3. for each step: wait for that step's copies, stage the step's input (x or the previous step's
//      fp32 output) into shared memory, compute, write the epilogue (bias, activation), grid.sync().
// No allocation, no host synchronization, the caller's stream: usable inside CUDA graph capture.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdio>

#include "small_m.h"

namespace cg = cooperative_groups;

namespace utilrank {
namespace small_m {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case kActRelu:
      return fmaxf(v, 0.f);
    case kActGelu:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case kActGeluTanh:
      return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default:
      return v;
  }
}

// cp.async (sm_80+): 16-byte global -> shared copies that bypass the registers and L1.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gsrc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gsrc) : "memory");
#else
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gsrc);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Waits until at most `pending` of this thread's most recent copy groups are still in flight.
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  switch (pending) {
    case 3:
      cp_async_wait<3>();
      break;
    case 2:
      cp_async_wait<2>();
      break;
    case 1:
      cp_async_wait<1>();
      break;
    default:
      cp_async_wait<0>();
      break;
  }
}

// Reduce-scatter of N values across the 32 lanes: each step halves the values a lane keeps (it
// keeps the half selected by its lane bit and adds the partner's copy of that half), so V values
// cost ~V shuffles instead of 5 V. Ownership afterwards: owned_base / owned_count (small_m_plan.h).
template <int N, int O, int V>
__device__ __forceinline__ void reduce_scatter(float (&v)[V], int lane) {
  if constexpr (O >= 1) {
    if constexpr (N > 1) {
      constexpr int H = N / 2;
      const bool hi = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = hi ? v[i] : v[i + H];
        const float keep = hi ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
      }
      reduce_scatter<H, O / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
      reduce_scatter<1, O / 2>(v, lane);
    }
  }
}

// Where row r of this block's tile of step `ph` lives: its shared-memory slot (prefetched), or
// global memory. Both point at column c0 of the tile.
template <typename T>
__device__ __forceinline__ const T* weight_row(const Phase& ph, const Tile& t, int r, const unsigned char* smem) {
  const T* g = static_cast<const T*>(ph.w) + (size_t)(t.j0 + r) * ph.cols + t.c0;
  if (ph.w_smem < 0) return g;
  const unsigned off = static_cast<unsigned>(reinterpret_cast<uintptr_t>(g) & 15u);
  return reinterpret_cast<const T*>(smem + ph.w_smem + (size_t)r * ph.slot_bytes + off);
}

// Issues the cp.async copies of this block's tile of step `ph` (16-byte chunks covering each row).
template <typename T>
__device__ __forceinline__ void prefetch_weights(const Phase& ph, unsigned char* smem) {
  if (ph.w_smem < 0) return;
  const Tile t = tile_of(ph.rows, ph.cols, ph.rg, ph.cg, blockIdx.x);
  if (t.nr <= 0 || t.nc <= 0) return;
  const int chunks = ph.slot_bytes / 16;
  const long long nbytes = (long long)t.nc * sizeof(T);
  unsigned char* base = smem + ph.w_smem;
  for (int i = threadIdx.x; i < t.nr * chunks; i += kThreads) {
    const int r = i / chunks, q = i - r * chunks;
    const unsigned char* g =
        reinterpret_cast<const unsigned char*>(static_cast<const T*>(ph.w) + (size_t)(t.j0 + r) * ph.cols + t.c0);
    const unsigned off = static_cast<unsigned>(reinterpret_cast<uintptr_t>(g) & 15u);
    // Chunks are 16-byte aligned and each holds a byte of the row: never outside its page.
    if (q < span_chunks(off, nbytes)) cp_async16(base + (size_t)r * ph.slot_bytes + q * 16, g - off + q * 16);
  }
}

// in_s[m, k] = in[m, col0 + k] as fp32 for k < nk; rows m >= M are zero. 8 loads in flight per thread.
template <typename T, int MT>
__device__ __forceinline__ void stage_input(const Phase& ph, int M, int col0, int nk, int ct, float* in_s) {
  constexpr int U = 8;
  const int total = MT * nk;
  for (int base = threadIdx.x; base < total; base += kThreads * U) {
    float v[U];
    int dst[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * kThreads;
      v[u] = 0.f;
      dst[u] = -1;
      if (i < total) {
        const int m = i / nk, k = i - m * nk;
        dst[u] = m * ct + k;
        if (m < M) {
          const size_t src = (size_t)m * ph.cols + col0 + k;
          // The fp32 input was written by other blocks before the barrier: read it from L2 (.cg).
          v[u] = ph.in_is_x ? to_float(static_cast<const T*>(ph.in)[src])
                            : __ldcg(static_cast<const float*>(ph.in) + src);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (dst[u] >= 0) in_s[dst[u]] = v[u];
    }
  }
}

template <typename T, int MT>
__device__ __forceinline__ void run_phase(const Phase& ph, const Chain& c, unsigned char* smem) {
  const Tile t = tile_of(ph.rows, ph.cols, ph.rg, ph.cg, blockIdx.x);
  if (t.nr <= 0 || t.nc <= 0) return;  // uniform over the block
  constexpr int RW = kRowsPerWarp;
  constexpr int V = RW * MT;
  constexpr int kOwned = owned_count(V);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* in_s = reinterpret_cast<float*>(smem + c.in_s);    // [MT, ct]
  float* acc_s = reinterpret_cast<float*>(smem + c.acc_s);  // [nr, MT]
  for (int i = tid; i < t.nr * MT; i += kThreads) acc_s[i] = 0.f;
  const int groups = row_groups(t.nr), splits = col_splits(t.nr), items = groups * splits;
  const bool owner = owner_writes(lane, V);
  const int obase = owned_base(lane, V);

  for (int k0 = 0; k0 < t.nc; k0 += c.ct) {
    const int nk = min(c.ct, t.nc - k0);
    __syncthreads();  // the previous chunk's readers are done with in_s; acc_s is zeroed
    stage_input<T, MT>(ph, c.m, t.c0 + k0, nk, c.ct, in_s);
    __syncthreads();
    for (int item = warp; item < items; item += kWarps) {
      const int g = item / splits, s = item - g * splits;
      const int lo = seg_bound(s, splits, nk), hi = seg_bound(s + 1, splits, nk);
      const T* wr[RW];
#pragma unroll
      for (int rr = 0; rr < RW; ++rr) wr[rr] = weight_row<T>(ph, t, min(g * RW + rr, t.nr - 1), smem) + k0;
      float acc[V];  // [RW, MT]
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.f;
#pragma unroll 2
      for (int k = lo + lane; k < hi; k += 32) {
        float wv[RW];
#pragma unroll
        for (int rr = 0; rr < RW; ++rr) wv[rr] = to_float(wr[rr][k]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float xv = in_s[m * c.ct + k];
#pragma unroll
          for (int rr = 0; rr < RW; ++rr) acc[rr * MT + m] = fmaf(wv[rr], xv, acc[rr * MT + m]);
        }
      }
      reduce_scatter<V, 16>(acc, lane);
      if (owner) {
#pragma unroll
        for (int i = 0; i < kOwned; ++i) {
          const int idx = obase + i, rr = idx / MT, m = idx - (idx / MT) * MT, r = g * RW + rr;
          if (r < t.nr && m < c.m) atomicAdd(&acc_s[r * MT + m], acc[i]);
        }
      }
    }
  }
  __syncthreads();

  // Epilogue: consecutive threads write consecutive output columns j.
  for (int i = tid; i < c.m * t.nr; i += kThreads) {
    const int m = i / t.nr, r = i - m * t.nr, j = t.j0 + r;
    float v = acc_s[r * MT + m];
    const size_t o = (size_t)m * ph.rows + j;
    if (ph.out_mode == kOutF32Accum) {
      atomicAdd(static_cast<float*>(ph.out) + o, v);
      continue;
    }
    if (ph.bias != nullptr) v += to_float(static_cast<const T*>(ph.bias)[j]);
    v = activate(v, ph.act);
    if (ph.out_mode == kOutF32) {
      static_cast<float*>(ph.out)[o] = v;
    } else {
      static_cast<T*>(ph.out)[o] = from_float<T>(v);
    }
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 1) small_m_chain_kernel(const __grid_constant__ Chain c) {
  extern __shared__ __align__(16) unsigned char smem[];
  const long long stride = (long long)gridDim.x * kThreads;
  for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < c.zero_n; i += stride) c.zero[i] = 0.f;
  for (int p = 0; p < c.nph; ++p) {
    prefetch_weights<T>(c.ph[p], smem);
    cp_async_commit();  // one group per step, empty where nothing was copied
  }
  cg::grid_group grid = cg::this_grid();
  for (int p = 0; p < c.nph; ++p) {
    cp_async_wait_pending(c.nph - 1 - p);
    __syncthreads();
    run_phase<T, MT>(c.ph[p], c, smem);
    if (p + 1 < c.nph) grid.sync();
  }
}

using KernelFn = void (*)(const Chain);

template <typename T>
KernelFn pick_mt(int mt) {
  switch (mt) {
    case 1:
      return small_m_chain_kernel<T, 1>;
    case 2:
      return small_m_chain_kernel<T, 2>;
    case 4:
      return small_m_chain_kernel<T, 4>;
    case 8:
      return small_m_chain_kernel<T, 8>;
    default:
      return small_m_chain_kernel<T, 16>;
  }
}

KernelFn pick_kernel(int dtype, int mt) {
  switch (dtype) {
    case kF16:
      return pick_mt<__half>(mt);
    case kBF16:
      return pick_mt<__nv_bfloat16>(mt);
    default:
      return pick_mt<float>(mt);
  }
}

int mt_index(int mt) { return mt <= 1 ? 0 : mt <= 2 ? 1 : mt <= 4 ? 2 : mt <= 8 ? 3 : 4; }

constexpr int kMaxDevices = 64;
// Whether cudaFuncAttributeMaxDynamicSharedMemorySize was raised, per (dtype, M bucket, device).
std::atomic<bool> g_smem_raised[3][5][kMaxDevices];
// The kernel's static shared memory + 1, per (dtype, M bucket, device); 0: not read yet.
std::atomic<long long> g_smem_static[3][5][kMaxDevices];

// Static shared memory the cubin declares for `kern` (1 KiB on sm_90, none on sm_80:
// benchmarks/results/sm80-sm90_kernel-resources-*.md). The dynamic request may use only the rest of the opt-in size.
long long static_smem(KernelFn kern, int dtype, int mt, int device, char* err, size_t errlen) {
  const bool cacheable = device >= 0 && device < kMaxDevices && dtype >= 0 && dtype < 3;
  std::atomic<long long>* slot = cacheable ? &g_smem_static[dtype][mt_index(mt)][device] : nullptr;
  const long long seen = slot != nullptr ? slot->load(std::memory_order_acquire) : 0;
  if (seen > 0) return seen - 1;
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kern));
  if (e != cudaSuccess) {
    cudaGetLastError();
    snprintf(err, errlen, "cudaFuncGetAttributes failed: %s", cudaGetErrorString(e));
    return -1;
  }
  if (slot != nullptr) slot->store(static_cast<long long>(attr.sharedSizeBytes) + 1, std::memory_order_release);
  return static_cast<long long>(attr.sharedSizeBytes);
}

}  // namespace

int launch_chain(int dtype, const StepSpec* steps, int nsteps, int m, int device, int sm_count,
                 long long smem_optin, void* stream, char* err, size_t errlen) {
  const int esz = dtype == kF32 ? 4 : 2;
  const int mt = m_bucket(m);
  const KernelFn kern = pick_kernel(dtype, mt);
  const long long fixed = static_smem(kern, dtype, mt, device, err, errlen);
  if (fixed < 0) return 1;
  const long long budget = smem_optin - fixed;  // what a dynamic request may ask for
  Chain c;
  long long smem = 0;
  if (plan_chain(steps, nsteps, m, esz, sm_count, budget, &c, &smem, err, errlen)) return 1;
  cudaError_t e;
  if (smem > 48 * 1024) {
    const bool cacheable = device >= 0 && device < kMaxDevices && dtype >= 0 && dtype < 3;
    std::atomic<bool>* raised = cacheable ? &g_smem_raised[dtype][mt_index(mt)][device] : nullptr;
    if (raised == nullptr || !raised->load(std::memory_order_acquire)) {
      // Raise the limit once to the device's maximum less the static part, so any plan for this kernel fits.
      e = cudaFuncSetAttribute(reinterpret_cast<const void*>(kern), cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(budget));
      if (e != cudaSuccess) {
        cudaGetLastError();
        snprintf(err, errlen, "cudaFuncSetAttribute(%lld bytes of dynamic shared memory) failed: %s", budget,
                 cudaGetErrorString(e));
        return 1;
      }
      if (raised != nullptr) raised->store(true, std::memory_order_release);
    }
  }
  void* args[] = {&c};
  e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kern), dim3(sm_count), dim3(kThreads), args,
                                  static_cast<size_t>(smem), static_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) {
    cudaGetLastError();
    snprintf(err, errlen, "cooperative launch of %d blocks x %d threads with %lld bytes of shared memory failed: %s",
             sm_count, kThreads, smem, cudaGetErrorString(e));
    return 1;
  }
  return 0;
}

}  // namespace small_m
}  // namespace utilrank
