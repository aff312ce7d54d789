// The model the fuzz targets' seed files were written for (scripts/ci-extra.sh): 1 layer, 16
// wide, 2 heads, 32 positions, vocabulary 256.
#pragma once
#include "core/config.h"

namespace ulysses::fuzz {

inline ModelConfig seed_model() {
  ModelConfig m;
  m.n_layer = 1;
  m.n_embd = 16;
  m.n_head = 2;
  m.max_seq_len = 32;
  m.vocab_size = 256;
  return m;
}

}  // namespace ulysses::fuzz
