// GEMMs through cuBLASLt: bf16 inputs, fp32 compute, bf16 (or fp32 for dweight) outputs, with
// the bias and GELU_AUX epilogues in the forward. cuBLASLt is column-major, so a row-major
// [rows, cols] matrix is handed over as its (cols x rows) transpose:
//   forward  out^T (OC x M)  = op_T(W as IC x OC) · (inp as IC x M)       m=OC, n=M,  k=IC
//   dinp     dinp^T (IC x M) = (W as IC x OC) · (dout as OC x M)          m=IC, n=M,  k=OC
//   dweight  dW^T (IC x OC)  = (inp as IC x M) · op_T(dout as OC x M)     m=IC, n=OC, k=M
// The bias (length m = OC) is broadcast along n, i.e. added to every row of out, as wanted.
// The descriptors are cheap host objects made per call; the heuristic's choice of algorithm is
// cached per (transposes, m, n, k, output type, epilogue, beta, pointer alignments).
#include <cublasLt.h>

#include <map>
#include <tuple>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/cuda_ops.h"

namespace ulysses::cuda {

using AlgoKey = std::tuple<int, int, uint64_t, uint64_t, uint64_t, int, int, int, uint32_t, uint32_t,
                           uint32_t, uint32_t>;

struct MatmulContext::Impl {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  float* bias_scratch = nullptr;
  int max_bias_columns = 0;
  std::map<AlgoKey, cublasLtMatmulAlgo_t> algos;
};

MatmulContext::MatmulContext(size_t workspace_bytes, int max_bias_columns) : impl_(std::make_unique<Impl>()) {
  CUDA_CHECK(cublasLtCreate(&impl_->handle));
  impl_->workspace_bytes = workspace_bytes;
  CUDA_CHECK(cudaMalloc(&impl_->workspace, workspace_bytes));
  impl_->max_bias_columns = max_bias_columns;
  CUDA_CHECK(cudaMalloc(&impl_->bias_scratch, bias_backward_scratch_bytes(max_bias_columns)));
}

MatmulContext::~MatmulContext() {
  // No throwing from a destructor: failures here are ignored deliberately.
  cudaFree(impl_->bias_scratch);
  cudaFree(impl_->workspace);
  cublasLtDestroy(impl_->handle);
}

namespace {

uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

template <typename T>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value) {
  CUDA_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

struct Gemm {
  bool trans_a = false, trans_b = false;
  uint64_t m = 0, n = 0, k = 0;
  const bf16* a = nullptr;
  int64_t lda = 0;
  const bf16* b = nullptr;
  int64_t ldb = 0;
  void* d = nullptr;  // also C (beta != 0 accumulates into it)
  int64_t ldd = 0;
  cudaDataType_t d_type = CUDA_R_16BF;
  float beta = 0.0f;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const bf16* bias = nullptr;
  bf16* aux = nullptr;  // pre-GELU output of the GELU_AUX epilogues, ld = ldd
};

void run_gemm(MatmulContext::Impl& ctx, const Gemm& g, cudaStream_t stream) {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a_layout = nullptr, b_layout = nullptr, d_layout = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  CUDA_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(desc, CUBLASLT_MATMUL_DESC_TRANSA, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_desc(desc, CUBLASLT_MATMUL_DESC_TRANSB, g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, g.epilogue);
  if (g.bias) set_desc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(g.bias));
  if (g.aux) {
    // GELU_AUX(_BIAS): aux is the pre-GELU matrix, laid out like D (m x n, column-major), so its
    // leading dimension is D's (int64_t; cuBLASLt wants it >= m and divisible by 8: m = OC, a
    // multiple of 8). Its element type is left at the default (-1), which for GELU is D's type:
    // bf16 here, as gelu_backward reads it. The pointer is set before the heuristic query, which
    // takes its alignment from it (align_aux is part of the cache key below).
    set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, static_cast<void*>(g.aux));
    set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.ldd);
  }
  // Stored shapes (column-major): op(A) is m x k, op(B) is k x n.
  CUDA_CHECK(cublasLtMatrixLayoutCreate(&a_layout, CUDA_R_16BF, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda));
  CUDA_CHECK(cublasLtMatrixLayoutCreate(&b_layout, CUDA_R_16BF, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb));
  CUDA_CHECK(cublasLtMatrixLayoutCreate(&d_layout, g.d_type, g.m, g.n, g.ldd));

  const uint32_t align_a = alignment_of(g.a), align_b = alignment_of(g.b), align_d = alignment_of(g.d);
  const uint32_t align_aux = g.aux ? alignment_of(g.aux) : 256;
  const AlgoKey key{int(g.trans_a) | int(g.trans_b) << 1, int(g.epilogue), g.m, g.n, g.k, int(g.d_type),
                    g.beta != 0.0f, g.bias != nullptr, align_a, align_b, align_d, align_aux};
  auto it = ctx.algos.find(key);
  if (it == ctx.algos.end()) {
    CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = ctx.workspace_bytes;
    CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
    CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    CUDA_CHECK(cublasLtMatmulAlgoGetHeuristic(ctx.handle, desc, a_layout, b_layout, d_layout, d_layout, pref, 1,
                                              &result, &found));
    cublasLtMatmulPreferenceDestroy(pref);
    if (found == 0)
      cuda_check_fail(__FILE__, __LINE__, "cublasLtMatmulAlgoGetHeuristic",
                      ("no algorithm for m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) +
                       " k=" + std::to_string(g.k) + " epilogue=" + std::to_string(int(g.epilogue)))
                          .c_str());
    it = ctx.algos.emplace(key, result.algo).first;
  }
  const float alpha = 1.0f;
  CUDA_CHECK(cublasLtMatmul(ctx.handle, desc, &alpha, g.a, a_layout, g.b, b_layout, &g.beta, g.d, d_layout, g.d,
                            d_layout, &it->second, ctx.workspace, ctx.workspace_bytes, stream));
  cublasLtMatrixLayoutDestroy(d_layout);
  cublasLtMatrixLayoutDestroy(b_layout);
  cublasLtMatrixLayoutDestroy(a_layout);
  cublasLtMatmulDescDestroy(desc);
}

void check_dims(int IC, int OC) {
  if (IC % 8 != 0 || OC % 8 != 0)
    cuda_check_fail(__FILE__, __LINE__, "matmul", ("IC and OC must be multiples of 8, got IC=" + std::to_string(IC) +
                                                   " OC=" + std::to_string(OC)).c_str());
}

}  // namespace

void matmul_forward(MatmulContext& ctx, bf16* out, const bf16* inp, const bf16* weight, const bf16* bias,
                    int64_t M, int IC, int OC, cudaStream_t stream, bf16* pre_gelu) {
  if (M <= 0) return;
  check_dims(IC, OC);
  Gemm g;
  g.trans_a = true;
  g.m = uint64_t(OC), g.n = uint64_t(M), g.k = uint64_t(IC);
  g.a = weight, g.lda = IC;
  g.b = inp, g.ldb = IC;
  g.d = out, g.ldd = OC;
  g.bias = bias;
  if (pre_gelu) {
    g.epilogue = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    g.aux = pre_gelu;
  } else {
    g.epilogue = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  }
  run_gemm(ctx.impl(), g, stream);
}

void matmul_backward(MatmulContext& ctx, bf16* dinp, float* dweight, float* dbias, const bf16* dout,
                     const bf16* inp, const bf16* weight, int64_t M, int IC, int OC, cudaStream_t stream) {
  if (M <= 0) return;
  check_dims(IC, OC);
  if (dinp) {
    Gemm g;
    g.m = uint64_t(IC), g.n = uint64_t(M), g.k = uint64_t(OC);
    g.a = weight, g.lda = IC;
    g.b = dout, g.ldb = OC;
    g.d = dinp, g.ldd = IC;
    g.beta = 1.0f;
    run_gemm(ctx.impl(), g, stream);
  }
  if (dweight) {
    Gemm g;
    g.trans_b = true;
    g.m = uint64_t(IC), g.n = uint64_t(OC), g.k = uint64_t(M);
    g.a = inp, g.lda = IC;
    g.b = dout, g.ldb = OC;
    g.d = dweight, g.ldd = IC;
    g.d_type = CUDA_R_32F;
    g.beta = 1.0f;
    run_gemm(ctx.impl(), g, stream);
  }
  if (dbias) {
    MatmulContext::Impl& c = ctx.impl();
    if (OC > c.max_bias_columns)
      cuda_check_fail(__FILE__, __LINE__, "matmul_backward", "OC exceeds the MatmulContext's max_bias_columns");
    column_sums(nullptr, dbias, dout, nullptr, nullptr, nullptr, M, OC, c.bias_scratch, stream);
  }
}

}  // namespace ulysses::cuda
