// The end-of-training sample (train.sample_tokens; core/train_run.h): text generated from the
// trained weights with a P = 1 copy of the model, decoded with data.tokenizer.
#include <algorithm>
#include <cmath>
#include <memory>
#include <random>

#include "core/tokenizer.h"
#include "core/train_run.h"

namespace ulysses {

namespace {

// Generates `n` tokens with a P = 1 copy of the model on the same device that shares the trained
// parameters (on cuda its own stream: the trained model's is synchronised first).
std::string generate(const Config& cfg, GPT& trained, Device device, Tokenizer& tok) {
  const int window = cfg.model.rope() ? cfg.train.seq_len : std::min(cfg.train.seq_len, cfg.model.max_seq_len);
  ops::synchronize(trained.context());
  GPT sampler(cfg.model, {1, window, 1, 0}, device, nullptr, &trained);
  if (device == Device::cuda) sampler.context().cudnn_attention = trained.context().cudnn_attention;
  const int V = cfg.model.vocab_size, Vp = cfg.model.padded_vocab_size();
  std::vector<int32_t> context = {tok.eot_token() >= 0 ? tok.eot_token() : int32_t('\n')};
  const size_t W = static_cast<size_t>(window);
  std::vector<int32_t> tokens(W, 0), positions(W);
  for (int i = 0; i < window; ++i) positions[size_t(i)] = i;
  std::vector<float> logits(static_cast<size_t>(Vp));
  std::mt19937_64 rng(cfg.train.seed + 1);
  std::vector<int32_t> generated;
  for (int i = 0; i < cfg.train.sample_tokens; ++i) {
    const size_t len = std::min(context.size(), size_t(window));
    std::copy(context.end() - std::ptrdiff_t(len), context.end(), tokens.begin());
    sampler.forward_logits(tokens.data(), positions.data(), int64_t(len) - 1, logits.data());
    // softmax with temperature over the real vocabulary, then an inverse-CDF draw
    const double temp = std::max(1e-4, cfg.train.sample_temperature);
    double maxv = -1e30;
    for (int v = 0; v < V; ++v) maxv = std::max(maxv, double(logits[size_t(v)]));
    double total = 0;
    std::vector<double> p(static_cast<size_t>(V));
    for (int v = 0; v < V; ++v) total += p[size_t(v)] = std::exp((logits[size_t(v)] - maxv) / temp);
    const double u = (double(rng() >> 11) * (1.0 / 9007199254740992.0)) * total;
    double acc = 0;
    int32_t next = V - 1;
    for (int v = 0; v < V; ++v)
      if ((acc += p[size_t(v)]) > u) {
        next = v;
        break;
      }
    context.push_back(next);
    generated.push_back(next);
  }
  return tok.decode(generated);
}

}  // namespace

std::string sample_text(const Config& cfg, GPT& trained, Device device) {
  std::unique_ptr<Tokenizer> tokenizer;
  if (cfg.data.tokenizer == "gpt2")
    tokenizer = std::make_unique<GPT2Tokenizer>(cfg.data.tokenizer_dir);
  else
    tokenizer = std::make_unique<ByteTokenizer>();
  return generate(cfg, trained, device, *tokenizer);
}

}  // namespace ulysses
