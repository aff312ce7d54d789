// Instantiates the causal flash-attention forward for head dimension 64 (see attention_kernels.cuh).
#include "kernels/cuda/attention_kernels.cuh"

namespace ulysses::cuda::attention {
template void attention_forward_launch<64>(bf16*, float*, const bf16*, int, int, int, int, cudaStream_t);
}  // namespace ulysses::cuda::attention
