// Sum of squares in double (for the gradient norm), fp32 CPU reference.
// The vector is cut into fixed blocks of kBlock elements; each block's partial sum is computed
// by whichever thread (8 interleaved double partial sums, vec_math.h) and the partials are added
// in block order, so the result is bitwise the same for any thread count.
#include <algorithm>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/vec_math.h"

namespace ulysses::cpu {

double sum_squares(const float* x, int64_t n) {
  constexpr int64_t kBlock = 1 << 16;
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(n_blocks);
#pragma omp parallel for schedule(static) if (n_blocks > 1)
  for (int64_t blk = 0; blk < n_blocks; blk++) {
    const int64_t i0 = blk * kBlock, i1 = std::min(n, i0 + kBlock);
    partial[blk] = sum_of_squares(x + i0, i1 - i0);
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace ulysses::cpu
