// Instantiates the causal flash-attention backward (dK/dV pass and dQ pass) for head dimension 128.
#include "kernels/cuda/attention_kernels.cuh"

namespace ulysses::cuda::attention {
template void attention_backward_launch<128>(bf16*, const bf16*, const bf16*, const float*, const float*, int,
                                             int, int, int, cudaStream_t);
}  // namespace ulysses::cuda::attention
