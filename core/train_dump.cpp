// `ulysses dump` (core/trainer.h, run_train with a dump path): the set-up and initial state of a
// training run, then the first training micro-batch's tokens, logits, mean loss and gradients,
// written by rank 0 as a safetensors file (core/hf.h) for comparison with transformers.
#include <spdlog/spdlog.h>

#include "core/hf.h"
#include "core/train_run.h"

namespace ulysses {

// Every rank holds the same weights; rank r of the SP group holds
// tokens r T .. r T + T - 1 of each sequence (positions say which), so the full [B, N, V] logits
// are each rank's rows placed by position and summed over the world (the other entries are 0).
void dump_first_batch(TrainRun& run, const std::string& path) {
  const Config& cfg = run.cfg;
  GPT& model = run.model;
  DataLoader& data = run.train_data;
  Communicator& host = run.host();
  const GPTShape& s = model.shape();
  const int B = model.run_shape().B, N = model.run_shape().N, T = model.run_shape().T();
  const size_t rows = size_t(B) * size_t(T), V = size_t(s.V), Vp = size_t(s.Vp);
  std::vector<int32_t> tok(rows), tgt(rows), pos(rows);
  data.next(tok.data(), tgt.data(), pos.data());

  std::vector<float> local(rows * Vp);  // [B*T, Vp]
  model.forward_all_logits(tok.data(), pos.data(), local.data());
  std::vector<float> logits(size_t(B) * size_t(N) * V, 0.0f);                 // [B, N, V]
  std::vector<float> tokens(size_t(B) * size_t(N), 0.0f), targets(tokens.size(), 0.0f);  // [B, N]
  for (size_t r = 0; r < rows; ++r) {
    const size_t at = (r / size_t(T)) * size_t(N) + size_t(pos[r]);  // b * N + n
    std::copy(local.begin() + std::ptrdiff_t(r * Vp), local.begin() + std::ptrdiff_t(r * Vp + V),
              logits.begin() + std::ptrdiff_t(at * V));
    tokens[at] = float(tok[r]);
    targets[at] = float(tgt[r]);
  }
  host.all_reduce(logits.data(), logits.data(), logits.size(), DType::f32, ReduceOp::sum);
  host.all_reduce(tokens.data(), tokens.data(), tokens.size(), DType::f32, ReduceOp::sum);
  host.all_reduce(targets.data(), targets.data(), targets.size(), DType::f32, ReduceOp::sum);

  model.zero_grad();
  int64_t count = 0;
  double sums[2] = {model.forward_backward(tok.data(), tgt.data(), pos.data(), &count), 0};
  sums[1] = double(count);
  host.all_reduce(sums, sums, 2, DType::f64, ReduceOp::sum);
  const int64_t n_params = num_parameters(s);
  std::vector<float> grads(static_cast<size_t>(n_params));
  ops::copy(model.context(), host_tensor(grads.data(), n_params), model.grads_flat());
  ops::synchronize(model.context());
  host.all_reduce(grads.data(), grads.data(), grads.size(), DType::f32, ReduceOp::sum);
  const double tokens_total = std::max(1.0, sums[1]);
  for (float& g : grads) g = float(double(g) / tokens_total);

  on_root(host, [&] {
    std::vector<NamedTensor> out;
    out.push_back({"tokens", {B, N}, std::move(tokens)});
    out.push_back({"targets", {B, N}, std::move(targets)});
    out.push_back({"logits", {B, N, s.V}, std::move(logits)});
    out.push_back({"loss", {}, {float(sums[0] / tokens_total)}});
    for (NamedTensor& g : hf_gpt2_tensors(cfg.model, grads.data(), grads.size())) {
      g.name = "grad." + g.name;
      out.push_back(std::move(g));
    }
    write_safetensors(path, out, {{"format", "ulysses-dump"}, {"loss", fmt::format("{}", sums[0] / tokens_total)}});
    spdlog::info("dump: loss {:.6f} over {} tokens; logits, loss and gradients written to {}", sums[0] / tokens_total,
                 int64_t(sums[1]), path);
  });
}


}  // namespace ulysses
