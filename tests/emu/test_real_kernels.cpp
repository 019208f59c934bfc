// The project's real kernels (cuda/*.cuh, read-only here) compiled by the
// host compiler against the emulator and checked against float64
// computations, under the three schedules (which must also agree bitwise):
// softmax_matmul_kernel (query pass in float and double; landmark pass with
// three key splits, then merge_kernel), newton_schulz_kernel, and the
// tensor-core tc_query_kernel (WMMA, __half); and the bank arithmetic of the
// tensor-core softmax's column order.
//
// The kernel sources write their launches and shared memory through the
// seams of cuda/emu/seams.h, so they build here as they are.
#include "emu_test.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#include "forward_kernels.cuh"
#include "forward_tc_kernels.cuh"
#include "newton_schulz_kernel.cuh"
#include "grid.h"
#pragma GCC diagnostic pop

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

namespace {

namespace k = nystrom::cuda::kern;
using nystrom::cuda::MutRowsView;
using nystrom::cuda::Problem;
using nystrom::cuda::RowsView;

using RealKernels = Emu;

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

std::vector<double> random(std::size_t n, unsigned seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> x(n);
  for (double& v : x) v = u(gen);
  return x;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  std::vector<T> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = static_cast<T>(x[i]);
  return y;
}

// Three batch elements of 3 heads: b0 Nyström (77 queries, 50 keys), b1
// Nyström with few keys (60, 10), b2 exact (12, 9); the rest is padding.
struct Case {
  int B = 3, H = 3, L = 77, S = 50, D = 40, Dv = 48, m = 16;
  std::vector<int> q_count{77, 60, 12}, k_count{50, 10, 9};
  Problem problem() const {
    Problem p;
    p.B = B;
    p.H = H;
    p.L = L;
    p.S = S;
    p.D = D;
    p.Dv = Dv;
    p.m = m;
    p.ms = m;
    p.scale = 1.0 / std::sqrt(static_cast<double>(D));
    p.q_count = q_count.data();
    p.k_count = k_count.data();
    return p;
  }
};

RowsView rows(const void* data, int H, int n, int d) {
  return RowsView{data, static_cast<int64_t>(H) * n * d, static_cast<int64_t>(n) * d, d, nullptr, 0};
}

// Row r of the (B, H, n, d) array x: softmax(scale x_r y_jᵀ) over j < ny, times v.
struct Softmax {
  std::vector<double> out;
  double lse;
};
Softmax softmax_rows(const double* xr, const double* y, const double* v, int ny, int D, int Dv, double scale) {
  std::vector<double> s(static_cast<std::size_t>(ny));
  double mx = -INFINITY;
  for (int j = 0; j < ny; ++j) {
    double dot = 0.0;
    for (int c = 0; c < D; ++c) dot += xr[c] * y[j * D + c];
    s[static_cast<std::size_t>(j)] = dot * scale;
    mx = std::max(mx, s[static_cast<std::size_t>(j)]);
  }
  double sum = 0.0;
  for (double& e : s) sum += (e = std::exp(e - mx));
  Softmax r{std::vector<double>(static_cast<std::size_t>(Dv), 0.0), mx + std::log(sum)};
  for (int j = 0; j < ny; ++j)
    for (int c = 0; c < Dv; ++c) r.out[static_cast<std::size_t>(c)] += s[static_cast<std::size_t>(j)] / sum * v[j * Dv + c];
  return r;
}

// ---------------------------------------------------------- query pass ----
template <typename T>
void check_query_pass() {
  using A = typename k::Acc<T>::type;
  const Case cs;
  const Problem p = cs.problem();
  const int heads = cs.B * cs.H;
  const auto q = random(static_cast<std::size_t>(heads) * cs.L * cs.D, 1);
  const auto klm = random(static_cast<std::size_t>(heads) * cs.m * cs.D, 2);
  const auto w = random(static_cast<std::size_t>(heads) * cs.m * cs.Dv, 3);
  const auto qT = cast<T>(q);
  const auto klmA = cast<A>(klm), wA = cast<A>(w);
  constexpr int R = std::is_same<T, double>::value ? 1 : 4, BR = k::kWarps * R;
  auto kernel = k::softmax_matmul_kernel<T, A, T, A, R, 2, false>;
  const size_t smem = sizeof(A) * (BR * cs.D + k::kChunk * (cs.D + 1) + k::kChunk * cs.Dv + BR * k::kChunk);
  ASSERT_EQ(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), cudaSuccess);
  std::vector<std::vector<T>> outs;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    std::vector<T> out(static_cast<std::size_t>(heads) * cs.L * cs.Dv);
    std::vector<A> lse(static_cast<std::size_t>(heads) * cs.L);
    emu::poison(out.data(), out.size() * sizeof(T));
    emu::poison(lse.data(), lse.size() * sizeof(A));
    k::ForwardArgs a{};
    a.p = p;
    a.x = rows(qT.data(), cs.H, cs.L, cs.D);
    a.y = rows(klmA.data(), cs.H, cs.m, cs.D);
    a.v = rows(wA.data(), cs.H, cs.m, cs.Dv);
    const RowsView o = rows(out.data(), cs.H, cs.L, cs.Dv);
    a.out = MutRowsView{out.data(), o.sb, o.sh, o.sr, nullptr, 0};
    a.lse = lse.data();
    a.splits = 1;
    NYSTROM_LAUNCH(kernel, dim3((cs.L + BR - 1) / BR, 1, heads), k::kThreads, smem, nullptr)(a);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    const double tol = sizeof(A) == 8 ? 1e-12 : 2e-6;
    for (int bh = 0; bh < heads; ++bh) {
      const int b = bh / cs.H, Lb = cs.q_count[static_cast<std::size_t>(b)];
      const int mk = std::min(cs.m, cs.k_count[static_cast<std::size_t>(b)]);
      for (int r = 0; r < cs.L; ++r) {
        const std::size_t row = static_cast<std::size_t>(bh) * cs.L + static_cast<std::size_t>(r);
        if (r >= Lb) {  // padding: left alone
          EXPECT_TRUE(std::isnan(static_cast<double>(out[row * cs.Dv])));
          EXPECT_TRUE(std::isnan(static_cast<double>(lse[row])));
          continue;
        }
        const Softmax ref = softmax_rows(&q[row * cs.D], &klm[static_cast<std::size_t>(bh) * cs.m * cs.D],
                                         &w[static_cast<std::size_t>(bh) * cs.m * cs.Dv], mk, cs.D, cs.Dv, p.scale);
        EXPECT_NEAR(static_cast<double>(lse[row]), ref.lse, tol * 10) << s.str() << " bh " << bh << " row " << r;
        for (int c = 0; c < cs.Dv; ++c) {
          ASSERT_NEAR(static_cast<double>(out[row * cs.Dv + static_cast<std::size_t>(c)]), ref.out[static_cast<std::size_t>(c)], tol)
              << s.str() << " bh " << bh << " row " << r << " col " << c;
        }
      }
    }
    outs.push_back(out);
  }
  for (const auto& o : outs) EXPECT_TRUE(same_bits(o, outs.front()));
}

TEST_F(RealKernels, SoftmaxMatmulQueryPassFloat) { check_query_pass<float>(); }
TEST_F(RealKernels, SoftmaxMatmulQueryPassDouble) { check_query_pass<double>(); }

// ---------------------------------------------- landmark pass + merge ----
TEST_F(RealKernels, SoftmaxMatmulLandmarkPassAndMergeFloat) {
  using A = float;
  const Case cs;
  const Problem p = cs.problem();
  const int heads = cs.B * cs.H, splits = 3;
  const auto qlm = random(static_cast<std::size_t>(heads) * cs.m * cs.D, 4);
  const auto kk = random(static_cast<std::size_t>(heads) * cs.S * cs.D, 5);
  const auto v = random(static_cast<std::size_t>(heads) * cs.S * cs.Dv, 6);
  const auto qlmA = cast<A>(qlm), kT = cast<float>(kk), vT = cast<float>(v);
  constexpr int BR = k::kWarps * 4;
  auto landmark = k::softmax_matmul_kernel<A, float, float, A, 4, 2, true>;
  const size_t smem = sizeof(A) * (BR * cs.D + k::kChunk * (cs.D + 1) + k::kChunk * cs.Dv + BR * k::kChunk);
  std::vector<std::vector<A>> results;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    std::vector<A> pmax(static_cast<std::size_t>(heads) * splits * cs.m), psum(pmax.size()),
        pacc(pmax.size() * static_cast<std::size_t>(cs.Dv)), bv(static_cast<std::size_t>(heads) * cs.m * cs.Dv),
        lse(static_cast<std::size_t>(heads) * cs.m);
    for (auto* x : {&pmax, &psum, &pacc, &bv, &lse}) emu::poison(x->data(), x->size() * sizeof(A));
    k::ForwardArgs a{};
    a.p = p;
    a.x = rows(qlmA.data(), cs.H, cs.m, cs.D);
    a.y = rows(kT.data(), cs.H, cs.S, cs.D);
    a.v = rows(vT.data(), cs.H, cs.S, cs.Dv);
    a.part_max = pmax.data();
    a.part_sum = psum.data();
    a.part_acc = pacc.data();
    a.splits = splits;
    NYSTROM_LAUNCH(landmark, dim3((cs.m + BR - 1) / BR, splits, heads), k::kThreads, smem, nullptr)(a);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    NYSTROM_LAUNCH(k::merge_kernel<A>, dim3(cs.m, heads), k::kThreads, 0, nullptr)(p, 0, splits, pmax.data(),
                                                                                  psum.data(), pacc.data(),
                                                                                  bv.data(), lse.data());
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    for (int bh = 0; bh < heads; ++bh) {
      const int b = bh / cs.H, Sb = cs.k_count[static_cast<std::size_t>(b)];
      const bool nystrom = b < 2;  // b2 is exact: the landmark pass leaves it alone
      for (int i = 0; i < cs.m; ++i) {
        const std::size_t row = static_cast<std::size_t>(bh) * cs.m + static_cast<std::size_t>(i);
        if (!nystrom) {
          EXPECT_TRUE(std::isnan(bv[row * cs.Dv]));
          continue;
        }
        const Softmax ref = softmax_rows(&qlm[row * cs.D], &kk[static_cast<std::size_t>(bh) * cs.S * cs.D],
                                         &v[static_cast<std::size_t>(bh) * cs.S * cs.Dv], Sb, cs.D, cs.Dv, p.scale);
        EXPECT_NEAR(lse[row], ref.lse, 1e-5) << s.str();
        for (int c = 0; c < cs.Dv; ++c)
          ASSERT_NEAR(bv[row * cs.Dv + static_cast<std::size_t>(c)], ref.out[static_cast<std::size_t>(c)], 2e-6)
              << s.str() << " bh " << bh << " row " << i;
      }
    }
    results.push_back(bv);
  }
  for (const auto& r : results) EXPECT_TRUE(same_bits(r, results.front()));
}

// ------------------------------------------------------- Newton–Schulz ----
TEST_F(RealKernels, NewtonSchulzFloat) {
  const int heads = 4, ms = 20, Dv = 24, iterations = 6, MP = 32;
  std::vector<double> Am(static_cast<std::size_t>(heads) * ms * ms), c(heads);
  const auto logits = random(Am.size(), 7, -2.0, 2.0);
  for (int h = 0; h < heads; ++h) {  // softmax rows, as A is
    for (int i = 0; i < ms; ++i) {
      double sum = 0.0;
      for (int j = 0; j < ms; ++j) sum += std::exp(logits[static_cast<std::size_t>((h * ms + i) * ms + j)]);
      for (int j = 0; j < ms; ++j)
        Am[static_cast<std::size_t>((h * ms + i) * ms + j)] = std::exp(logits[static_cast<std::size_t>((h * ms + i) * ms + j)]) / sum;
    }
    double cmax = 0.0;
    for (int j = 0; j < ms; ++j) {
      double col = 0.0;
      for (int i = 0; i < ms; ++i) col += Am[static_cast<std::size_t>((h * ms + i) * ms + j)];
      cmax = std::max(cmax, col);
    }
    c[static_cast<std::size_t>(h)] = cmax;
  }
  const auto bv = random(static_cast<std::size_t>(heads) * ms * Dv, 8);
  // float64 reference: Z0 = Aᵀ/c, Z <- Z (13I - AZ(15I - AZ(7I - AZ))) / 4, zbv = Z bv.
  std::vector<double> ref(static_cast<std::size_t>(heads) * ms * Dv);
  auto matmul = [ms](const std::vector<double>& X, const std::vector<double>& Y) {
    std::vector<double> out(static_cast<std::size_t>(ms) * ms, 0.0);
    for (int i = 0; i < ms; ++i)
      for (int kk = 0; kk < ms; ++kk)
        for (int j = 0; j < ms; ++j) out[static_cast<std::size_t>(i * ms + j)] += X[static_cast<std::size_t>(i * ms + kk)] * Y[static_cast<std::size_t>(kk * ms + j)];
    return out;
  };
  for (int h = 0; h < heads; ++h) {
    std::vector<double> A(Am.begin() + h * ms * ms, Am.begin() + (h + 1) * ms * ms), Z(A.size());
    for (int i = 0; i < ms; ++i)
      for (int j = 0; j < ms; ++j) Z[static_cast<std::size_t>(i * ms + j)] = A[static_cast<std::size_t>(j * ms + i)] / c[static_cast<std::size_t>(h)];
    for (int it = 0; it < iterations; ++it) {
      const std::vector<double> AZ = matmul(A, Z);
      std::vector<double> t = AZ;
      for (double coef : {7.0, 15.0, 13.0}) {
        for (double& x : t) x = -x;
        for (int i = 0; i < ms; ++i) t[static_cast<std::size_t>(i * ms + i)] += coef;
        if (coef != 13.0) t = matmul(AZ, t);
      }
      Z = matmul(Z, t);
      for (double& x : Z) x *= 0.25;
    }
    for (int i = 0; i < ms; ++i)
      for (int j = 0; j < Dv; ++j) {
        double s = 0.0;
        for (int kk = 0; kk < ms; ++kk) s += Z[static_cast<std::size_t>(i * ms + kk)] * bv[static_cast<std::size_t>((h * ms + kk) * Dv + j)];
        ref[static_cast<std::size_t>((h * ms + i) * Dv + j)] = s;
      }
  }
  const auto Af = cast<float>(Am), cf = cast<float>(c), bvf = cast<float>(bv);
  auto kernel = k::newton_schulz_kernel<float, MP>;
  const size_t smem = 3 * MP * MP * sizeof(float);
  std::vector<std::vector<float>> results;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    std::vector<float> zbv(ref.size());
    emu::poison(zbv.data(), zbv.size() * sizeof(float));
    NYSTROM_LAUNCH(kernel, heads, (MP / 4) * (MP / 4), smem, nullptr)(0, ms, Dv, iterations, Af.data(), cf.data(),
                                                                      bvf.data(), zbv.data());
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    for (std::size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(zbv[i], ref[i], 1e-3 * (1.0 + std::abs(ref[i]))) << s.str() << " " << i;
    results.push_back(zbv);
  }
  for (const auto& r : results) EXPECT_TRUE(same_bits(r, results.front()));
}

// ------------------------------------------------ tensor cores (WMMA) ----
TEST_F(RealKernels, TensorCoreQueryKernelHalf) {
  Case cs;
  cs.D = cs.Dv = 64;
  const Problem p = cs.problem();
  const int heads = cs.B * cs.H;
  const auto q = random(static_cast<std::size_t>(heads) * cs.L * cs.D, 9);
  const auto klm = random(static_cast<std::size_t>(heads) * cs.m * cs.D, 10);
  const auto w = random(static_cast<std::size_t>(heads) * cs.m * cs.Dv, 11);
  std::vector<__half> qh(q.size());
  std::vector<double> qr(q.size()), klmr(klm.size());  // what the kernel computes with: half-rounded
  for (std::size_t i = 0; i < q.size(); ++i) qr[i] = __half2float(qh[i] = __float2half_rn(static_cast<float>(q[i])));
  for (std::size_t i = 0; i < klm.size(); ++i) klmr[i] = __half2float(__float2half_rn(static_cast<float>(klm[i])));
  const auto klmf = cast<float>(klm), wf = cast<float>(w);
  auto kernel = k::tc_query_kernel<__half, 64, 64>;
  const size_t smem = k::tc_query_smem<__half>(64, 64);
  ASSERT_GT(smem, 48u * 1024);
  ASSERT_EQ(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), cudaSuccess);
  const int per = 2, tiles = (cs.L + k::kTcWarps * k::kTcRows - 1) / (k::kTcWarps * k::kTcRows);
  std::vector<std::vector<__half>> outs;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    std::vector<__half> out(static_cast<std::size_t>(heads) * cs.L * cs.Dv);
    std::vector<float> lse(static_cast<std::size_t>(heads) * cs.L);
    emu::poison(out.data(), out.size() * sizeof(__half));
    emu::poison(lse.data(), lse.size() * sizeof(float));
    k::ForwardArgs a{};
    a.p = p;
    a.x = rows(qh.data(), cs.H, cs.L, cs.D);
    a.y = rows(klmf.data(), cs.H, cs.m, cs.D);
    a.v = rows(wf.data(), cs.H, cs.m, cs.Dv);
    const RowsView o = rows(out.data(), cs.H, cs.L, cs.Dv);
    a.out = MutRowsView{out.data(), o.sb, o.sh, o.sr, nullptr, 0};
    a.lse = lse.data();
    a.splits = 1;
    NYSTROM_LAUNCH(kernel, dim3((tiles + per - 1) / per, 1, heads), k::kTcWarps * 32, smem, nullptr)(a, per);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    for (int bh = 0; bh < heads; ++bh) {
      const int b = bh / cs.H, Lb = cs.q_count[static_cast<std::size_t>(b)];
      const int mk = std::min(cs.m, cs.k_count[static_cast<std::size_t>(b)]);
      for (int r = 0; r < Lb; ++r) {
        const std::size_t row = static_cast<std::size_t>(bh) * cs.L + static_cast<std::size_t>(r);
        const Softmax ref = softmax_rows(&qr[row * cs.D], &klmr[static_cast<std::size_t>(bh) * cs.m * cs.D],
                                         &w[static_cast<std::size_t>(bh) * cs.m * cs.Dv], mk, cs.D, cs.Dv, p.scale);
        EXPECT_NEAR(lse[row], ref.lse, 1e-4) << s.str();
        for (int c = 0; c < cs.Dv; ++c)  // P and W are rounded to half before the second product
          ASSERT_NEAR(__half2float(out[row * cs.Dv + static_cast<std::size_t>(c)]), ref.out[static_cast<std::size_t>(c)], 1e-2)
              << s.str() << " bh " << bh << " row " << r << " col " << c;
      }
      for (int r = Lb; r < cs.L; ++r)
        EXPECT_TRUE(std::isnan(__half2float(out[(static_cast<std::size_t>(bh) * cs.L + static_cast<std::size_t>(r)) * cs.Dv])));
    }
    outs.push_back(out);
  }
  for (const auto& o : outs) EXPECT_TRUE(same_bits(o, outs.front()));
}

// The tensor-core softmax's column order (tc_column, forward_tc_kernels.cuh):
// at every step the 32 lanes of a warp (row r = lane / 2, half = lane % 2)
// read 32 different banks of the float logits sS, and the 16 lane pairs write
// 16 different 4-byte words of the 2-byte probabilities sP, each pair the two
// halves of one word (padded line pitch kTcLdS = 72 elements); the key side's
// per-column reads of lse and delta (c % 32) hit 32 different banks too.
TEST(TensorCoreSoftmax, ColumnOrderIsFreeOfBankConflicts) {
  ASSERT_EQ(k::kTcLdS, 72);
  for (int i = 0; i < 32; ++i) {
    bool s_bank[32] = {}, c_bank[32] = {};
    int p_word[32];
    for (int& w : p_word) w = -1;
    for (int lane = 0; lane < 32; ++lane) {
      const int r = lane >> 1, half = lane & 1, c = k::tc_column(half, i, lane);
      ASSERT_GE(c, 0);
      ASSERT_LT(c, 64);
      ASSERT_EQ(c % 2, half);                            // a lane keeps to its parity
      const int sb = (r * k::kTcLdS + c) % 32;           // float: one element per bank word
      const int pw = (r * k::kTcLdS + c) * 2 / 4;        // 2-byte elements, two per word
      EXPECT_FALSE(s_bank[sb]) << "step " << i << " lane " << lane << ": sS bank " << sb << " taken";
      EXPECT_TRUE(p_word[pw % 32] == -1 || p_word[pw % 32] == pw)
          << "step " << i << " lane " << lane << ": sP bank " << pw % 32 << " holds another word";
      EXPECT_FALSE(c_bank[c % 32]) << "step " << i << " lane " << lane << ": lse/delta bank taken";
      s_bank[sb] = c_bank[c % 32] = true;
      p_word[pw % 32] = pw;
    }
  }
  // over its 32 steps a lane visits each of its 32 columns once
  for (int lane = 0; lane < 32; ++lane) {
    bool seen[64] = {};
    for (int i = 0; i < 32; ++i) {
      const int c = k::tc_column(lane & 1, i, lane);
      EXPECT_FALSE(seen[c]);
      seen[c] = true;
    }
  }
}

// Grid sizing of the strided backward passes (grid.h), against a brute-force
// count of the pass's time in tile times: per group count, the waves of
// resident blocks times the tiles of the busiest block.
TEST(Grid, GroupsForWavesMinimiseWholeWaves) {
  namespace c = nystrom::cuda;
  auto time_of = [](int64_t heads, int64_t tiles, int per_sm, int sms, int64_t g) {
    const int64_t slots = static_cast<int64_t>(per_sm) * sms;
    int64_t waves = 0;
    for (int64_t blocks = heads * g; blocks > 0; blocks -= slots) ++waves;
    int64_t busiest = 0;
    for (int64_t b = 0; b < g; ++b) {
      int64_t own = 0;
      for (int64_t t = b; t < tiles; t += g) ++own;
      busiest = std::max(busiest, own);
    }
    return waves * busiest;
  };
  for (int64_t heads : {1, 6, 64, 131, 132, 133, 500}) {
    for (int64_t tiles : {1, 2, 3, 17, 256, 2048}) {
      for (int per_sm : {1, 4}) {
        for (int max_groups : {8, 1024}) {
          const int g = c::groups_for_waves(heads, tiles, per_sm, 132, max_groups);
          ASSERT_GE(g, 1);
          ASSERT_LE(g, std::min<int64_t>(tiles, max_groups));
          int64_t best = -1;
          int best_g = 0;
          for (int64_t h = 1; h <= std::min<int64_t>(tiles, max_groups); ++h) {
            const int64_t t = time_of(heads, tiles, per_sm, 132, h);
            if (best < 0 || t < best) best = t, best_g = static_cast<int>(h);
          }
          EXPECT_EQ(g, best_g) << "heads " << heads << " tiles " << tiles << " per_sm " << per_sm;
        }
      }
    }
  }
  // The H200 case of docs/DESIGN.md §7: 64 heads, one resident block per SM,
  // 256 tiles at n = 16K: 2 groups (one wave of 128 blocks), not the 5 (320
  // blocks, three waves) of "two blocks per SM, rounded up".
  EXPECT_EQ(c::groups_for_waves(64, 256, 1, 132, 8), 2);
  EXPECT_EQ(c::groups_for_waves(64, 256, 4, 132, 8), 8);
  EXPECT_EQ(c::groups_for_waves(0, 256, 1, 132), 1);
  EXPECT_EQ(c::groups_for_waves(64, 0, 1, 132), 1);
}

// The forward query pass's contiguous tile ranges: every tile of a head in
// exactly one block, no block without tiles, and the pass's time (waves of
// the busiest block) that of groups_for_waves' interleaved groups.
TEST(Grid, QueryTilesPerBlock) {
  namespace c = nystrom::cuda;
  for (int64_t heads : {1, 6, 64, 131, 133, 500}) {
    for (int64_t tiles : {1, 2, 3, 5, 17, 32, 256, 2048}) {
      for (int per_sm : {1, 2, 3}) {
        const int64_t per = c::query_tiles_per_block(heads, tiles, per_sm, 132);
        ASSERT_GE(per, 1);
        ASSERT_LE(per, tiles);
        const int64_t blocks = (tiles + per - 1) / per;  // per head, as query_rows_t launches
        EXPECT_LT((blocks - 1) * per, tiles) << "a block without tiles";
        EXPECT_GE(blocks * per, tiles) << "tiles left out";
        const int64_t g = c::groups_for_waves(heads, tiles, per_sm, 132, 8);
        EXPECT_LE(blocks, g);
        const int64_t slots = static_cast<int64_t>(per_sm) * 132;
        EXPECT_EQ((heads * blocks + slots - 1) / slots * per, (heads * g + slots - 1) / slots * ((tiles + g - 1) / g))
            << "heads " << heads << " tiles " << tiles << " per_sm " << per_sm;
      }
    }
  }
  // docs/DESIGN.md §7, B·H = 64, 2 blocks per SM: 4 blocks per head of 64
  // tiles at n = 16K, of 8 at 2K (one wave of 256 blocks)
  EXPECT_EQ(c::query_tiles_per_block(64, 256, 2, 132), 64);
  EXPECT_EQ(c::query_tiles_per_block(64, 32, 2, 132), 8);
  EXPECT_EQ(c::query_tiles_per_block(64, 0, 2, 132), 1);
}

TEST(Grid, BlocksBySharedMemory) {
  namespace c = nystrom::cuda;
  const size_t h100 = 227 * 1024, a100 = 163 * 1024;
  EXPECT_EQ(c::blocks_by_smem(176 * 1024, h100), 1);
  EXPECT_EQ(c::blocks_by_smem(56 * 1024, h100), 4);
  EXPECT_EQ(c::blocks_by_smem(56 * 1024, a100), 2);
  EXPECT_EQ(c::blocks_by_smem(0, h100), 8);          // capped
  EXPECT_EQ(c::blocks_by_smem(300 * 1024, h100), 1);  // never 0: the launch itself refuses
}

}  // namespace
