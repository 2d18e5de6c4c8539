// torch.library registration of the extension's ops (namespace utilrank_C) and the Python module
// utilrank_kernels._C: importing the module loads this library, whose static initializers register
//   utilrank_C::lowrank_linear_small_m(x, a, b, bias?, activation?)  y = act(b (a x) + bias)
//   utilrank_C::lowrank_mlp_small_m(x, a1, b1, bias1?, a2, b2, bias2?, activation?="gelu")
//                                      y = b2 (a2 act(b1 (a1 x) + bias1)) + bias2
// for x of shape (..., in) with at most 16 rows (tokens). Fake (meta) implementations for
// torch.compile live in utilrank_kernels/ops/_cuda_ext.py (set_python_module below).
//
// The same functions are registered for CPU so that a call with CPU tensors reports what is wrong
// with its arguments (and then that it needs CUDA tensors) instead of "no kernel for CPU".
#include <Python.h>

// Light headers only (ATen/ATen.h and ATen/cuda/CUDAContext.h pull in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit lacks, and double the compile time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "small_m.h"

namespace {

namespace sm = utilrank::small_m;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return sm::kF32;
    case at::kHalf:
      return sm::kF16;
    case at::kBFloat16:
      return sm::kBF16;
    default:
      return -1;
  }
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(dtype_code(x.scalar_type()) >= 0, op, ": x must be float16, bfloat16 or float32; got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (..., in_features); got a scalar");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous (call .contiguous() first)");
  TORCH_CHECK(x.size(-1) >= 1, op, ": x has an empty last dimension (in_features = 0)");
}

void check_operand(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D; got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type(), "; all operands must share one dtype");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first)");
  for (int64_t d = 0; d < dim; ++d) {
    TORCH_CHECK(t.size(d) >= 1 && t.size(d) < (int64_t{1} << 31), op, ": ", name, " has an unsupported shape ",
                t.sizes());
  }
}

// `name` (rows, cols) must take `cols_expected` inputs; returns its rows.
int64_t check_factor(const at::Tensor& t, const char* name, const char* shape, int64_t cols_expected,
                     const char* cols_from, const at::Tensor& x, const char* op) {
  check_operand(t, name, 2, x, op);
  TORCH_CHECK(t.size(1) == cols_expected, op, ": ", name, " must have shape ", shape, " with ", cols_expected,
              " columns (", cols_from, "); got ", t.sizes());
  return t.size(0);
}

const at::Tensor* check_bias(const std::optional<at::Tensor>& bias, const char* name, int64_t n,
                             const at::Tensor& x, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_operand(*bias, name, 1, x, op);
  TORCH_CHECK(bias->size(0) == n, op, ": ", name, " must have shape (", n, ",); got ", bias->sizes());
  return &*bias;
}

int parse_activation(const std::optional<c10::string_view>& act, const char* op) {
  if (!act.has_value()) return sm::kActNone;
  const std::string s(act->data(), act->size());
  if (s == "none") return sm::kActNone;
  if (s == "relu") return sm::kActRelu;
  if (s == "gelu") return sm::kActGelu;
  if (s == "gelu_tanh") return sm::kActGeluTanh;
  TORCH_CHECK(false, op, ": activation must be None, 'relu', 'gelu' or 'gelu_tanh'; got '", s, "'");
  return sm::kActNone;
}

int64_t rows_of(const at::Tensor& x, const char* op) {
  const int64_t m = x.numel() / x.size(-1);
  TORCH_CHECK(m <= sm::kMaxM, op, ": the small-M kernel takes at most ", sm::kMaxM,
              " rows (tokens); x has ", m, " (shape ", x.sizes(), "). Use backend='triton' or 'torch' for more");
  return m;
}

void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": runs on CUDA tensors only; got x on ", x.device());
}

at::Tensor new_output(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  return at::empty(shape, x.options());
}

struct DeviceLimits {
  int sm_count = 0;
  int smem_optin = 0;
  int cooperative = 0;
};

// Device attributes, read once per device (cudaDeviceGetAttribute neither syncs nor allocates).
const DeviceLimits& device_limits(int device, const char* op) {
  constexpr int kMaxDevices = 64;
  static std::array<DeviceLimits, kMaxDevices> cache;
  static std::array<std::atomic<bool>, kMaxDevices> ready{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, op, ": device index ", device, " out of range");
  if (!ready[device].load(std::memory_order_acquire)) {
    DeviceLimits l;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.cooperative, cudaDevAttrCooperativeLaunch, device));
    cache[device] = l;  // identical values if two threads race here
    ready[device].store(true, std::memory_order_release);
  }
  return cache[device];
}

void launch(const at::Tensor& x, const sm::StepSpec* steps, int nsteps, int64_t m, const char* op) {
  const int device = x.get_device();
  const DeviceLimits& lim = device_limits(device, op);
  TORCH_CHECK(lim.cooperative, op, ": device ", device, " does not support cooperative launches");
  char err[512] = {0};
  const int rc = sm::launch_chain(dtype_code(x.scalar_type()), steps, nsteps, static_cast<int>(m), device,
                                  lim.sm_count, static_cast<long long>(lim.smem_optin),
                                  c10::cuda::getCurrentCUDAStream(device).stream(), err, sizeof(err));
  TORCH_CHECK(rc == 0, op, ": ", err);
}

at::Tensor lowrank_linear_small_m(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                                  const std::optional<at::Tensor>& bias,
                                  std::optional<c10::string_view> activation) {
  const char* op = "utilrank_C::lowrank_linear_small_m";
  check_x(x, op);
  const int64_t k = x.size(-1);
  const int64_t r = check_factor(a, "a", "(rank, in_features)", k, "x's last dimension", x, op);
  const int64_t n = check_factor(b, "b", "(out_features, rank)", r, "a's rows", x, op);
  const at::Tensor* bias_t = check_bias(bias, "bias", n, x, op);
  const int act = parse_activation(activation, op);
  const int64_t m = rows_of(x, op);
  check_cuda(x, op);

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = new_output(x, n);
  if (m == 0) return y;
  at::Tensor t = at::empty({m, r}, x.options().dtype(at::kFloat));
  sm::StepSpec steps[2] = {
      {a.data_ptr(), static_cast<int>(r), static_cast<int>(k), nullptr, sm::kActNone, x.data_ptr(), 1,
       t.data_ptr(), 0},
      {b.data_ptr(), static_cast<int>(n), static_cast<int>(r), bias_t ? bias_t->data_ptr() : nullptr, act,
       t.data_ptr(), 0, y.data_ptr(), 1},
  };
  launch(x, steps, 2, m, op);
  return y;
}

at::Tensor lowrank_mlp_small_m(const at::Tensor& x, const at::Tensor& a1, const at::Tensor& b1,
                               const std::optional<at::Tensor>& bias1, const at::Tensor& a2, const at::Tensor& b2,
                               const std::optional<at::Tensor>& bias2,
                               std::optional<c10::string_view> activation) {
  const char* op = "utilrank_C::lowrank_mlp_small_m";
  check_x(x, op);
  const int64_t k = x.size(-1);
  const int64_t r1 = check_factor(a1, "a1", "(rank1, in_features)", k, "x's last dimension", x, op);
  const int64_t h = check_factor(b1, "b1", "(hidden_features, rank1)", r1, "a1's rows", x, op);
  const at::Tensor* bias1_t = check_bias(bias1, "bias1", h, x, op);
  const int64_t r2 = check_factor(a2, "a2", "(rank2, hidden_features)", h, "b1's rows", x, op);
  const int64_t n = check_factor(b2, "b2", "(out_features, rank2)", r2, "a2's rows", x, op);
  const at::Tensor* bias2_t = check_bias(bias2, "bias2", n, x, op);
  const int act = parse_activation(activation, op);
  const int64_t m = rows_of(x, op);
  check_cuda(x, op);

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = new_output(x, n);
  if (m == 0) return y;
  // One fp32 workspace: t1 [m, r1] | h [m, h] | t2 [m, r2].
  at::Tensor ws = at::empty({m * (r1 + h + r2)}, x.options().dtype(at::kFloat));
  float* t1 = ws.data_ptr<float>();
  float* hid = t1 + m * r1;
  float* t2 = hid + m * h;
  sm::StepSpec steps[4] = {
      {a1.data_ptr(), static_cast<int>(r1), static_cast<int>(k), nullptr, sm::kActNone, x.data_ptr(), 1, t1, 0},
      {b1.data_ptr(), static_cast<int>(h), static_cast<int>(r1), bias1_t ? bias1_t->data_ptr() : nullptr, act, t1,
       0, hid, 0},
      {a2.data_ptr(), static_cast<int>(r2), static_cast<int>(h), nullptr, sm::kActNone, hid, 0, t2, 0},
      {b2.data_ptr(), static_cast<int>(n), static_cast<int>(r2), bias2_t ? bias2_t->data_ptr() : nullptr,
       sm::kActNone, t2, 0, y.data_ptr(), 1},
  };
  launch(x, steps, 4, m, op);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(utilrank_C, m) {
  m.set_python_module("utilrank_kernels.ops._cuda_ext");
  m.def("lowrank_linear_small_m(Tensor x, Tensor a, Tensor b, Tensor? bias=None, str? activation=None) -> Tensor");
  m.def(
      "lowrank_mlp_small_m(Tensor x, Tensor a1, Tensor b1, Tensor? bias1, Tensor a2, Tensor b2, Tensor? bias2, "
      "str? activation=\"gelu\") -> Tensor");
}

TORCH_LIBRARY_IMPL(utilrank_C, CUDA, m) {
  m.impl("lowrank_linear_small_m", &lowrank_linear_small_m);
  m.impl("lowrank_mlp_small_m", &lowrank_mlp_small_m);
}

TORCH_LIBRARY_IMPL(utilrank_C, CPU, m) {
  m.impl("lowrank_linear_small_m", &lowrank_linear_small_m);
  m.impl("lowrank_mlp_small_m", &lowrank_mlp_small_m);
}

// The Python module: importing it is what loads the library (and so registers the ops above).
static PyModuleDef utilrank_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "CUDA extension of utilrank_kernels: registers torch.ops.utilrank_C.lowrank_linear_small_m and "
    "torch.ops.utilrank_C.lowrank_mlp_small_m.",
    -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&utilrank_c_module); }
