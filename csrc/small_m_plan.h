// Plan and index math of the small-M chain kernel (csrc/small_m.cu), shared by host and device.
//
// A "chain" is 2 (low-rank linear: a, then b) or 4 (low-rank MLP: a1, b1, a2, b2) GEMV-like steps
// out[m, j] = act(sum_k w[j, k] in[m, k] + bias[j]) for M <= 16 rows, run by ONE cooperative launch
// with a grid-wide barrier between steps (a step needs all of the previous step's output).
//
// Every step's weight matrix is cut into tiles, one per block (row groups x column groups), so each
// weight element is read from DRAM exactly once. At kernel start every block issues cp.async copies
// of ALL its tiles (all steps) into shared memory, so the weights of later steps stream in while the
// earlier steps compute and wait at the barrier: the whole chain costs about one DRAM round trip plus
// the barriers, instead of one launch and one round trip per step.
//
// This header has no CUDA dependency so that tests/csrc/small_m_selftest.cc can check the index math on
// a CPU (tests/csrc/test_small_m_selftest.py compiles and runs it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>

#if defined(__CUDACC__)
#define UR_HD __host__ __device__ __forceinline__
#else
#define UR_HD inline
#endif

namespace utilrank {
namespace small_m {

constexpr int kThreads = 512;                  // one block per SM: 16 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSteps = 4;
constexpr int kMaxM = 16;
constexpr int kRowsPerWarp = 4;                // a warp computes 4 rows at once: 4x fewer reads of `in`
constexpr int kColUnit = 8;                    // column tiles start on multiples of 8 elements
constexpr int kSplitCols = 512;                // a splittable step gets column tiles of ~512 elements
constexpr int kInputBudgetBytes = 64 * 1024;   // shared memory for one chunk of the step's input

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum OutMode : int { kOutF32 = 0, kOutF32Accum = 1, kOutY = 2 };
enum Act : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActGeluTanh = 3 };

// One step as the kernel sees it (a kernel parameter: plain data only).
struct Phase {
  const void* w;      // (rows, cols) contiguous, the chain's dtype
  const void* in;     // (M, cols) contiguous: x (chain dtype) when in_is_x, else fp32 workspace
  void* out;          // (M, rows) contiguous: y (chain dtype) when out_mode == kOutY, else fp32
  const void* bias;   // (rows,) chain dtype, or nullptr
  long long w_smem;   // byte offset of this step's weight slots in dynamic shared memory; -1: global
  int rows, cols;
  int rg, cg;         // tiles: rg row groups x cg column groups, block b < rg * cg owns one
  int slot_bytes;     // shared-memory bytes per weight row of a tile (16-byte multiple)
  int in_is_x, out_mode, act;
};

struct Chain {
  Phase ph[kMaxSteps];
  int nph;
  int m;              // rows of x (tokens), 1..16
  int ct;             // input columns staged in shared memory per chunk
  int in_s, acc_s;    // byte offsets of the staged input [MT, ct] and the accumulators [rows, MT]
  float* zero;        // fp32 output accumulated with atomics by a later step: zeroed at kernel start
  long long zero_n;
};

// A step as the host describes it.
struct StepSpec {
  const void* w;
  int rows, cols;
  const void* bias;
  int act;
  const void* in;
  int in_is_x;
  void* out;
  int out_is_y;
};

struct Tile {
  int j0, nr;   // rows [j0, j0 + nr) of w
  int c0, nc;   // columns [c0, c0 + nc)
};

UR_HD int m_bucket(int m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

UR_HD Tile tile_of(int rows, int cols, int rg, int cg, int block) {
  Tile t{0, 0, 0, 0};
  if (block < 0 || block >= rg * cg) return t;
  const int r = block / cg, c = block - (block / cg) * cg;
  const long long j0 = (long long)rows * r / rg, j1 = (long long)rows * (r + 1) / rg;
  const long long cu = (cols + kColUnit - 1) / kColUnit;
  long long c0 = kColUnit * (cu * c / cg), c1 = kColUnit * (cu * (c + 1) / cg);
  if (c0 > cols) c0 = cols;
  if (c1 > cols) c1 = cols;
  t.j0 = (int)j0;
  t.nr = (int)(j1 - j0);
  t.c0 = (int)c0;
  t.nc = (int)(c1 - c0);
  return t;
}

// Upper bounds of a tile's extent over all blocks (used to size shared memory).
UR_HD int max_tile_rows(int rows, int rg) { return (rows + rg - 1) / rg; }
UR_HD int max_tile_cols(int cols, int cg) {
  const int cu = (cols + kColUnit - 1) / kColUnit;
  const int w = kColUnit * ((cu + cg - 1) / cg);
  return w < cols ? w : cols;
}

// A tile row of nbytes starting at a global address with (addr & 15) == off is copied as the
// 16-byte chunks covering [addr - off, addr + nbytes): at most roundup(nbytes + 15, 16) bytes.
UR_HD int slot_bytes_for(int max_cols, int esz) { return ((max_cols * esz + 15 + 15) / 16) * 16; }
UR_HD int span_chunks(unsigned off, long long nbytes) { return (int)((off + nbytes + 15) / 16); }

// Warp work inside a tile: groups of kRowsPerWarp rows, each split into `splits` column segments.
UR_HD int row_groups(int nr) { return (nr + kRowsPerWarp - 1) / kRowsPerWarp; }
UR_HD int col_splits(int nr) {
  const int s = kWarps / row_groups(nr);
  return s < 1 ? 1 : s;
}
UR_HD int seg_bound(int s, int splits, int nk) { return (int)((long long)s * nk / splits); }

// After the warp reduce-scatter of V = kRowsPerWarp * MT partial sums (small_m.cu), lane `lane`
// holds the warp totals of flat indices owned_base(lane, V) + i for i < owned_count(V). With V < 32
// several lanes hold the same total; only owner_writes(lane, V) lanes write it.
UR_HD constexpr int owned_count(int v) { return v >= 32 ? v / 32 : 1; }
UR_HD int owned_base(int lane, int v) { return lane * v / 32; }
UR_HD bool owner_writes(int lane, int v) { return v >= 32 || lane % (32 / v) == 0; }

inline long long align16(long long n) { return (n + 15) / 16 * 16; }

// Fills `c` for `nsteps` steps on a grid of `grid` blocks with `smem_budget` bytes of dynamic
// shared memory per block. Returns 0, or 1 with a message in err.
inline int plan_chain(const StepSpec* s, int nsteps, int m, int esz, int grid, long long smem_budget,
                      Chain* c, long long* smem_bytes, char* err, size_t errlen) {
  if (nsteps < 1 || nsteps > kMaxSteps) {
    snprintf(err, errlen, "chain of %d steps (1..%d supported)", nsteps, kMaxSteps);
    return 1;
  }
  if (m < 1 || m > kMaxM) {
    snprintf(err, errlen, "M=%d rows (1..%d supported)", m, kMaxM);
    return 1;
  }
  if (grid < 1) {
    snprintf(err, errlen, "grid of %d blocks", grid);
    return 1;
  }
  const int mt = m_bucket(m);
  *c = Chain{};
  c->nph = nsteps;
  c->m = m;
  c->zero = nullptr;
  c->zero_n = 0;
  int max_w = 1, max_r = 1;
  for (int p = 0; p < nsteps; ++p) {
    const StepSpec& st = s[p];
    Phase& ph = c->ph[p];
    if (st.rows < 1 || st.cols < 1) {
      snprintf(err, errlen, "step %d has an empty weight (%d x %d)", p, st.rows, st.cols);
      return 1;
    }
    ph.w = st.w;
    ph.in = st.in;
    ph.out = st.out;
    ph.bias = st.bias;
    ph.rows = st.rows;
    ph.cols = st.cols;
    ph.act = st.act;
    ph.in_is_x = st.in_is_x;
    // Column tiles need the output summed across blocks with atomics into a zeroed fp32 buffer:
    // only for a later step (the buffer is zeroed before the first barrier) without an epilogue.
    const bool splittable = p > 0 && st.bias == nullptr && st.act == kActNone && !st.out_is_y;
    int cg = 1;
    if (splittable) {
      cg = (st.cols + kSplitCols - 1) / kSplitCols;
      const int cu = (st.cols + kColUnit - 1) / kColUnit;
      if (cg > cu) cg = cu;
      if (cg > grid) cg = grid;
      if (cg < 1) cg = 1;
    }
    int rg = grid / cg;
    if (rg > st.rows) rg = st.rows;
    if (rg < 1) rg = 1;
    ph.rg = rg;
    ph.cg = cg;
    ph.out_mode = st.out_is_y ? kOutY : (cg > 1 ? kOutF32Accum : kOutF32);
    if (cg > 1) {
      if (c->zero != nullptr) {
        snprintf(err, errlen, "more than one accumulated step");
        return 1;
      }
      c->zero = static_cast<float*>(st.out);
      c->zero_n = (long long)m * st.rows;
    }
    const int wr = max_tile_rows(st.rows, rg), wc = max_tile_cols(st.cols, cg);
    ph.slot_bytes = slot_bytes_for(wc, esz);
    if (wc > max_w) max_w = wc;
    if (wr > max_r) max_r = wr;
  }
  int ct = kInputBudgetBytes / (4 * mt);
  if (ct > max_w) ct = max_w;
  c->ct = ct;
  const long long in_bytes = align16((long long)mt * ct * 4), acc_bytes = align16((long long)max_r * mt * 4);
  c->in_s = 0;
  c->acc_s = (int)in_bytes;
  long long off = in_bytes + acc_bytes;
  if (off > smem_budget) {
    snprintf(err, errlen, "needs %lld bytes of shared memory for its input and accumulators; the device "
             "allows %lld", off, smem_budget);
    return 1;
  }
  // Prefetch every step's weights that fit, in step order; the others are read from global memory.
  for (int p = 0; p < nsteps; ++p) {
    Phase& ph = c->ph[p];
    const long long need = (long long)max_tile_rows(ph.rows, ph.rg) * ph.slot_bytes;
    if (off + need <= smem_budget) {
      ph.w_smem = off;
      off += need;
    } else {
      ph.w_smem = -1;
    }
  }
  *smem_bytes = off;
  return 0;
}

}  // namespace small_m
}  // namespace utilrank
