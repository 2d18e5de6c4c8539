// CPU check of the small-M chain kernel's plan and index math (no CUDA needed):
//   g++ -std=c++17 -O1 -Icsrc tests/csrc/small_m_selftest.cc -o selftest && ./selftest
// tests/csrc/test_small_m_selftest.py builds and runs it. Not part of the extension (setup.py compiles
// csrc/*.cpp and csrc/*.cu).
//
// It emulates small_m.cu block by block, warp by warp and lane by lane with the same helpers
// (small_m_plan.h): tiles, shared-memory slots of misaligned rows, the 16-byte prefetch chunks, the
// chunked input staging, the row-group/column-split work items, the warp reduce-scatter and who
// writes what, the epilogue and the accumulated step, and compares each chain with a float64
// reference on random shapes (odd widths and ranks, misaligned rows, tiny and large grids, shared
// memory budgets that force global reads). What it cannot check is the CUDA itself (cp.async,
// shuffles, grid.sync): tests/ops/test_cuda_ext.py does that on a GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "small_m_plan.h"

using namespace utilrank::small_m;

namespace {

int g_failures = 0;
int g_skipped = 0;  // chains whose plan cannot fit shared memory (tiny grids)

#define EXPECT(cond, ...)                        \
  do {                                           \
    if (!(cond)) {                               \
      if (g_failures < 20) {                     \
        fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        fprintf(stderr, __VA_ARGS__);            \
        fprintf(stderr, "\n");                   \
      }                                          \
      ++g_failures;                              \
    }                                            \
  } while (0)

// Tiles cover every weight element exactly once and stay within the bounds used to size memory.
void check_tiles() {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 3000; ++trial) {
    const int rows = 1 + rng() % 700, cols = 1 + rng() % 5000;
    const int cg = 1 + rng() % 40, rg = 1 + rng() % 200;
    std::vector<int> hits((size_t)rows * cols, 0);
    const int wr = max_tile_rows(rows, rg), wc = max_tile_cols(cols, cg);
    for (int b = 0; b < rg * cg + 3; ++b) {
      const Tile t = tile_of(rows, cols, rg, cg, b);
      if (b >= rg * cg) {
        EXPECT(t.nr == 0 && t.nc == 0, "block %d past the tiles owns something", b);
        continue;
      }
      EXPECT(t.nr >= 0 && t.nr <= wr && t.nc >= 0 && t.nc <= wc, "tile extent %dx%d over bound %dx%d", t.nr, t.nc,
             wr, wc);
      EXPECT(cg == 1 || t.c0 % kColUnit == 0, "column tile starts at %d", t.c0);
      for (int r = 0; r < t.nr; ++r)
        for (int c = 0; c < t.nc; ++c) ++hits[(size_t)(t.j0 + r) * cols + t.c0 + c];
    }
    for (size_t i = 0; i < hits.size(); ++i) {
      EXPECT(hits[i] == 1, "rows %d cols %d rg %d cg %d: element %zu covered %d times", rows, cols, rg, cg, i, hits[i]);
      if (hits[i] != 1) break;
    }
  }
}

// Lockstep emulation of reduce_scatter<V, 16> (small_m.cu) across 32 lanes.
void reduce_scatter_emulated(std::vector<std::vector<float>>& v, int V) {
  int n = V;
  for (int o = 16; o >= 1; o >>= 1) {
    std::vector<std::vector<float>> send(32, std::vector<float>(V, 0.f));
    if (n > 1) {
      const int h = n / 2;
      for (int lane = 0; lane < 32; ++lane) {
        const bool hi = (lane & o) != 0;
        for (int i = 0; i < h; ++i) send[lane][i] = hi ? v[lane][i] : v[lane][i + h];
      }
      for (int lane = 0; lane < 32; ++lane) {
        const bool hi = (lane & o) != 0;
        for (int i = 0; i < h; ++i) {
          const float keep = hi ? v[lane][i + h] : v[lane][i];
          v[lane][i] = keep + send[lane ^ o][i];
        }
      }
      n = h;
    } else {
      for (int lane = 0; lane < 32; ++lane) send[lane][0] = v[lane][0];
      for (int lane = 0; lane < 32; ++lane) v[lane][0] += send[lane ^ o][0];
    }
  }
}

void check_reduce_scatter() {
  std::mt19937 rng(2);
  for (int V : {4, 8, 16, 32, 64}) {
    std::vector<std::vector<float>> v(32, std::vector<float>(V));
    std::vector<double> total(V, 0.0);
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < V; ++i) {
        v[lane][i] = (float)(int)(rng() % 17) - 8.f;  // small integers: sums are exact
        total[i] += v[lane][i];
      }
    reduce_scatter_emulated(v, V);
    std::vector<int> written(V, 0);
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < owned_count(V); ++i) {
        const int idx = owned_base(lane, V) + i;
        EXPECT(idx >= 0 && idx < V, "V=%d lane %d owns index %d", V, lane, idx);
        EXPECT(v[lane][i] == (float)total[idx], "V=%d lane %d index %d: %g != %g", V, lane, idx, v[lane][i],
               total[idx]);
        if (owner_writes(lane, V)) ++written[idx];
      }
    }
    for (int i = 0; i < V; ++i) EXPECT(written[i] == 1, "V=%d index %d written %d times", V, i, written[i]);
  }
}

// Element storage of the emulated dtype: 4-byte float, or 2 bytes (bf16 bits).
struct Buffer {
  std::vector<unsigned char> bytes;
  size_t offset;  // data starts here: misaligned on purpose, with slack before and after
  int esz;
  void init(size_t n, int esz_, unsigned misalign, std::mt19937& rng, bool random) {
    esz = esz_;
    offset = 32 + misalign;
    bytes.assign(offset + n * esz + 64, 0xAB);  // garbage around the data
    for (size_t i = 0; i < n; ++i) set(i, random ? (float)((int)(rng() % 2001) - 1000) / 1000.f : 0.f);
  }
  void* ptr() { return bytes.data() + offset; }
  void set(size_t i, float v) {
    if (esz == 4) {
      memcpy(&bytes[offset + 4 * i], &v, 4);
    } else {
      uint32_t u;
      memcpy(&u, &v, 4);
      const uint16_t h = (uint16_t)(u >> 16);
      memcpy(&bytes[offset + 2 * i], &h, 2);
    }
  }
};

float load_elem(const void* p, int esz) {
  if (esz == 4) {
    float v;
    memcpy(&v, p, 4);
    return v;
  }
  uint16_t h;
  memcpy(&h, p, 2);
  const uint32_t u = (uint32_t)h << 16;
  float v;
  memcpy(&v, &u, 4);
  return v;
}

float activate(float v, int act) {
  switch (act) {
    case kActRelu:
      return std::max(v, 0.f);
    case kActGelu:
      return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case kActGeluTanh:
      return 0.5f * v * (1.f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default:
      return v;
  }
}

const unsigned char* row_ptr(const Phase& ph, const Tile& t, int r, int esz) {
  return static_cast<const unsigned char*>(ph.w) + ((size_t)(t.j0 + r) * ph.cols + t.c0) * esz;
}

// Mirrors small_m_chain_kernel for every block, phase by phase (grid.sync between phases).
void run_chain_emulated(const Chain& c, long long smem_bytes, int grid, int esz) {
  const int MT = m_bucket(c.m), RW = kRowsPerWarp, V = RW * MT;
  std::vector<std::vector<unsigned char>> smem(grid, std::vector<unsigned char>((size_t)smem_bytes + 16, 0xCD));
  for (long long i = 0; i < c.zero_n; ++i) c.zero[i] = 0.f;
  // Prefetch (prefetch_weights): 16-byte chunks of each tile row into its slot.
  for (int b = 0; b < grid; ++b)
    for (int p = 0; p < c.nph; ++p) {
      const Phase& ph = c.ph[p];
      if (ph.w_smem < 0) continue;
      const Tile t = tile_of(ph.rows, ph.cols, ph.rg, ph.cg, b);
      if (t.nr <= 0 || t.nc <= 0) continue;
      const int chunks = ph.slot_bytes / 16;
      for (int i = 0; i < t.nr * chunks; ++i) {
        const int r = i / chunks, q = i - r * chunks;
        const unsigned char* g = row_ptr(ph, t, r, esz);
        const unsigned off = (unsigned)((uintptr_t)g & 15u);
        if (q < span_chunks(off, (long long)t.nc * esz)) {
          const size_t dst = (size_t)ph.w_smem + (size_t)r * ph.slot_bytes + q * 16;
          EXPECT(dst + 16 <= (size_t)smem_bytes, "prefetch writes past shared memory");
          EXPECT(((uintptr_t)(g - off + q * 16) & 15u) == 0 && dst % 16 == 0, "unaligned cp.async");
          memcpy(&smem[b][dst], g - off + q * 16, 16);
        }
      }
    }
  for (int p = 0; p < c.nph; ++p) {
    const Phase& ph = c.ph[p];
    for (int b = 0; b < grid; ++b) {
      const Tile t = tile_of(ph.rows, ph.cols, ph.rg, ph.cg, b);
      if (t.nr <= 0 || t.nc <= 0) continue;
      unsigned char* sm = smem[b].data();
      float* in_s = reinterpret_cast<float*>(sm + c.in_s);
      float* acc_s = reinterpret_cast<float*>(sm + c.acc_s);
      EXPECT((size_t)c.acc_s + (size_t)t.nr * MT * 4 <= (size_t)smem_bytes, "accumulators past shared memory");
      EXPECT(ph.w_smem < 0 || ph.w_smem >= c.acc_s + (long long)t.nr * MT * 4, "slots overlap accumulators");
      for (int i = 0; i < t.nr * MT; ++i) acc_s[i] = 0.f;
      const int groups = row_groups(t.nr), splits = col_splits(t.nr), items = groups * splits;
      for (int k0 = 0; k0 < t.nc; k0 += c.ct) {
        const int nk = std::min(c.ct, t.nc - k0);
        EXPECT((long long)MT * c.ct * 4 <= c.acc_s, "staged input overlaps accumulators");
        for (int i = 0; i < MT * nk; ++i) {  // stage_input
          const int m = i / nk, k = i - m * nk;
          float v = 0.f;
          if (m < c.m) {
            const size_t src = (size_t)m * ph.cols + t.c0 + k0 + k;
            v = ph.in_is_x ? load_elem(static_cast<const unsigned char*>(ph.in) + src * esz, esz)
                           : static_cast<const float*>(ph.in)[src];
          }
          in_s[m * c.ct + k] = v;
        }
        std::vector<int> seen(items, 0);
        for (int warp = 0; warp < kWarps; ++warp) {
          for (int item = warp; item < items; item += kWarps) {
            ++seen[item];
            const int g = item / splits, s = item - g * splits;
            const int lo = seg_bound(s, splits, nk), hi = seg_bound(s + 1, splits, nk);
            std::vector<const unsigned char*> wr(RW);
            for (int rr = 0; rr < RW; ++rr) {
              const int r = std::min(g * RW + rr, t.nr - 1);
              const unsigned char* gp = row_ptr(ph, t, r, esz);
              const unsigned off = (unsigned)((uintptr_t)gp & 15u);
              wr[rr] = (ph.w_smem < 0 ? gp : sm + ph.w_smem + (size_t)r * ph.slot_bytes + off) + (size_t)k0 * esz;
            }
            std::vector<std::vector<float>> acc(32, std::vector<float>(V, 0.f));
            for (int lane = 0; lane < 32; ++lane)
              for (int k = lo + lane; k < hi; k += 32)
                for (int m = 0; m < MT; ++m)
                  for (int rr = 0; rr < RW; ++rr)
                    acc[lane][rr * MT + m] =
                        std::fma(load_elem(wr[rr] + (size_t)k * esz, esz), in_s[m * c.ct + k], acc[lane][rr * MT + m]);
            reduce_scatter_emulated(acc, V);
            for (int lane = 0; lane < 32; ++lane) {
              if (!owner_writes(lane, V)) continue;
              for (int i = 0; i < owned_count(V); ++i) {
                const int idx = owned_base(lane, V) + i, rr = idx / MT, m = idx % MT, r = g * RW + rr;
                if (r < t.nr && m < c.m) acc_s[r * MT + m] += acc[lane][i];
              }
            }
          }
        }
        for (int i = 0; i < items; ++i) EXPECT(seen[i] == 1, "work item %d done %d times", i, seen[i]);
      }
      for (int i = 0; i < c.m * t.nr; ++i) {  // epilogue
        const int m = i / t.nr, r = i - m * t.nr, j = t.j0 + r;
        float v = acc_s[r * MT + m];
        const size_t o = (size_t)m * ph.rows + j;
        if (ph.out_mode == kOutF32Accum) {
          static_cast<float*>(ph.out)[o] += v;
          continue;
        }
        if (ph.bias != nullptr) v += load_elem(static_cast<const unsigned char*>(ph.bias) + (size_t)j * esz, esz);
        v = activate(v, ph.act);
        if (ph.out_mode == kOutF32) {
          static_cast<float*>(ph.out)[o] = v;
        } else {
          unsigned char* dst = static_cast<unsigned char*>(ph.out) + o * esz;
          if (esz == 4) {
            memcpy(dst, &v, 4);
          } else {  // round to nearest even, like __float2bfloat16_rn
            uint32_t u;
            memcpy(&u, &v, 4);
            const uint16_t h = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            memcpy(dst, &h, 2);
          }
        }
      }
    }
  }
}

// One random chain (linear: 2 steps, MLP: 4) against a float64 reference.
void check_chain(std::mt19937& rng, bool mlp, int trial) {
  const int esz = (rng() % 2) ? 4 : 2;
  const int m = 1 + rng() % kMaxM;
  auto dim = [&](int lo, int hi) { return lo + (int)(rng() % (hi - lo + 1)); };
  const int k = dim(1, 1200), r1 = dim(1, 200), h = dim(1, 2000), r2 = dim(1, 200), n = dim(1, 900);
  const int grids[] = {1, 2, 3, 7, 16, 108, 132};
  const int grid = grids[rng() % 7];
  const long long budgets[] = {227 * 1024, 163 * 1024, 100 * 1024, 70 * 1024};
  const long long budget = budgets[rng() % 4];
  const int act = (int)(rng() % 4);
  std::vector<int> rows = mlp ? std::vector<int>{r1, h, r2, n} : std::vector<int>{r1, n};
  std::vector<int> cols = mlp ? std::vector<int>{k, r1, h, r2} : std::vector<int>{k, r1};
  const int nst = (int)rows.size();
  std::vector<Buffer> w(nst), bias(nst);
  Buffer x, y;
  x.init((size_t)m * k, esz, esz * (rng() % (16 / esz)), rng, true);
  y.init((size_t)m * rows[nst - 1], esz, esz * (rng() % (16 / esz)), rng, false);
  std::vector<bool> has_bias(nst);
  for (int p = 0; p < nst; ++p) {
    w[p].init((size_t)rows[p] * cols[p], esz, esz * (rng() % (16 / esz)), rng, true);
    has_bias[p] = (p % 2 == 1) && rng() % 3 != 0;  // b factors carry the biases
    bias[p].init(rows[p], esz, esz * (rng() % (16 / esz)), rng, true);
  }
  std::vector<std::vector<float>> ws(nst);
  for (int p = 0; p < nst - 1; ++p) ws[p].assign((size_t)m * rows[p], -7.f);
  std::vector<StepSpec> steps(nst);
  for (int p = 0; p < nst; ++p) {
    StepSpec& s = steps[p];
    s.w = w[p].ptr();
    s.rows = rows[p];
    s.cols = cols[p];
    s.bias = has_bias[p] ? bias[p].ptr() : nullptr;
    s.act = (p == nst - 1 || (mlp && p == 1)) ? act : kActNone;
    if (mlp && p == nst - 1) s.act = kActNone;
    s.in = p == 0 ? x.ptr() : static_cast<const void*>(ws[p - 1].data());
    s.in_is_x = p == 0;
    s.out = p == nst - 1 ? y.ptr() : static_cast<void*>(ws[p].data());
    s.out_is_y = p == nst - 1;
  }
  Chain c;
  long long smem = 0;
  char err[256];
  if (plan_chain(steps.data(), nst, m, esz, grid, budget, &c, &smem, err, sizeof(err))) {
    // Legitimate only on tiny grids, where a tile has too many rows for its accumulators.
    EXPECT(grid <= 16 && strstr(err, "accumulators") != nullptr, "plan failed: %s", err);
    ++g_skipped;
    return;
  }
  EXPECT(smem <= budget, "plan uses %lld > %lld bytes", smem, budget);
  EXPECT(c.in_s % 16 == 0 && c.acc_s % 16 == 0, "unaligned shared-memory regions");
  for (int p = 0; p < nst; ++p) {
    EXPECT(c.ph[p].rg * c.ph[p].cg <= grid, "step %d tiles %d x %d exceed the grid", p, c.ph[p].rg, c.ph[p].cg);
    EXPECT(c.ph[p].w_smem < 0 || c.ph[p].w_smem % 16 == 0, "unaligned slot");
    EXPECT(c.ph[p].cg == 1 || c.ph[p].out_mode == kOutF32Accum, "split step does not accumulate");
    EXPECT(c.ph[p].out_mode != kOutF32Accum || (p > 0 && steps[p].bias == nullptr && steps[p].act == kActNone),
           "step %d accumulates but has an epilogue or is first", p);
  }
  run_chain_emulated(c, smem, grid, esz);

  // float64 reference, with the emulated dtype's weights and fp32 intermediates like the kernel.
  std::vector<double> cur((size_t)m * k);
  for (size_t i = 0; i < cur.size(); ++i) cur[i] = load_elem(static_cast<unsigned char*>(x.ptr()) + i * esz, esz);
  double scale = 1.0;
  for (int p = 0; p < nst; ++p) {
    std::vector<double> nxt((size_t)m * rows[p]);
    for (int mi = 0; mi < m; ++mi)
      for (int j = 0; j < rows[p]; ++j) {
        double s = 0;
        for (int kk = 0; kk < cols[p]; ++kk)
          s += (double)load_elem(static_cast<unsigned char*>(w[p].ptr()) + ((size_t)j * cols[p] + kk) * esz, esz) *
               cur[(size_t)mi * cols[p] + kk];
        if (steps[p].bias) s += load_elem(static_cast<unsigned char*>(bias[p].ptr()) + (size_t)j * esz, esz);
        nxt[(size_t)mi * rows[p] + j] = activate((float)s, steps[p].act);
      }
    scale *= std::sqrt((double)cols[p]) + 1;
    cur.swap(nxt);
  }
  const double tol = (esz == 4 ? 1e-5 : 1e-2) * scale;
  int bad = 0;
  for (size_t i = 0; i < cur.size(); ++i) {
    const float got = load_elem(static_cast<unsigned char*>(y.ptr()) + i * esz, esz);
    if (!(std::fabs(got - cur[i]) <= tol * (1 + std::fabs(cur[i])))) {
      if (bad < 3)
        EXPECT(false, "trial %d (%s esz=%d m=%d k=%d r1=%d h=%d r2=%d n=%d grid=%d budget=%lld): y[%zu] = %g, want %g",
               trial, mlp ? "mlp" : "linear", esz, m, k, r1, h, r2, n, grid, budget, i, got, cur[i]);
      ++bad;
    }
  }
  // The bytes around y are untouched.
  for (size_t i = 0; i < y.offset; ++i) EXPECT(y.bytes[i] == 0xAB, "write before y");
  for (size_t i = y.offset + cur.size() * esz; i < y.bytes.size(); ++i) EXPECT(y.bytes[i] == 0xAB, "write after y");
}

}  // namespace

int main() {
  check_tiles();
  check_reduce_scatter();
  std::mt19937 rng(3);
  int cases = 0;
  for (int trial = 0; trial < 40; ++trial, ++cases) check_chain(rng, false, trial);
  for (int trial = 0; trial < 24; ++trial, ++cases) check_chain(rng, true, trial);
  if (g_failures) {
    fprintf(stderr, "small_m selftest: %d failures\n", g_failures);
    return 1;
  }
  printf("small_m selftest: tiles, reduce-scatter and %d emulated chains OK (%d plans too large, as expected)\n",
         cases - g_skipped, g_skipped);
  return 0;
}
