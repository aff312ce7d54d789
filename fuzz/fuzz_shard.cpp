// libFuzzer target: the llm.c token shard reader and the data loader (core/data.cpp).
// The input bytes are the shard file (held in a memfd, no disk I/O). Properties: the reader
// either accepts the file or throws UserError; an accepted shard's tokens are all readable;
// a DataLoader over it either throws UserError or yields tokens < vocab_size.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/data.h"
#include "core/base/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("fuzz_shard", 0);
  if (fd < 0) std::abort();
  if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != ssize_t(size)) std::abort();
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    ulysses::TokenShard shard(path);
    uint64_t sum = 0;
    for (int64_t i = 0; i < shard.size(); ++i) sum += shard.tokens()[i];
    if (sum == 0xFFFFFFFFFFFFFFFFull) std::abort();  // keeps the reads
  } catch (const ulysses::UserError&) {
    return 0;
  }
  ulysses::DataConfig cfg;
  cfg.train = {path};
  const int B = 1, N = 8, vocab = 512;
  try {
    ulysses::DataLoader loader(cfg, "train", B, N, {0, 2, 0, 1}, /*seed=*/1, vocab);
    std::vector<int32_t> tok(N / 2), tgt(N / 2), pos(N / 2);
    for (int i = 0; i < 3; ++i) {
      loader.next(tok.data(), tgt.data(), pos.data());
      for (int j = 0; j < N / 2; ++j)
        if (tok[size_t(j)] < 0 || tok[size_t(j)] >= vocab || tgt[size_t(j)] < 0 || tgt[size_t(j)] >= vocab) std::abort();
    }
  } catch (const ulysses::UserError&) {
  }
  return 0;
}
