// The argument checks of the CUDA dispatch in kernels/ops.cpp, without a GPU: tensors with the
// wrong dtype or device, and unsupported shapes must give a
// std::runtime_error naming the op (and the argument) BEFORE any CUDA call. The context is a
// cuda ops::Context whose CudaState is built by hand, with no stream, no cuBLASLt and no
// buffers, and the tensors point at host memory labelled cuda: nothing may touch them, and a
// missing check fails this test (a CUDA error or a crash instead of the expected message).
// The numerical checks of the same dispatch need a device: tests/cuda/test_cuda_dispatch.cpp.
#include <catch2/catch.hpp>

#include <vector>

#include "kernels/cuda/cuda_state.h"
#include "kernels/ops.h"

namespace {

using namespace ulysses;
using Catch::Matchers::Contains;
using Shape = std::initializer_list<int64_t>;

struct FakeCuda {
  FakeCuda() {
    ctx.device = Device::cuda;
    ctx.cuda = new ops::CudaState;  // owned by ctx; its destructor frees nothing it lacks
  }
  Tensor dev(DType t, Shape s) { return Tensor(memory.data(), s, t, Device::cuda); }
  Tensor host(DType t, Shape s) { return Tensor(memory.data(), s, t, Device::cpu); }
  ops::Context ctx;
  std::vector<double> memory = std::vector<double>(4096);
};

constexpr DType f32 = DType::f32, bf16 = DType::bf16, i32 = DType::i32;

}  // namespace

TEST_CASE("cuda dispatch: a tensor of the wrong dtype or device names the op and the argument", "[dispatch]") {
  FakeCuda f;
  REQUIRE_THROWS_WITH(ops::gelu_forward(f.ctx, f.dev(bf16, {64}), f.dev(f32, {64})),
                      Contains("op gelu_forward: inp must be bf16 on cuda, got f32[64] on cuda"));
  REQUIRE_THROWS_WITH(ops::residual_forward(f.ctx, f.dev(bf16, {64}), f.dev(bf16, {64}), f.host(bf16, {64})),
                      Contains("op residual_forward: b must be bf16 on cuda") && Contains("on cpu"));
  // parameter gradients are f32 on cuda
  REQUIRE_THROWS_WITH(ops::layernorm_backward(f.ctx, f.dev(bf16, {2, 8}), f.dev(bf16, {8}), f.dev(f32, {8}),
                                              f.dev(bf16, {2, 8}), f.dev(bf16, {2, 8}), f.dev(bf16, {8}),
                                              f.dev(f32, {2}), f.dev(f32, {2})),
                      Contains("op layernorm_backward: dweight must be f32"));
  REQUIRE_THROWS_WITH(ops::matmul_backward(f.ctx, Tensor(), f.dev(f32, {8, 16}), Tensor(), f.dev(f32, {4, 8}),
                                           f.dev(bf16, {4, 16}), f.dev(bf16, {8, 16})),
                      Contains("op matmul_backward: dout must be bf16"));
  REQUIRE_THROWS_WITH(ops::embedding_forward(f.ctx, f.dev(bf16, {4, 8}), f.dev(f32, {4}), f.dev(i32, {4}),
                                             f.dev(bf16, {10, 8}), Tensor()),
                      Contains("op embedding_forward: tokens must be i32"));
  REQUIRE_THROWS_WITH(ops::rope_forward(f.ctx, f.dev(f32, {4, 3, 8}), 0, 2, f.dev(i32, {4}), 1e4f),
                      Contains("op rope_forward: x must be bf16"));
  REQUIRE_THROWS_WITH(ops::crossentropy_forward_backward(f.ctx, f.dev(f32, {4}), f.dev(f32, {4, 16}),
                                                         f.dev(i32, {4}), 10, 1.0f),
                      Contains("op crossentropy_forward_backward: logits must be bf16"));
  REQUIRE_THROWS_WITH(ops::adamw_update(f.ctx, f.dev(f32, {8}), f.dev(f32, {8}), f.dev(bf16, {8}), f.dev(f32, {8}),
                                        1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 1.0f, 1),
                      Contains("op adamw_update: m must be f32"));
  REQUIRE_THROWS_WITH(ops::adamw_update(f.ctx, f.dev(f32, {8}), f.dev(f32, {8}), f.dev(f32, {8}), f.dev(f32, {8}),
                                        1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 1.0f, 1, f.dev(f32, {8})),
                      Contains("op adamw_update: param_lowp must be bf16"));
  REQUIRE_THROWS_WITH(ops::sum(f.ctx, f.dev(bf16, {8})), Contains("op sum: x must be f32"));
  REQUIRE_THROWS_WITH(ops::sum_squares(f.ctx, f.host(f32, {8})), Contains("op sum_squares: x must be f32 on cuda"));
  REQUIRE_THROWS_WITH(ops::fill_zero(f.ctx, f.host(f32, {8})), Contains("op fill_zero: x must be on cuda"));
  REQUIRE_THROWS_WITH(ops::cast(f.ctx, f.dev(i32, {8}), f.dev(f32, {8})), Contains("op cast") && Contains("f32 <-> bf16"));
  REQUIRE_THROWS_WITH(ops::ulysses_pack_heads(f.ctx, f.dev(f32, {64}), f.dev(bf16, {1, 2, 2, 4}), nullptr, nullptr, 2),
                      Contains("op ulysses_pack_heads: dst must be bf16"));
  REQUIRE_THROWS_WITH(ops::ulysses_unpack_sequence(f.ctx, f.dev(i32, {1, 2, 2, 4}), f.dev(i32, {64}), 2),
                      Contains("op ulysses_unpack_sequence: src must be bf16 or f32"));
  ops::Context cpu;
  REQUIRE_THROWS_WITH(ops::copy(cpu, f.host(f32, {8}), f.dev(f32, {8})), Contains("op copy") && Contains("cuda context"));
}

TEST_CASE("cuda dispatch: unsupported shapes are errors", "[dispatch]") {
  FakeCuda f;
  REQUIRE_THROWS_WITH(ops::matmul_forward(f.ctx, f.dev(bf16, {4, 8}), f.dev(bf16, {4, 12}), f.dev(bf16, {8, 12}),
                                          Tensor()),
                      Contains("op matmul_forward") && Contains("multiples of 8") && Contains("IC=12"));
  REQUIRE_THROWS_WITH(ops::attention_forward(f.ctx, f.dev(bf16, {1, 8, 2, 32}), f.dev(f32, {1, 2, 8}),
                                             f.dev(bf16, {1, 8, 6, 32}), 2, 2),
                      Contains("op attention_forward: head dimension 32"));
  REQUIRE_THROWS_WITH(ops::attention_backward(f.ctx, f.dev(bf16, {1, 8, 7, 64}), f.dev(bf16, {1, 8, 3, 64}),
                                              f.dev(bf16, {1, 8, 7, 64}), f.dev(bf16, {1, 8, 3, 64}),
                                              f.dev(f32, {1, 3, 8}), 3, 2),
                      Contains("op attention_backward: Hq=3 is not a multiple of Hkv=2"));
  // runtime.attention = cudnn checks Hq % Hkv in the dispatch too, before cuda::CudnnAttention
  // (which needs a real device: tests/cuda/test_cudnn_attention.cpp) is made
  f.ctx.cudnn_attention = true;
  REQUIRE_THROWS_WITH(ops::attention_forward(f.ctx, f.dev(bf16, {1, 8, 3, 64}), f.dev(f32, {1, 3, 8}),
                                             f.dev(bf16, {1, 8, 7, 64}), 3, 2),
                      Contains("op attention_forward: Hq=3 is not a multiple of Hkv=2"));
  REQUIRE_THROWS_WITH(ops::attention_forward(f.ctx, f.dev(f32, {1, 8, 2, 32}), f.dev(f32, {1, 2, 8}),
                                             f.dev(bf16, {1, 8, 6, 32}), 2, 2),
                      Contains("op attention_forward: out must be bf16"));
  f.ctx.cudnn_attention = false;
  // a moved-from context has no CUDA state left
  ops::Context moved = std::move(f.ctx);
  REQUIRE_THROWS_WITH(ops::gelu_forward(f.ctx, f.dev(bf16, {64}), f.dev(bf16, {64})),
                      Contains("op gelu_forward: a cuda context without CUDA state"));
}
