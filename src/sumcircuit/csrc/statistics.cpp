// The statistics kernels of sumcircuit/kernels.py, each one pass over its inputs.
//
// Why by hand: written in torch, the tile statistics stream the score tile
// through memory once per step; compiled by inductor still five times (two max
// loops, the exp with its sums into a temporary, two copies back). Here each
// row of both tiles is read once for its max and once for everything else while
// it sits in L1, and keys past the causal limit are neither exponentiated nor
// summed. ATen's own vectorized exp (the one torch.exp uses) keeps the rounding
// of the eager kernel. The column moments and weight norms are single passes
// too, summed in fp32 within fixed chunks and in fp64 beyond (the rounding of
// a pairwise sum), in an order that does not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

float horizontal_max(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  return *std::max_element(lanes, lanes + Vec::size());
}

float horizontal_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

// Two tensors a kernel walks side by side through raw pointers: one shape (of `dims` dimensions,
// any if negative), fp32, on the CPU, contiguous.
void check_pair(const at::Tensor& a, const at::Tensor& b, int64_t dims, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes() && (dims < 0 || a.dim() == dims), what, " must have one shape");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, what, " must be fp32");
  TORCH_CHECK(a.is_cpu() && b.is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), what, " must be contiguous");
}

// One row of both models: b and t become exp(s - max s) on [0, n) and 0 on [n, k);
// out gets z_b, z_t, sum e_b d_b, sum e_b d_t, sum e_t d_t, sum e_t d_b (d = s - max s).
void row_stats(float* b, float* t, int64_t n, int64_t k, float out[6]) {
  const int64_t w = Vec::size(), n_vec = n - n % w;
  Vec max_b(-std::numeric_limits<float>::infinity()), max_t = max_b;
  for (int64_t j = 0; j < n_vec; j += w) {
    max_b = at::vec::maximum(max_b, Vec::loadu(b + j));
    max_t = at::vec::maximum(max_t, Vec::loadu(t + j));
  }
  float mb = horizontal_max(max_b), mt = horizontal_max(max_t);
  for (int64_t j = n_vec; j < n; ++j) {
    mb = std::max(mb, b[j]);
    mt = std::max(mt, t[j]);
  }
  const Vec vmb(mb), vmt(mt);
  Vec zb(0.f), zt(0.f), bb(0.f), bt(0.f), tt(0.f), tb(0.f);
  for (int64_t j = 0; j < n_vec; j += w) {
    const Vec db = Vec::loadu(b + j) - vmb, dt = Vec::loadu(t + j) - vmt;
    const Vec eb = db.exp(), et = dt.exp();
    eb.store(b + j);
    et.store(t + j);
    zb = zb + eb;
    zt = zt + et;
    bb = at::vec::fmadd(eb, db, bb);
    bt = at::vec::fmadd(eb, dt, bt);
    tt = at::vec::fmadd(et, dt, tt);
    tb = at::vec::fmadd(et, db, tb);
  }
  float s[6] = {horizontal_sum(zb), horizontal_sum(zt), horizontal_sum(bb),
                horizontal_sum(bt), horizontal_sum(tt), horizontal_sum(tb)};
  for (int64_t j = n_vec; j < n; ++j) {
    const float db = b[j] - mb, dt = t[j] - mt, eb = std::exp(db), et = std::exp(dt);
    b[j] = eb;
    t[j] = et;
    s[0] += eb; s[1] += et; s[2] += eb * db; s[3] += eb * dt; s[4] += et * dt; s[5] += et * db;
  }
  std::fill(b + n, b + k, 0.f);
  std::fill(t + n, t + k, 0.f);
  std::copy(s, s + 6, out);
}

}  // namespace

// scores_base, scores_tuned: contiguous fp32 [N, R, K], overwritten with exp(s - max s).
// causal_from < 0: every key counts (masked keys already carry a very negative score);
// otherwise row r of a group sees keys [0, causal_from + r / n_rep + 1) only.
// Returns dots [4, N, R] (sum p_b lp_b, sum p_b lp_t, sum p_t lp_t, sum p_t lp_b) and z [2, N, R].
std::vector<at::Tensor> tile_stats(at::Tensor scores_base, at::Tensor scores_tuned, int64_t causal_from,
                                   int64_t n_rep) {
  check_pair(scores_base, scores_tuned, 3, "score tiles [N, R, K]");
  TORCH_CHECK(n_rep > 0, "n_rep must be positive");
  const int64_t groups = scores_base.size(0), rows = scores_base.size(1), keys = scores_base.size(2);
  const int64_t total = groups * rows;
  auto dots = at::empty({4, groups, rows}, scores_base.options());
  auto z = at::empty({2, groups, rows}, scores_base.options());
  float* base = scores_base.data_ptr<float>();
  float* tuned = scores_tuned.data_ptr<float>();
  float* d = dots.data_ptr<float>();
  float* zs = z.data_ptr<float>();
  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
    float s[6];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = causal_from < 0 ? keys : std::min(keys, causal_from + (r % rows) / n_rep + 1);
      row_stats(base + r * keys, tuned + r * keys, n, keys, s);
      const float log_b = std::log(s[0]), log_t = std::log(s[1]);
      d[r] = s[2] / s[0] - log_b;
      d[total + r] = s[3] / s[0] - log_t;
      d[2 * total + r] = s[4] / s[1] - log_t;
      d[3 * total + r] = s[5] / s[1] - log_b;
      zs[r] = s[0];
      zs[total + r] = s[1];
    }
  });
  return {dots, z};
}

// base, tuned: contiguous fp32 [N, F]. Returns [5, F] fp64 column sums of b, b^2, t, t^2, |t - b|,
// fp32 within chunks of `chunk` rows.
at::Tensor column_moments(at::Tensor base, at::Tensor tuned, int64_t chunk) {
  check_pair(base, tuned, 2, "activations [N, F]");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t n = base.size(0), f = base.size(1), w = Vec::size();
  auto out = at::zeros({5, f}, base.options().dtype(at::kDouble));
  const float* pb = base.data_ptr<float>();
  const float* pt = tuned.data_ptr<float>();
  double* po = out.data_ptr<double>();
  // Each thread owns a range of columns and walks the rows in order (contiguous reads); its fp32
  // chunk sums and fp64 totals for that range stay in L1. Per column the order of additions is
  // fixed (rows in order, chunk by chunk), whatever the number of threads.
  at::parallel_for(0, (f + w - 1) / w, 8, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * w, c1 = std::min(f, end * w), width = c1 - c0;
    std::vector<float> part(5 * width);
    std::vector<double> total(5 * width, 0.0);
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      std::fill(part.begin(), part.end(), 0.f);
      for (int64_t r = r0; r < std::min(n, r0 + chunk); ++r) {
        const float* rb = pb + r * f + c0;
        const float* rt = pt + r * f + c0;
        for (int64_t j = 0; j < width; j += w) {
          const int64_t m = std::min(w, width - j);
          const Vec b = Vec::loadu(rb + j, m), t = Vec::loadu(rt + j, m);
          float* acc = part.data() + j;
          (Vec::loadu(acc, m) + b).store(acc, m);
          at::vec::fmadd(b, b, Vec::loadu(acc + width, m)).store(acc + width, m);
          (Vec::loadu(acc + 2 * width, m) + t).store(acc + 2 * width, m);
          at::vec::fmadd(t, t, Vec::loadu(acc + 3 * width, m)).store(acc + 3 * width, m);
          (Vec::loadu(acc + 4 * width, m) + (t - b).abs()).store(acc + 4 * width, m);
        }
      }
      for (int64_t i = 0; i < 5 * width; ++i) total[i] += part[i];
    }
    for (int k = 0; k < 5; ++k)
      std::copy(total.begin() + k * width, total.begin() + (k + 1) * width, po + k * f + c0);
  });
  return out;
}

// tuned, base: contiguous fp32 of one size. Returns [2] fp64: sum (t - b)^2 and sum b^2,
// fp32 within chunks of `chunk` elements.
at::Tensor squared_norms(at::Tensor tuned, at::Tensor base, int64_t chunk) {
  check_pair(tuned, base, -1, "weights");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t n = base.numel(), w = Vec::size(), chunks = (n + chunk - 1) / chunk;
  auto partial = at::empty({chunks, 2}, base.options().dtype(at::kDouble));
  const float* pb = base.data_ptr<float>();
  const float* pt = tuned.data_ptr<float>();
  double* pp = partial.data_ptr<double>();
  at::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t i0 = c * chunk, i1 = std::min(n, i0 + chunk);
      Vec dd(0.f), bb(0.f);
      for (int64_t i = i0; i < i1; i += w) {
        const int64_t width = std::min(w, i1 - i);
        const Vec b = Vec::loadu(pb + i, width), d = Vec::loadu(pt + i, width) - b;
        dd = at::vec::fmadd(d, d, dd);
        bb = at::vec::fmadd(b, b, bb);
      }
      pp[2 * c] = horizontal_sum(dd);
      pp[2 * c + 1] = horizontal_sum(bb);
    }
  });
  return partial.sum(0);
}

// How many threads at::parallel_for used over `n` items: 1 if the module was built without OpenMP.
int64_t parallel_threads(int64_t n) {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    int64_t mine = at::get_thread_num() + 1, seen = most.load();
    while (mine > seen && !most.compare_exchange_weak(seen, mine)) {
    }
  });
  return most.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads, "threads at::parallel_for used (a build check)");
  m.def("tile_stats", &tile_stats, "Row statistics of two score tiles; the tiles become exp(s - max s)");
  m.def("column_moments", &column_moments, "Column sums of b, b^2, t, t^2, |t - b| in fp64");
  m.def("squared_norms", &squared_norms, "sum (t - b)^2 and sum b^2 in fp64");
}
