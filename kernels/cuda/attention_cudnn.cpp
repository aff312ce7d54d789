// Causal attention through cuDNN 9's fused SDPA engines, built with the cuDNN backend (graph)
// API: one operation graph per direction and shape, expressed in the operation pattern that
// cuDNN's fused flash-attention engines recognise (the pattern cudnn-frontend's SDPA node
// lowers to), finalized once into an execution plan and then executed with a variant pack of
// device pointers. See attention_cudnn.h for the layouts and the contract.
//
// Forward graph (tensors [b, h, s_q, s_kv]; every intermediate is virtual, i.e. on chip):
//   S = Q · Kᵀ;  S *= scale;  S = (row >= col) ? S : -inf            (causal, top-left)
//   m = rowmax(S);  E = exp(S - m);  l = rowsum(E);  Stats = m + log(l)   -> lse
//   O = (E / l) · V                                                    (E / l in bf16)
// Backward graph:
//   Dsum = rowsum(dO ∘ O)                     (fp32, a non-virtual tensor in our workspace)
//   P = exp(scale · Q·Kᵀ - Stats), causal-masked;  dV = Pᵀ · dO
//   dS = P ∘ (dO · Vᵀ - Dsum) · scale;  dK = dSᵀ · Q;  dQ = dS · K
//   (dQ accumulated in fp32 in a non-virtual workspace tensor, then copied to bf16)
//   GQA: dK, dV are first formed per query head ([b, Hq, s, d], virtual) and summed over each
//   group of Hq/Hkv heads by a reduction node in the same graph.
// Stats is cuDNN's natural-log logsumexp of the scaled, masked scores: exactly our lse.
#include "kernels/cuda/attention_cudnn.h"

#include <cudnn.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/base/error.h"
#include "kernels/cuda/cuda_check.h"

namespace ulysses::cuda {
namespace {

// A failed cuDNN call: throws naming the step (what was being built or run), the call, cuDNN's
// status and its last error message (which names the offending attribute or check).
[[noreturn]] void cudnn_fail(const char* file, int line, const std::string& step, const char* call,
                             cudnnStatus_t status) {
  char last[2048] = {0};
  cudnnGetLastErrorString(last, sizeof last);
  std::string what = step + ": " + cudnnGetErrorString(status);
  if (last[0] != 0) what += " (" + std::string(last) + ")";
  cuda_check_fail(file, line, call, what.c_str());
}

// CUDNN_CHECK with the step in the message; `step` is a std::string expression.
#define CUDNN_STEP_CHECK(step, call)                                                      \
  do {                                                                                    \
    const cudnnStatus_t ulysses_cudnn_status_ = (call);                                   \
    if (ulysses_cudnn_status_ != CUDNN_STATUS_SUCCESS)                                    \
      cudnn_fail(__FILE__, __LINE__, (step), #call, ulysses_cudnn_status_);               \
  } while (0)

bool is_not_supported(cudnnStatus_t s) { return CUDNN_STATUS_CATEGORY(s) == CUDNN_STATUS_NOT_SUPPORTED; }

std::string last_cudnn_message() {
  char last[2048] = {0};
  cudnnGetLastErrorString(last, sizeof last);
  return last;
}

std::string version_string(size_t v) {  // 91900 -> "9.19.0"
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

// Owner of one backend descriptor (destroyed with it).
class Descriptor {
 public:
  Descriptor(cudnnBackendDescriptorType_t type, const char* step) {
    CUDNN_STEP_CHECK(std::string(step), cudnnBackendCreateDescriptor(type, &d_));
  }
  ~Descriptor() {
    if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);  // not checked: destructors must not throw
  }
  Descriptor(Descriptor&& o) noexcept : d_(std::exchange(o.d_, nullptr)) {}
  Descriptor& operator=(Descriptor&&) = delete;
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

using Dims = std::array<int64_t, 4>;

// Unique ids of the tensors the caller passes in the variant pack (virtual ones start at 100).
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kOne, kdO, kdQ, kdK, kdV, kSoftmaxSum, kdQAccum, kUidEnd,
};
// Pointers by uid for one call: device pointers, or host pointers for the by-value scalars.
using Pointers = std::array<void*, kUidEnd>;

// A finalized execution plan and everything it was built from (kept alive with it), its device
// workspace, and the host scalars passed by value.
struct Plan {
  std::vector<Descriptor> keep;  // in creation order; destroyed in reverse
  cudnnBackendDescriptor_t plan = nullptr;
  std::vector<int64_t> uids;     // the variant pack's tensors, in the order execute() fills them
  void* workspace = nullptr;     // device: [dQ accumulator | softmax_sum | cuDNN's workspace]
  size_t workspace_bytes = 0;
  size_t dq_accum_offset = 0, dq_accum_bytes = 0, softmax_sum_offset = 0, cudnn_offset = 0;
  float scale = 0.0f, neg_inf = -std::numeric_limits<float>::infinity(), one = 1.0f;

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (workspace != nullptr) cudaFree(workspace);  // not checked: destructors must not throw
    while (!keep.empty()) keep.pop_back();
  }
};

// Builds one operation graph node by node. Tensor descriptors are created here and owned by the
// Plan the graph ends up in.
class GraphBuilder {
 public:
  GraphBuilder(Plan& plan, cudnnHandle_t handle, std::string step)
      : plan_(plan), handle_(handle), step_(std::move(step)) {}

  // A tensor in the variant pack (device memory, or a host scalar when by_value).
  cudnnBackendDescriptor_t tensor(int64_t uid, cudnnDataType_t type, const Dims& dims, const Dims& strides,
                                  bool by_value = false) {
    plan_.uids.push_back(uid);
    return make_tensor(uid, type, dims, strides, /*is_virtual=*/false, by_value);
  }
  // An intermediate of the fused kernel, never in memory.
  cudnnBackendDescriptor_t virtual_tensor(cudnnDataType_t type, const Dims& dims, const Dims& strides) {
    return make_tensor(next_virtual_uid_++, type, dims, strides, /*is_virtual=*/true, false);
  }

  // c = a · b (batched over the first two dimensions, broadcast for GQA), fp32 accumulation.
  void matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c) {
    const std::string what = step_ + " (matmul)";
    cudnnBackendDescriptor_t desc = own(CUDNN_BACKEND_MATMUL_DESCRIPTOR, what);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    set(desc, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp, what);
    finalize(desc, what);
    cudnnBackendDescriptor_t op = own(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, what);
    set(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &a, what);
    set(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b, what);
    set(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &c, what);
    set(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &desc, what);
    finalize(op, what);
    ops_.push_back(op);
  }

  // y = mode(x [, b [, t]]) elementwise with broadcasting; `math` is the compute type. b is the
  // second operand, t the third (BINARY_SELECT: y = t ? x : b). axis only for GEN_INDEX.
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t math, cudnnBackendDescriptor_t x,
                 cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t, cudnnBackendDescriptor_t y,
                 int64_t axis = -1) {
    const std::string what = step_ + " (pointwise mode " + std::to_string(int(mode)) + ")";
    cudnnBackendDescriptor_t desc = own(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, what);
    set(desc, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode, what);
    set(desc, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &math, what);
    if (mode == CUDNN_POINTWISE_GEN_INDEX) set(desc, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis, what);
    finalize(desc, what);
    cudnnBackendDescriptor_t op = own(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, what);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &desc, what);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x, what);
    if (b != nullptr) set(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b, what);
    if (t != nullptr) set(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &t, what);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y, what);
    finalize(op, what);
    ops_.push_back(op);
  }
  void unary(cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    pointwise(mode, CUDNN_DATA_FLOAT, x, nullptr, nullptr, y);
  }
  void binary(cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t b,
              cudnnBackendDescriptor_t y) {
    pointwise(mode, CUDNN_DATA_FLOAT, x, b, nullptr, y);
  }

  // y = reduce(x) over the dimensions where y has extent 1 (and over head groups for GQA).
  void reduction(cudnnReduceTensorOp_t reduce_op, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    const std::string what = step_ + " (reduction)";
    cudnnBackendDescriptor_t desc = own(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, what);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    set(desc, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce_op, what);
    set(desc, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp, what);
    finalize(desc, what);
    cudnnBackendDescriptor_t op = own(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, what);
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x, what);
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y, what);
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &desc, what);
    finalize(op, what);
    ops_.push_back(op);
  }

  // y = x seen with other dimensions/strides (a transpose of the last two dimensions here).
  void reshape(cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    const std::string what = step_ + " (reshape)";
    cudnnBackendDescriptor_t op = own(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, what);
    set(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x, what);
    set(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y, what);
    finalize(op, what);
    ops_.push_back(op);
  }

  // Finalizes the operation graph, asks cuDNN's heuristics (mode A, then the fallback list) for
  // engine configurations and finalizes the first execution plan that works into plan_.plan.
  // Returns an empty string on success, otherwise why no engine could run the graph.
  std::string build_plan() {
    const std::string what = step_ + " (operation graph)";
    cudnnBackendDescriptor_t graph = own(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, what);
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle_, what);
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(ops_.size()), ops_.data(), what);
    const cudnnStatus_t graph_status = cudnnBackendFinalize(graph);
    if (is_not_supported(graph_status))
      return std::string("the operation graph was rejected: ") + cudnnGetErrorString(graph_status) + " (" +
             last_cudnn_message() + ")";
    CUDNN_STEP_CHECK(what, graph_status);

    std::string last_failure = "the heuristics offered no engine";
    int tried = 0;
    for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      const std::string hwhat = step_ + " (engine heuristics)";
      cudnnBackendDescriptor_t heur = own(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, hwhat);
      set(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph, hwhat);
      set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode, hwhat);
      const cudnnStatus_t heur_status = cudnnBackendFinalize(heur);
      if (is_not_supported(heur_status)) continue;
      CUDNN_STEP_CHECK(hwhat, heur_status);
      int64_t count = 0;
      CUDNN_STEP_CHECK(hwhat, cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
      if (count <= 0) continue;
      std::vector<cudnnBackendDescriptor_t> configs;
      for (int64_t i = 0; i < count; ++i) configs.push_back(own(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, hwhat));
      int64_t returned = 0;
      CUDNN_STEP_CHECK(hwhat, cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned,
                                                       configs.data()));
      for (int64_t i = 0; i < returned; ++i) {
        const std::string pwhat = step_ + " (execution plan)";
        cudnnBackendDescriptor_t plan = own(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, pwhat);
        set(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle_, pwhat);
        set(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &configs[size_t(i)], pwhat);
        ++tried;
        const cudnnStatus_t plan_status = cudnnBackendFinalize(plan);
        if (plan_status == CUDNN_STATUS_SUCCESS) {
          plan_.plan = plan;
          return "";
        }
        last_failure = std::string("the last of ") + std::to_string(tried) + " engine configurations failed with " +
                       cudnnGetErrorString(plan_status) + " (" + last_cudnn_message() + ")";
      }
    }
    return last_failure;
  }

 private:
  cudnnBackendDescriptor_t own(cudnnBackendDescriptorType_t type, const std::string& what) {
    plan_.keep.emplace_back(type, what.c_str());
    return plan_.keep.back().get();
  }
  void set(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type,
           int64_t count, const void* values, const std::string& what) {
    CUDNN_STEP_CHECK(what + " attribute " + std::to_string(int(name)),
                     cudnnBackendSetAttribute(d, name, type, count, values));
  }
  void finalize(cudnnBackendDescriptor_t d, const std::string& what) {
    CUDNN_STEP_CHECK(what + " finalize", cudnnBackendFinalize(d));
  }
  cudnnBackendDescriptor_t make_tensor(int64_t uid, cudnnDataType_t type, const Dims& dims, const Dims& strides,
                                       bool is_virtual, bool by_value) {
    const std::string what = step_ + " (tensor uid " + std::to_string(uid) + ")";
    cudnnBackendDescriptor_t t = own(CUDNN_BACKEND_TENSOR_DESCRIPTOR, what);
    const int64_t alignment = 16;
    set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type, what);
    set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data(), what);
    set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data(), what);
    set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid, what);
    set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment, what);
    set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual, what);
    if (by_value) set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value, what);
    finalize(t, what);
    return t;
  }

  Plan& plan_;
  cudnnHandle_t handle_;
  std::string step_;
  std::vector<cudnnBackendDescriptor_t> ops_;  // in topological order
  int64_t next_virtual_uid_ = 100;
};

// The shapes of one attention call, and the dimensions/strides of its tensors.
struct Shape {
  int B, N, Hq, Hkv, d;
  bool operator<(const Shape& o) const {
    return std::tie(B, N, Hq, Hkv, d) < std::tie(o.B, o.N, o.Hq, o.Hkv, o.d);
  }
  int64_t htot() const { return int64_t(Hq) + 2 * int64_t(Hkv); }
  std::string str() const {
    return "B=" + std::to_string(B) + " N=" + std::to_string(N) + " Hq=" + std::to_string(Hq) +
           " Hkv=" + std::to_string(Hkv) + " d=" + std::to_string(d);
  }
  // q, k or v heads inside qkv [B, N, Htot, d] (or dq, dk, dv inside dqkv): [B, heads, N, d]
  Dims heads_dims(int heads) const { return {B, heads, N, d}; }
  Dims qkv_strides() const { return {int64_t(N) * htot() * d, d, htot() * d, 1}; }
  // k or v heads seen transposed, [B, heads, d, N]
  Dims heads_t_dims(int heads) const { return {B, heads, d, N}; }
  Dims qkv_t_strides() const { return {int64_t(N) * htot() * d, d, 1, htot() * d}; }
  // out, dout: [B, N, Hq, d] seen as [B, Hq, N, d]
  Dims out_strides() const { return {int64_t(N) * Hq * d, d, int64_t(Hq) * d, 1}; }
  // per-query-head packed [B, Hq, N, d] (dQ accumulator, per-head dK / dV before the GQA sum)
  Dims packed_strides() const { return {int64_t(Hq) * N * d, int64_t(N) * d, d, 1}; }
  // scores [B, Hq, N, N] and their transpose
  Dims scores_dims() const { return {B, Hq, N, N}; }
  Dims scores_strides() const { return {int64_t(Hq) * N * N, int64_t(N) * N, N, 1}; }
  Dims scores_t_strides() const { return {int64_t(Hq) * N * N, int64_t(N) * N, 1, N}; }
  // one value per row: [B, Hq, N, 1] (lse, softmax statistics)
  Dims rows_dims() const { return {B, Hq, N, 1}; }
  Dims rows_strides() const { return {int64_t(Hq) * N, N, 1, 1}; }
};

const Dims kScalarDims = {1, 1, 1, 1};

// S = (row >= col) ? S : -inf, with row and col the indices along dims 2 and 3.
cudnnBackendDescriptor_t causal_mask(GraphBuilder& g, const Shape& s, cudnnBackendDescriptor_t scores,
                                     cudnnBackendDescriptor_t neg_inf) {
  cudnnBackendDescriptor_t row = g.virtual_tensor(CUDNN_DATA_INT32, s.scores_dims(), s.scores_strides());
  cudnnBackendDescriptor_t col = g.virtual_tensor(CUDNN_DATA_INT32, s.scores_dims(), s.scores_strides());
  cudnnBackendDescriptor_t keep = g.virtual_tensor(CUDNN_DATA_BOOLEAN, s.scores_dims(), s.scores_strides());
  cudnnBackendDescriptor_t masked = g.virtual_tensor(CUDNN_DATA_FLOAT, s.scores_dims(), s.scores_strides());
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, scores, nullptr, nullptr, row, /*axis=*/2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, scores, nullptr, nullptr, col, /*axis=*/3);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, col, nullptr, keep);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, scores, neg_inf, keep, masked);
  return masked;
}

void build_forward(Plan& plan, cudnnHandle_t handle, const Shape& s) {
  GraphBuilder g(plan, handle, "building the SDPA forward graph for " + s.str());
  auto q = g.tensor(kQ, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hq), s.qkv_strides());
  auto kt = g.tensor(kK, CUDNN_DATA_BFLOAT16, s.heads_t_dims(s.Hkv), s.qkv_t_strides());
  auto v = g.tensor(kV, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hkv), s.qkv_strides());
  auto o = g.tensor(kO, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hq), s.out_strides());
  auto stats = g.tensor(kStats, CUDNN_DATA_FLOAT, s.rows_dims(), s.rows_strides());
  auto scale = g.tensor(kScale, CUDNN_DATA_FLOAT, kScalarDims, kScalarDims, /*by_value=*/true);
  auto neg_inf = g.tensor(kNegInf, CUDNN_DATA_FLOAT, kScalarDims, kScalarDims, /*by_value=*/true);
  auto scores = [&](cudnnDataType_t type) { return g.virtual_tensor(type, s.scores_dims(), s.scores_strides()); };
  auto rows = [&] { return g.virtual_tensor(CUDNN_DATA_FLOAT, s.rows_dims(), s.rows_strides()); };

  auto qk = scores(CUDNN_DATA_FLOAT);
  g.matmul(q, kt, qk);                                            // S = Q·Kᵀ
  auto scaled = scores(CUDNN_DATA_FLOAT);
  g.binary(CUDNN_POINTWISE_MUL, qk, scale, scaled);               // S *= 1/sqrt(d)
  auto masked = causal_mask(g, s, scaled, neg_inf);
  auto row_max = rows();
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, masked, row_max);          // m
  auto shifted = scores(CUDNN_DATA_FLOAT);
  g.binary(CUDNN_POINTWISE_SUB, masked, row_max, shifted);
  auto e = scores(CUDNN_DATA_FLOAT);
  g.unary(CUDNN_POINTWISE_EXP, shifted, e);                       // E = exp(S - m)
  auto row_sum = rows();
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, row_sum);               // l
  auto log_sum = rows();
  g.unary(CUDNN_POINTWISE_LOG, row_sum, log_sum);
  g.binary(CUDNN_POINTWISE_ADD, row_max, log_sum, stats);         // lse = m + log(l)
  auto p = scores(CUDNN_DATA_BFLOAT16);                           // bf16: the second matmul's A
  g.binary(CUDNN_POINTWISE_DIV, e, row_sum, p);                   // P = E / l
  g.matmul(p, v, o);                                              // O = P·V

  const std::string why = g.build_plan();
  if (!why.empty())
    throw_user_error("runtime.attention: cudnn: no cuDNN {} engine runs the causal SDPA forward for {}: {}",
                     version_string(cudnnGetVersion()), s.str(), why);
}

// One function over ~80 lines on purpose: it is the backward graph written out node by node in
// the order of the maths (like build_forward above), and splitting it would scatter one graph.
void build_backward(Plan& plan, cudnnHandle_t handle, const Shape& s) {
  GraphBuilder g(plan, handle, "building the SDPA backward graph for " + s.str());
  auto q = g.tensor(kQ, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hq), s.qkv_strides());
  auto kt = g.tensor(kK, CUDNN_DATA_BFLOAT16, s.heads_t_dims(s.Hkv), s.qkv_t_strides());
  auto vt = g.tensor(kV, CUDNN_DATA_BFLOAT16, s.heads_t_dims(s.Hkv), s.qkv_t_strides());
  auto o = g.tensor(kO, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hq), s.out_strides());
  auto d_o = g.tensor(kdO, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hq), s.out_strides());
  auto stats = g.tensor(kStats, CUDNN_DATA_FLOAT, s.rows_dims(), s.rows_strides());
  auto d_q = g.tensor(kdQ, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hq), s.qkv_strides());
  auto d_k = g.tensor(kdK, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hkv), s.qkv_strides());
  auto d_v = g.tensor(kdV, CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hkv), s.qkv_strides());
  auto scale = g.tensor(kScale, CUDNN_DATA_FLOAT, kScalarDims, kScalarDims, /*by_value=*/true);
  auto neg_inf = g.tensor(kNegInf, CUDNN_DATA_FLOAT, kScalarDims, kScalarDims, /*by_value=*/true);
  auto one = g.tensor(kOne, CUDNN_DATA_FLOAT, kScalarDims, kScalarDims, /*by_value=*/true);
  // fp32 tensors the engine needs in memory (in our workspace): rowsum(dO ∘ O) and dQ's accumulator
  auto softmax_sum = g.tensor(kSoftmaxSum, CUDNN_DATA_FLOAT, s.rows_dims(), s.rows_strides());
  auto dq_accum = g.tensor(kdQAccum, CUDNN_DATA_FLOAT, s.heads_dims(s.Hq), s.packed_strides());
  auto scores = [&](cudnnDataType_t type) { return g.virtual_tensor(type, s.scores_dims(), s.scores_strides()); };
  auto scores_t = [&] { return g.virtual_tensor(CUDNN_DATA_BFLOAT16, s.scores_dims(), s.scores_t_strides()); };

  // softmax_sum = rowsum(dO ∘ O) (times 1: no dropout)
  auto do_o = g.virtual_tensor(CUDNN_DATA_FLOAT, s.heads_dims(s.Hq), s.out_strides());
  g.binary(CUDNN_POINTWISE_MUL, d_o, o, do_o);
  auto do_o_sum = g.virtual_tensor(CUDNN_DATA_FLOAT, s.rows_dims(), s.rows_strides());
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, do_o, do_o_sum);
  g.binary(CUDNN_POINTWISE_MUL, do_o_sum, one, softmax_sum);

  // P = exp(scale·Q·Kᵀ - lse), causal
  auto qk = scores(CUDNN_DATA_FLOAT);
  g.matmul(q, kt, qk);
  auto scaled = scores(CUDNN_DATA_FLOAT);
  g.binary(CUDNN_POINTWISE_MUL, qk, scale, scaled);
  auto shifted = scores(CUDNN_DATA_FLOAT);
  g.binary(CUDNN_POINTWISE_SUB, scaled, stats, shifted);
  auto masked = causal_mask(g, s, shifted, neg_inf);
  auto p = scores(CUDNN_DATA_FLOAT);
  g.unary(CUDNN_POINTWISE_EXP, masked, p);

  // dV = Pᵀ·dO (per query head, then summed over each GQA group)
  const bool gqa = s.Hq != s.Hkv;
  auto p_t = scores_t();
  g.reshape(p, p_t);
  if (!gqa) {
    g.matmul(p_t, d_o, d_v);
  } else {
    auto d_v_heads = g.virtual_tensor(CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hq), s.packed_strides());
    g.matmul(p_t, d_o, d_v_heads);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, d_v_heads, d_v);
  }

  // dS = P ∘ (dO·Vᵀ - softmax_sum) · scale
  auto dp = scores(CUDNN_DATA_FLOAT);
  g.matmul(d_o, vt, dp);
  auto dp_centered = scores(CUDNN_DATA_FLOAT);
  g.binary(CUDNN_POINTWISE_SUB, dp, softmax_sum, dp_centered);
  auto ds_unscaled = scores(CUDNN_DATA_FLOAT);
  g.binary(CUDNN_POINTWISE_MUL, dp_centered, p, ds_unscaled);
  auto ds = scores(CUDNN_DATA_FLOAT);
  g.binary(CUDNN_POINTWISE_MUL, ds_unscaled, scale, ds);

  // dK = dSᵀ·Q (per query head, then summed over each GQA group)
  auto ds_t = scores_t();
  g.reshape(ds, ds_t);
  if (!gqa) {
    g.matmul(ds_t, q, d_k);
  } else {
    auto d_k_heads = g.virtual_tensor(CUDNN_DATA_BFLOAT16, s.heads_dims(s.Hq), s.packed_strides());
    g.matmul(ds_t, q, d_k_heads);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, d_k_heads, d_k);
  }

  // dQ = dS·K, accumulated in fp32, then rounded into dqkv
  auto k = g.virtual_tensor(CUDNN_DATA_FLOAT, s.heads_dims(s.Hkv), s.qkv_strides());
  g.reshape(kt, k);
  g.matmul(ds, k, dq_accum);
  g.unary(CUDNN_POINTWISE_IDENTITY, dq_accum, d_q);

  const std::string why = g.build_plan();
  if (!why.empty())
    throw_user_error("runtime.attention: cudnn: no cuDNN {} engine runs the causal SDPA backward for {}: {}",
                     version_string(cudnnGetVersion()), s.str(), why);
}

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

}  // namespace

struct CudnnAttention::Impl {
  cudnnHandle_t handle = nullptr;
  size_t version = 0;  // of the cuDNN library loaded at run time
  std::map<Shape, std::unique_ptr<Plan>> forward_plans, backward_plans;

  // Checks what cuDNN's SDPA engines require of the call (bad input: a UserError naming it).
  // pointers: every tensor the call passes (each described to cuDNN as 16-byte aligned)
  void check(bool backward, const Shape& s, std::initializer_list<const void*> pointers) const {
    const char* direction = backward ? "backward" : "forward";
    std::string why;
    if (s.B <= 0 || s.N <= 0 || s.Hq <= 0 || s.Hkv <= 0) why = "all sizes must be positive";
    else if (s.Hq % s.Hkv != 0) why = "Hq must be a multiple of Hkv";
    else if (s.d % 8 != 0 || s.d > 128) why = "the head dimension must be a multiple of 8 and at most 128";
    else if (std::any_of(pointers.begin(), pointers.end(),
                         [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; }))
      why = "qkv, out, lse (and dout, dqkv) must be 16-byte aligned";
    else if (backward && s.N < 2) why = "cuDNN has no SDPA backward for N = 1";
    else if (backward && s.N % 128 != 0 && version < 91600)
      why = "cuDNN before 9.16 needs N to be a multiple of 128 in the SDPA backward";
    if (!why.empty())
      throw_user_error("runtime.attention: cudnn: the causal SDPA {} cannot run {} with cuDNN {}: {}", direction,
                       s.str(), version_string(version), why);
  }

  // The plan for the shape, built (and its workspace allocated) on first use.
  Plan& plan(bool backward, const Shape& s) {
    auto& plans = backward ? backward_plans : forward_plans;
    auto it = plans.find(s);
    if (it != plans.end()) return *it->second;
    auto p = std::make_unique<Plan>();
    p->scale = 1.0f / std::sqrt(float(s.d));
    // the masked scores' fill: -inf from 9.10 on; earlier softmax engines want the lowest finite
    // float instead (-inf - (-inf) would make NaN in a fully masked tile)
    if (version < 91000) p->neg_inf = std::numeric_limits<float>::lowest();
    if (backward) build_backward(*p, handle, s);
    else build_forward(*p, handle, s);
    int64_t cudnn_bytes = 0, count = 0;
    CUDNN_STEP_CHECK("querying the SDPA plan's workspace for " + s.str(),
                     cudnnBackendGetAttribute(p->plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                              &count, &cudnn_bytes));
    size_t bytes = 0;
    if (backward) {
      p->dq_accum_offset = 0;
      p->dq_accum_bytes = size_t(s.B) * s.Hq * s.N * s.d * sizeof(float);
      p->softmax_sum_offset = align_up(p->dq_accum_bytes);
      bytes = p->softmax_sum_offset + align_up(size_t(s.B) * s.Hq * s.N * sizeof(float));
    }
    p->cudnn_offset = bytes;
    p->workspace_bytes = bytes + size_t(cudnn_bytes);
    if (p->workspace_bytes > 0) CUDA_CHECK(cudaMalloc(&p->workspace, p->workspace_bytes));
    return *plans.emplace(s, std::move(p)).first->second;
  }

  // Runs the plan on `stream` with the pointers of its variant-pack tensors. Creates and destroys
  // one host-side variant-pack descriptor; the step strings are built only on failure.
  void execute(Plan& p, const Pointers& pointers, cudaStream_t stream, bool backward, const Shape& s) {
    const auto step = [&] { return std::string("running the SDPA ") + (backward ? "backward" : "forward") + " for " + s.str(); };
    void* data[kUidEnd];
    for (size_t i = 0; i < p.uids.size(); ++i) data[i] = pointers[size_t(p.uids[i])];
    void* cudnn_ws = p.workspace == nullptr ? nullptr : static_cast<char*>(p.workspace) + p.cudnn_offset;
    Descriptor pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, "creating the SDPA variant pack");
    CUDNN_STEP_CHECK(step(), cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
                                                      CUDNN_TYPE_INT64, int64_t(p.uids.size()), p.uids.data()));
    CUDNN_STEP_CHECK(step(), cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                                                      CUDNN_TYPE_VOID_PTR, int64_t(p.uids.size()), data));
    CUDNN_STEP_CHECK(step(), cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
                                                      CUDNN_TYPE_VOID_PTR, 1, &cudnn_ws));
    CUDNN_STEP_CHECK(step(), cudnnBackendFinalize(pack.get()));
    CUDNN_STEP_CHECK(step(), cudnnSetStream(handle, stream));
    CUDNN_STEP_CHECK(step(), cudnnBackendExecute(handle, p.plan, pack.get()));
  }
};

CudnnAttention::CudnnAttention() : impl_(std::make_unique<Impl>()) {
  impl_->version = cudnnGetVersion();
  if (impl_->version < 90000 || impl_->version == 91000 || impl_->version == 91001)
    throw_user_error("runtime.attention: cudnn needs cuDNN 9.0 or later other than 9.10.0/9.10.1 (known SDPA "
                     "bugs); the loaded library is {}",
                     version_string(impl_->version));
  CUDNN_STEP_CHECK(std::string("creating the cuDNN handle"), cudnnCreate(&impl_->handle));
}

size_t CudnnAttention::version() const { return impl_->version; }

CudnnAttention::~CudnnAttention() {
  impl_->forward_plans.clear();  // plans before the handle they were built with
  impl_->backward_plans.clear();
  if (impl_->handle != nullptr) cudnnDestroy(impl_->handle);  // not checked: destructors must not throw
}

void CudnnAttention::forward(bf16* out, float* lse, const bf16* qkv, int B, int N, int Hq, int Hkv, int d,
                             cudaStream_t stream) {
  const Shape s{B, N, Hq, Hkv, d};
  impl_->check(/*backward=*/false, s, {qkv, out, lse});
  Plan& p = impl_->plan(/*backward=*/false, s);
  bf16* qkv_mut = const_cast<bf16*>(qkv);  // the variant pack takes void*; cuDNN only reads inputs
  Pointers ptr{};
  ptr[kQ] = qkv_mut;                             // q heads of [B, N, Htot, d]
  ptr[kK] = qkv_mut + int64_t(Hq) * d;           // k heads
  ptr[kV] = qkv_mut + int64_t(Hq + Hkv) * d;     // v heads
  ptr[kO] = out;
  ptr[kStats] = lse;
  ptr[kScale] = &p.scale;                        // by value: host pointers
  ptr[kNegInf] = &p.neg_inf;
  impl_->execute(p, ptr, stream, /*backward=*/false, s);
}

void CudnnAttention::backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                              int B, int N, int Hq, int Hkv, int d, cudaStream_t stream) {
  const Shape s{B, N, Hq, Hkv, d};
  impl_->check(/*backward=*/true, s, {qkv, out, lse, dout, dqkv});
  Plan& p = impl_->plan(/*backward=*/true, s);
  char* ws = static_cast<char*>(p.workspace);
  // cuDNN from 9.6 zeroes the dQ accumulator itself; before, the caller had to.
  if (impl_->version < 90600) CUDA_CHECK(cudaMemsetAsync(ws + p.dq_accum_offset, 0, p.dq_accum_bytes, stream));
  bf16* qkv_mut = const_cast<bf16*>(qkv);  // the variant pack takes void*; cuDNN only reads inputs
  Pointers ptr{};
  ptr[kQ] = qkv_mut;                             // q heads of [B, N, Htot, d]
  ptr[kK] = qkv_mut + int64_t(Hq) * d;           // k heads
  ptr[kV] = qkv_mut + int64_t(Hq + Hkv) * d;     // v heads
  ptr[kO] = const_cast<bf16*>(out);
  ptr[kdO] = const_cast<bf16*>(dout);
  ptr[kStats] = const_cast<float*>(lse);
  ptr[kdQ] = dqkv;                               // the same head offsets in dqkv
  ptr[kdK] = dqkv + int64_t(Hq) * d;
  ptr[kdV] = dqkv + int64_t(Hq + Hkv) * d;
  ptr[kScale] = &p.scale;                        // by value: host pointers
  ptr[kNegInf] = &p.neg_inf;
  ptr[kOne] = &p.one;
  ptr[kSoftmaxSum] = ws + p.softmax_sum_offset;  // fp32 workspace tensors
  ptr[kdQAccum] = ws + p.dq_accum_offset;
  impl_->execute(p, ptr, stream, /*backward=*/true, s);
}

}  // namespace ulysses::cuda
