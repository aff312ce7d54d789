// Collective checks shared by the MPI test (host memory) and the NCCL test (device memory).
// Every rank's input is random but seeded by (rank, tag), so each rank can compute every other
// rank's input locally and with it a serial reference (in double) of what the collective must
// return. Buffers carry guard elements on both sides (filled with a sentinel) that must
// survive the collective: an overrun or a write into a gap fails the check.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "comm/communicator.h"

namespace ulysses::test {

// Where a communicator's buffers live: host memory for MPI, device memory for NCCL.
class TestMemory {
 public:
  virtual ~TestMemory() = default;
  virtual void* alloc(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  virtual void to_buffer(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void from_buffer(void* host_dst, const void* src, size_t bytes) = 0;
};

class HostMemory final : public TestMemory {
 public:
  void* alloc(size_t bytes) override { return ::operator new(bytes); }
  void release(void* p) override { ::operator delete(p); }
  void to_buffer(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void from_buffer(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
};

// n elements of T between two guards of kGuard sentinel elements.
template <typename T>
class TestBuffer {
 public:
  static constexpr size_t kGuard = 16;
  TestBuffer(TestMemory& m, const std::vector<T>& init) : m_(m), n_(init.size()) {
    std::vector<T> all(n_ + 2 * kGuard, sentinel());
    std::copy(init.begin(), init.end(), all.begin() + kGuard);
    base_ = m_.alloc(all.size() * sizeof(T));
    m_.to_buffer(base_, all.data(), all.size() * sizeof(T));
  }
  TestBuffer(TestMemory& m, size_t n) : TestBuffer(m, std::vector<T>(n, sentinel())) {}
  ~TestBuffer() { m_.release(base_); }
  TestBuffer(const TestBuffer&) = delete;
  TestBuffer& operator=(const TestBuffer&) = delete;

  void* data() { return static_cast<T*>(base_) + kGuard; }
  void* at(size_t i) { return static_cast<T*>(base_) + kGuard + i; }
  std::vector<T> read() {
    std::vector<T> all(n_ + 2 * kGuard);
    m_.from_buffer(all.data(), base_, all.size() * sizeof(T));
    for (size_t i = 0; i < kGuard; i++) {
      REQUIRE(same_bits(all[i], sentinel()));
      REQUIRE(same_bits(all[kGuard + n_ + i], sentinel()));
    }
    return std::vector<T>(all.begin() + kGuard, all.begin() + kGuard + n_);
  }
  static T sentinel() { return T(77); }
  static bool same_bits(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

 private:
  TestMemory& m_;
  size_t n_;
  void* base_ = nullptr;
};

// Rank `rank`'s input for the test `tag`: floats in [-1, 1], ints in [-1000, 1000], 2-byte
// words anywhere in [0, 65535] (raw bits, as bf16 travels through the movement collectives).
template <typename T>
std::vector<T> rank_data(int rank, int tag, size_t n) {
  std::mt19937_64 rng(uint64_t(rank + 1) * 1000003u + uint64_t(tag) * 7919u);
  std::vector<T> v(n);
  for (T& x : v) {
    if constexpr (std::is_floating_point_v<T>) {
      x = T(std::uniform_real_distribution<double>(-1.0, 1.0)(rng));
    } else if constexpr (std::is_same_v<T, uint16_t>) {
      x = T(std::uniform_int_distribution<int>(0, 65535)(rng));
      if (x == TestBuffer<T>::sentinel()) x = 0;  // keep the sentinel unique
    } else {
      x = T(std::uniform_int_distribution<int>(-1000, 1000)(rng));
    }
  }
  return v;
}

// Tolerance of a reduction of p values of type T against a double reference.
template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  return 0.0;
}

template <typename T>
void require_close(const std::vector<T>& got, const std::vector<double>& want, double tol,
                   const std::string& what) {
  REQUIRE(got.size() == want.size());
  size_t bad = 0, first_bad = 0;
  for (size_t i = 0; i < got.size(); i++) {
    if (!(std::fabs(double(got[i]) - want[i]) <= tol * std::max(1.0, std::fabs(want[i])))) {
      if (bad++ == 0) first_bad = i;
    }
  }
  INFO(what << ": " << bad << " of " << got.size() << " elements wrong; first at " << first_bad
            << (bad ? ": got " + std::to_string(double(got[first_bad])) + " want " +
                          std::to_string(want[first_bad])
                    : std::string()));
  REQUIRE(bad == 0);
}

// ---- the checks ----

// Block j of rank r's send goes to rank j: recv block i on rank r = block r of rank i's send.
template <typename T>
void check_all_to_all(Communicator& c, TestMemory& m, DType t, size_t n, int tag) {
  const int p = c.size(), r = c.rank();
  TestBuffer<T> send(m, rank_data<T>(r, tag, size_t(p) * n));
  TestBuffer<T> recv(m, size_t(p) * n);
  c.all_to_all(send.data(), recv.data(), n, t);
  c.synchronize();
  std::vector<double> want(size_t(p) * n);
  for (int i = 0; i < p; i++) {
    std::vector<T> theirs = rank_data<T>(i, tag, size_t(p) * n);
    for (size_t k = 0; k < n; k++) want[size_t(i) * n + k] = double(theirs[size_t(r) * n + k]);
  }
  require_close(recv.read(), want, 0.0, "all_to_all");
}

// Uneven all_to_allv: rank a sends count(a, b) elements to rank b, some of them 0. Blocks sit
// at gapped displacements in both buffers; the gaps must keep their sentinel.
inline size_t a2av_count(int a, int b) { return size_t((a * 3 + b * 5 + 1) % 4) * 3; }
struct A2avLayout {
  std::vector<size_t> counts, displs;
  size_t total = 0;
};
// Rank r's send layout (to_peers) or recv layout (from peers); block j starts after a gap of j+1.
inline A2avLayout a2av_layout(int r, int p, bool sending) {
  A2avLayout l;
  for (int j = 0; j < p; j++) {
    l.total += size_t(j) + 1;
    l.counts.push_back(sending ? a2av_count(r, j) : a2av_count(j, r));
    l.displs.push_back(l.total);
    l.total += l.counts.back();
  }
  l.total += 2;
  return l;
}

template <typename T>
void check_all_to_allv(Communicator& c, TestMemory& m, DType t, int tag) {
  const int p = c.size(), r = c.rank();
  A2avLayout s = a2av_layout(r, p, true), d = a2av_layout(r, p, false);
  TestBuffer<T> send(m, rank_data<T>(r, tag, s.total));
  TestBuffer<T> recv(m, d.total);
  c.all_to_allv(send.data(), s.counts.data(), s.displs.data(), recv.data(), d.counts.data(),
                d.displs.data(), t);
  c.synchronize();
  std::vector<double> want(d.total, double(TestBuffer<T>::sentinel()));
  for (int i = 0; i < p; i++) {
    A2avLayout theirs = a2av_layout(i, p, true);
    std::vector<T> their_data = rank_data<T>(i, tag, theirs.total);
    REQUIRE(theirs.counts[size_t(r)] == d.counts[size_t(i)]);
    for (size_t k = 0; k < d.counts[size_t(i)]; k++)
      want[d.displs[size_t(i)] + k] = double(their_data[theirs.displs[size_t(r)] + k]);
  }
  require_close(recv.read(), want, 0.0, "all_to_allv");
}

// Serial reference of an elementwise reduction of every rank's `tag` input of n elements.
template <typename T>
std::vector<double> reduce_reference(int p, int tag, size_t n, ReduceOp op) {
  std::vector<double> want(n, op == ReduceOp::max ? -1e300 : 0.0);
  for (int q = 0; q < p; q++) {
    std::vector<T> x = rank_data<T>(q, tag, n);
    for (size_t i = 0; i < n; i++)
      want[i] = op == ReduceOp::max ? std::max(want[i], double(x[i])) : want[i] + double(x[i]);
  }
  if (op == ReduceOp::avg)
    for (double& w : want) w /= double(p);
  return want;
}

template <typename T>
void check_all_reduce(Communicator& c, TestMemory& m, DType t, size_t n, ReduceOp op,
                      bool in_place, int tag) {
  const int p = c.size(), r = c.rank();
  TestBuffer<T> send(m, rank_data<T>(r, tag, n));
  TestBuffer<T> recv(m, n);
  void* out = in_place ? send.data() : recv.data();
  c.all_reduce(send.data(), out, n, t, op);
  c.synchronize();
  std::vector<double> want = reduce_reference<T>(p, tag, n, op);
  require_close(in_place ? send.read() : recv.read(), want, tolerance<T>(), "all_reduce");
  if (!in_place) {  // the input is untouched
    std::vector<T> mine = rank_data<T>(r, tag, n);
    std::vector<double> mine_d(mine.begin(), mine.end());
    require_close(send.read(), mine_d, 0.0, "all_reduce input");
  }
}

// send: p blocks of n; rank r receives the reduction of block r over all ranks. In place:
// recv == send and the result lands in the first n elements.
template <typename T>
void check_reduce_scatter(Communicator& c, TestMemory& m, DType t, size_t n, ReduceOp op,
                          bool in_place, int tag) {
  const int p = c.size(), r = c.rank();
  TestBuffer<T> send(m, rank_data<T>(r, tag, size_t(p) * n));
  TestBuffer<T> recv(m, n);
  c.reduce_scatter(send.data(), in_place ? send.data() : recv.data(), n, t, op);
  c.synchronize();
  std::vector<double> all = reduce_reference<T>(p, tag, size_t(p) * n, op);
  std::vector<double> want(all.begin() + ptrdiff_t(size_t(r) * n),
                           all.begin() + ptrdiff_t(size_t(r + 1) * n));
  std::vector<T> got = in_place ? send.read() : recv.read();
  got.resize(n);
  require_close(got, want, tolerance<T>(), "reduce_scatter");
}

// recv: block i = rank i's n elements. In place: send == recv + rank * n.
template <typename T>
void check_all_gather(Communicator& c, TestMemory& m, DType t, size_t n, bool in_place, int tag) {
  const int p = c.size(), r = c.rank();
  std::vector<T> mine = rank_data<T>(r, tag, n);
  TestBuffer<T> send(m, mine);
  std::vector<T> init(size_t(p) * n, TestBuffer<T>::sentinel());
  if (in_place) std::copy(mine.begin(), mine.end(), init.begin() + ptrdiff_t(size_t(r) * n));
  TestBuffer<T> recv(m, init);
  c.all_gather(in_place ? recv.at(size_t(r) * n) : send.data(), recv.data(), n, t);
  c.synchronize();
  std::vector<double> want;
  for (int i = 0; i < p; i++)
    for (T x : rank_data<T>(i, tag, n)) want.push_back(double(x));
  require_close(recv.read(), want, 0.0, "all_gather");
}

template <typename T>
void check_broadcast(Communicator& c, TestMemory& m, DType t, size_t n, int root, int tag) {
  const int r = c.rank();
  std::vector<T> theirs = rank_data<T>(root, tag, n);
  TestBuffer<T> buf(m, r == root ? theirs : rank_data<T>(r, tag + 1, n));
  c.broadcast(buf.data(), n, t, root);
  c.synchronize();
  require_close(buf.read(), std::vector<double>(theirs.begin(), theirs.end()), 0.0, "broadcast");
}

// Every collective of the interface once, on `c`, in the dtypes the backend moves.
inline void check_every_collective(Communicator& c, TestMemory& m) {
  const int p = c.size();
  SECTION("all_to_all f32 / f64 / i32 / bf16 (raw)") {
    check_all_to_all<float>(c, m, DType::f32, 37, 1);
    check_all_to_all<double>(c, m, DType::f64, 5, 2);
    check_all_to_all<int32_t>(c, m, DType::i32, 11, 3);
    check_all_to_all<uint16_t>(c, m, DType::bf16, 29, 4);
    check_all_to_all<float>(c, m, DType::f32, 0, 5);
  }
  SECTION("all_to_allv uneven, some counts zero, gapped displacements") {
    check_all_to_allv<float>(c, m, DType::f32, 6);
    check_all_to_allv<uint16_t>(c, m, DType::bf16, 7);
    check_all_to_allv<double>(c, m, DType::f64, 8);
  }
  SECTION("all_reduce sum / avg / max, in place and not") {
    for (bool in_place : {false, true}) {
      for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max}) {
        check_all_reduce<float>(c, m, DType::f32, 1001, op, in_place, 10);
        check_all_reduce<double>(c, m, DType::f64, 77, op, in_place, 11);
      }
      check_all_reduce<int32_t>(c, m, DType::i32, 300, ReduceOp::sum, in_place, 12);
      check_all_reduce<int32_t>(c, m, DType::i32, 300, ReduceOp::max, in_place, 13);
    }
  }
  SECTION("reduce_scatter sum / avg / max, in place and not") {
    for (bool in_place : {false, true}) {
      for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max})
        check_reduce_scatter<float>(c, m, DType::f32, 129, op, in_place, 20);
      check_reduce_scatter<double>(c, m, DType::f64, 17, ReduceOp::sum, in_place, 21);
      check_reduce_scatter<int32_t>(c, m, DType::i32, 33, ReduceOp::max, in_place, 22);
    }
  }
  SECTION("all_gather, in place and not") {
    for (bool in_place : {false, true}) {
      check_all_gather<float>(c, m, DType::f32, 65, in_place, 30);
      check_all_gather<uint16_t>(c, m, DType::bf16, 9, in_place, 31);
      check_all_gather<int32_t>(c, m, DType::i32, 4, in_place, 32);
    }
  }
  SECTION("broadcast from the last rank and from rank 0") {
    check_broadcast<float>(c, m, DType::f32, 333, p - 1, 40);
    check_broadcast<double>(c, m, DType::f64, 3, 0, 41);
    check_broadcast<uint16_t>(c, m, DType::bf16, 50, p - 1, 42);
  }
  SECTION("barrier") {
    c.barrier();
    c.synchronize();
  }
}

// Exact byte counters for a fixed sequence of calls (the convention in comm/comm_util.h,
// written out here independently).
inline void check_counters(Communicator& c, TestMemory& m) {
  const uint64_t p = uint64_t(c.size());
  const uint64_t r = uint64_t(c.rank());
  c.counters().reset();
  const size_t n = 40;  // f32: 160 bytes per block
  check_all_to_all<float>(c, m, DType::f32, n, 50);
  check_all_to_allv<float>(c, m, DType::f32, 51);
  check_all_reduce<float>(c, m, DType::f32, n, ReduceOp::sum, false, 52);
  check_all_reduce<double>(c, m, DType::f64, 3, ReduceOp::max, true, 53);
  check_reduce_scatter<float>(c, m, DType::f32, n, ReduceOp::sum, false, 54);
  check_all_gather<int32_t>(c, m, DType::i32, n, false, 55);
  check_broadcast<float>(c, m, DType::f32, n, int(p) - 1, 56);
  c.barrier();

  uint64_t a2av_sent = 0;
  for (uint64_t j = 0; j < p; j++)
    if (j != r) a2av_sent += a2av_count(int(r), int(j)) * 4;
  const CommCounters& k = c.counters();
  auto at = [&](Collective x) { return k.bytes_sent[size_t(x)]; };
  auto calls = [&](Collective x) { return k.calls[size_t(x)]; };
  CHECK(at(Collective::all_to_all) == (p - 1) * n * 4 + a2av_sent);
  CHECK(calls(Collective::all_to_all) == 2);
  // ring all_reduce: 2 (p-1)/p of the buffer, in whole bytes
  CHECK(at(Collective::all_reduce) == 2 * (p - 1) * n * 4 / p + 2 * (p - 1) * 3 * 8 / p);
  CHECK(calls(Collective::all_reduce) == 2);
  CHECK(at(Collective::reduce_scatter) == (p - 1) * n * 4);
  CHECK(at(Collective::all_gather) == (p - 1) * n * 4);
  CHECK(at(Collective::broadcast) == (p > 1 && r == p - 1 ? n * 4 : 0));
  CHECK(calls(Collective::broadcast) == 1);
  CHECK(k.total_bytes_sent() == at(Collective::all_to_all) + at(Collective::all_reduce) +
                                    at(Collective::reduce_scatter) + at(Collective::all_gather) +
                                    at(Collective::broadcast));
  if (p == 4) {  // the numbers written out once, for a reader
    CHECK(at(Collective::reduce_scatter) == 480);
    CHECK(at(Collective::all_reduce) == 240 + 36);
  }
  c.counters().reset();
  CHECK(c.counters().total_bytes_sent() == 0);
}

}  // namespace ulysses::test
