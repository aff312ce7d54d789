// Residual add, fp32 CPU reference: out = a + b (out may alias a or b). Its backward is the
// identity on both inputs, which callers express by accumulating the same gradient twice.
#include "kernels/cpu/cpu_ops.h"

namespace ulysses::cpu {

void residual_forward(float* out, const float* a, const float* b, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > 262144)
  for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

}  // namespace ulysses::cpu
