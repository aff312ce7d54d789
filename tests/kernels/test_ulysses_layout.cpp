// The row-range form of the Ulysses pack / unpack ops (kernels/ops.h, ops::TokenRows): a set of
// range calls that covers every token row once equals one whole call, bitwise; and the GEMM
// split the chunked all-to-alls rely on (core/gpt.cpp): matmul_backward split into a dinp call
// per row range plus one dweight / dbias call gives bitwise the combined call's dweight and dbias;
// the GEMMs on a subset of rows (forward, dinp) agree with the whole call to float32 rounding but
// not bitwise: OpenBLAS's sgemm picks its kernels and blocking by M (measured here).
#include <cstring>
#include <vector>

#include <catch2/catch.hpp>

#include "kernel_test_util.h"
#include "kernels/ops.h"
#include "tests/test_util.h"

namespace ops = ulysses::ops;
using ulysses::Device;
using ulysses::DType;
using ulysses::Tensor;
using ulysses::test::bitwise_equal;
using ulysses::test::Rng;

namespace {

Tensor view(std::vector<float>& v, std::initializer_list<int64_t> dims) {
  return Tensor(v.data(), dims, DType::f32, Device::cpu);
}

// rows of one batch row cut into ranges of these lengths (sum T), as the chunked all-to-alls do
const std::vector<int> kRanges = {3, 2, 2};

}  // namespace

TEST_CASE("ulysses pack/unpack heads over row ranges equal the whole call", "[kernels][ulysses]") {
  const int B = 2, T = 7, Htot = 5, d = 4, P = 3;
  ops::Context ctx;
  Rng rng(3);
  // peer 0 takes heads {0, 1, 3}, peer 1 {2, 3}, peer 2 {4, 3, 0}: heads 0 and 3 go to several
  // peers (their unpack with accumulate sums them)
  const std::vector<int32_t> heads = {0, 1, 3, 2, 3, 4, 3, 0};
  const std::vector<int64_t> offsets = {0, 3, 5, 8};
  const size_t n_src = size_t(B) * T * Htot * d, n_packed = size_t(B) * T * d * size_t(offsets[P]);
  std::vector<float> src = rng.normals(n_src);

  std::vector<float> whole(n_packed, -7.f), ranged(n_packed, -7.f);
  ops::ulysses_pack_heads(ctx, view(whole, {int64_t(n_packed)}), view(src, {B, T, Htot, d}), heads.data(),
                          offsets.data(), P);
  for (int b = 0; b < B; ++b)
    for (int t0 = 0, k = 0; k < int(kRanges.size()); t0 += kRanges[size_t(k)], ++k)
      ops::ulysses_pack_heads(ctx, view(ranged, {int64_t(n_packed)}), view(src, {B, T, Htot, d}), heads.data(),
                              offsets.data(), P, ops::TokenRows{b, t0, kRanges[size_t(k)]});
  CHECK(bitwise_equal(whole, ranged));
  // one range alone writes only its own rows: the rest keeps the fill value
  std::vector<float> one(n_packed, -7.f);
  ops::ulysses_pack_heads(ctx, view(one, {int64_t(n_packed)}), view(src, {B, T, Htot, d}), heads.data(),
                          offsets.data(), P, ops::TokenRows{1, 3, 2});
  size_t changed = 0;
  for (float x : one) changed += x != -7.f;
  CHECK(changed == size_t(2) * d * size_t(offsets[P]));

  // unpack with accumulate onto a non-zero base
  const std::vector<float> base = rng.normals(n_src);
  std::vector<float> acc_whole = base, acc_ranged = base;
  ops::ulysses_unpack_heads(ctx, view(acc_whole, {B, T, Htot, d}), view(whole, {int64_t(n_packed)}), heads.data(),
                            offsets.data(), P, /*accumulate=*/true);
  for (int b = 0; b < B; ++b)
    for (int t0 = 0, k = 0; k < int(kRanges.size()); t0 += kRanges[size_t(k)], ++k)
      ops::ulysses_unpack_heads(ctx, view(acc_ranged, {B, T, Htot, d}), view(whole, {int64_t(n_packed)}),
                                heads.data(), offsets.data(), P, /*accumulate=*/true,
                                ops::TokenRows{b, t0, kRanges[size_t(k)]});
  CHECK(bitwise_equal(acc_whole, acc_ranged));
  CHECK_FALSE(bitwise_equal(acc_whole, base));

  // assignment, each head listed once: unpack(pack(x)) == x range by range
  const std::vector<int32_t> perm = {4, 0, 2, 1, 3};
  const std::vector<int64_t> perm_off = {0, 2, 3, 5};
  std::vector<float> packed(size_t(B) * T * Htot * d), back(n_src, 0.f);
  ops::ulysses_pack_heads(ctx, view(packed, {int64_t(packed.size())}), view(src, {B, T, Htot, d}), perm.data(),
                          perm_off.data(), P);
  for (int b = 0; b < B; ++b)
    for (int t0 = 0, k = 0; k < int(kRanges.size()); t0 += kRanges[size_t(k)], ++k)
      ops::ulysses_unpack_heads(ctx, view(back, {B, T, Htot, d}), view(packed, {int64_t(packed.size())}),
                                perm.data(), perm_off.data(), P, /*accumulate=*/false,
                                ops::TokenRows{b, t0, kRanges[size_t(k)]});
  CHECK(bitwise_equal(back, src));
}

TEST_CASE("matmul on row ranges and split backward match the whole calls", "[kernels][ulysses]") {
  const int M = 14, IC = 24, OC = 40;  // M = B*T rows, cut into ranges like the chunks
  ops::Context ctx;
  Rng rng(5);
  std::vector<float> inp = rng.normals(size_t(M) * IC), w = rng.normals(size_t(OC) * IC), bias = rng.normals(OC),
                     dout = rng.normals(size_t(M) * OC);
  std::vector<float> out_whole(size_t(M) * OC), out_rows(size_t(M) * OC);
  ops::matmul_forward(ctx, view(out_whole, {M, OC}), view(inp, {M, IC}), view(w, {OC, IC}), view(bias, {OC}));
  const std::vector<int> ranges = {3, 2, 2, 3, 2, 2};  // B = 2 rows of T = 7
  for (int r = 0, k = 0; k < int(ranges.size()); r += ranges[size_t(k)], ++k)
    ops::matmul_forward(ctx, view(out_rows, {M, OC}).rows(r, ranges[size_t(k)]),
                        view(inp, {M, IC}).rows(r, ranges[size_t(k)]), view(w, {OC, IC}), view(bias, {OC}));
  CHECK(ulysses::test::max_rel_diff(out_rows, out_whole) <= 1e-6);

  // combined: dinp, dweight, dbias in one call; split: dinp per range, then dweight + dbias
  std::vector<float> dinp1(size_t(M) * IC, 0.f), dw1(size_t(OC) * IC, 0.f), db1(OC, 0.f);
  std::vector<float> dinp2 = dinp1, dw2 = dw1, db2 = db1;
  ops::matmul_backward(ctx, view(dinp1, {M, IC}), view(dw1, {OC, IC}), view(db1, {OC}), view(dout, {M, OC}),
                       view(inp, {M, IC}), view(w, {OC, IC}));
  for (int r = 0, k = 0; k < int(ranges.size()); r += ranges[size_t(k)], ++k) {
    const int n = ranges[size_t(k)];
    ops::matmul_backward(ctx, view(dinp2, {M, IC}).rows(r, n), Tensor(), Tensor(), view(dout, {M, OC}).rows(r, n),
                         view(inp, {M, IC}).rows(r, n), view(w, {OC, IC}));
  }
  ops::matmul_backward(ctx, Tensor(), view(dw2, {OC, IC}), view(db2, {OC}), view(dout, {M, OC}), view(inp, {M, IC}),
                       view(w, {OC, IC}));
  CHECK(ulysses::test::max_rel_diff(dinp2, dinp1) <= 1e-6);
  CHECK(bitwise_equal(dw1, dw2));
  CHECK(bitwise_equal(db1, db2));
}
