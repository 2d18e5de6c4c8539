// Host entry point of the small-M chain kernel (csrc/small_m.cu); no torch, no CUDA headers needed.
#pragma once

#include <cstddef>

#include "small_m_plan.h"

namespace utilrank {
namespace small_m {

// Launches the chain `steps[0..nsteps)` for `m` rows on `stream` (a cudaStream_t) of device `device`,
// one cooperative launch of `sm_count` blocks. Returns 0, or 1 with a message in err. Allocates
// nothing and never synchronizes: safe inside CUDA graph capture.
int launch_chain(int dtype, const StepSpec* steps, int nsteps, int m, int device, int sm_count,
                 long long smem_optin, void* stream, char* err, size_t errlen);

}  // namespace small_m
}  // namespace utilrank
