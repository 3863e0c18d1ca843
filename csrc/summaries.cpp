// Per-update summaries of the diagnostics classes, fused for the CPU (fastdiag/ops/summaries.py
// holds the torch code for other devices and the layouts of the value vectors).
//
// accumulate_     state[slots[j]] += (values[src[j]], 1, 0) for every finite value and
//                 (0, 0, 1) for every infinite one (in place; NaN = undefined adds nothing)
// dist_summary    every derived value of a dist_stats result (+ the top-k Jaccards) in one vector
// usage_summary   counts of bank indices and every usage statistic (+ the reuse Jaccard)
// attention_values the training integration's per-layer [entropy, sparsity, top1, effective
//                 heads, normalised entropy] from per-head rows
// param_norms_    gradient norm, parameter norm and change against the previous parameters
//                 (+ the call-order flags gradient_missing and moved),
//                 refreshing the previous copies in place
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// sum, count slots of dist_stats (fastdiag/ops/_dist_stats.py Slot / HeadSlot)
constexpr int COUNT = 0, ENTROPY = 1, MAX = 3, MAX_SQ = 4, GT_TAU = 6, GT_EPS = 7, NONFINITE = 14;
constexpr int H_ENTROPY = 0, H_GT_TAU = 2, H_NUM = 4;
constexpr int R_ENTROPY = 0, R_GT_EPS = 2, R_NUM = 4;  // RowSlot
constexpr double EFFECTIVE_HEAD_ENTROPY = 0.9;  // fastdiag.schema.EFFECTIVE_HEAD_ENTROPY
constexpr int64_t DIST_NUM = 14, USAGE_NUM = 11;

void accumulate_(at::Tensor state, const at::Tensor& slots, const at::Tensor& src, const at::Tensor& values) {
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.is_contiguous() && state.dim() == 2 &&
                  state.size(1) == 3,
              "state: f64 [K, 3]");
  TORCH_CHECK(values.scalar_type() == at::kDouble, "values must be float64");
  TORCH_CHECK(slots.scalar_type() == at::kLong && src.scalar_type() == at::kLong && slots.numel() == src.numel(),
              "slots / src: int64 of one length");
  auto v = values.contiguous();
  auto sl = slots.contiguous();
  auto sr = src.contiguous();
  double* s = state.data_ptr<double>();
  const double* pv = v.const_data_ptr<double>();
  const int64_t* ps = sl.const_data_ptr<int64_t>();
  const int64_t* pr = sr.const_data_ptr<int64_t>();
  const int64_t k = state.size(0), n = v.numel();
  for (int64_t j = 0; j < sl.numel(); ++j) {
    TORCH_CHECK(ps[j] >= 0 && ps[j] < k && pr[j] >= 0 && pr[j] < n, "accumulate_: index out of range");
    const double x = pv[pr[j]];
    if (std::isfinite(x)) {
      s[3 * ps[j]] += x;
      s[3 * ps[j] + 1] += 1.0;
    } else if (std::isinf(x)) {
      s[3 * ps[j] + 2] += 1.0;
    }
  }
}

double bitmap_jaccard(const bool* a, int64_t na, const bool* b, int64_t nb) {
  int64_t inter = 0, uni = 0;
  const int64_t n = std::max(na, nb);
  for (int64_t i = 0; i < n; ++i) {
    const bool x = i < na && a[i], y = i < nb && b[i];
    inter += x && y;
    uni += x || y;
  }
  return uni > 0 ? static_cast<double>(inter) / static_cast<double>(uni) : 0.0;
}

std::tuple<at::Tensor, at::Tensor> dist_summary(const at::Tensor& sums_in, const at::Tensor& head_sums_in,
                                                const at::Tensor& topk_in, const std::optional<at::Tensor>& prev_top,
                                                const std::optional<at::Tensor>& prev_bitmap, int64_t n,
                                                bool from_heads, bool jaccard) {
  auto sums = sums_in.to(at::kDouble).contiguous();
  auto hs = head_sums_in.to(at::kDouble).contiguous();
  const double* S = sums.const_data_ptr<double>();
  auto out = at::empty({DIST_NUM}, sums.options());
  double* o = out.data_ptr<double>();
  const double c = S[COUNT], dn = static_cast<double>(n);
  const double logn = std::log(dn);
  const double h = S[ENTROPY] / c;
  o[0] = h;
  o[1] = n > 1 ? h / logn : h * kNaN;
  o[2] = S[MAX] / c;
  {
    const double m = S[MAX] / c;
    double var = (S[MAX_SQ] - c * m * m) / (c - 1);
    var = var < 0 ? 0.0 : var;
    o[3] = std::sqrt(var);
  }
  o[4] = logn - h;
  o[5] = S[GT_TAU] / (c * dn);
  o[6] = S[GT_EPS] / c;
  o[7] = 1 - S[GT_EPS] / (c * dn);
  o[8] = S[NONFINITE];
  // per head
  int64_t g = 1;
  double gt_tau = S[GT_TAU];
  std::vector<double> head_h(1, S[ENTROPY]);
  if (from_heads) {
    TORCH_CHECK(hs.dim() == 2 && hs.size(1) == H_NUM, "head_sums: [G, 4]");
    g = hs.size(0);
    const double* H = hs.const_data_ptr<double>();
    head_h.assign(g, 0.0);
    gt_tau = 0.0;
    for (int64_t i = 0; i < g; ++i) {
      head_h[i] = H[i * H_NUM + H_ENTROPY];
      gt_tau += H[i * H_NUM + H_GT_TAU];
    }
  }
  const double dg = static_cast<double>(g);
  o[9] = gt_tau / (c * dg * dn);
  double hsum = 0.0;
  double effective = 0.0;
  for (int64_t i = 0; i < g; ++i) {
    hsum += head_h[i];
    const double per = n > 1 ? (head_h[i] / c) / logn : kNaN;
    effective += per < EFFECTIVE_HEAD_ENTROPY ? 1.0 : 0.0;
  }
  o[10] = hsum / (c * dg);
  o[11] = c > 0 ? effective / dg : kNaN;
  o[12] = kNaN;
  o[13] = kNaN;
  at::Tensor bitmap = at::zeros({jaccard ? n : 0}, sums.options().dtype(at::kBool));
  if (jaccard) {
    auto top = topk_in.contiguous();
    TORCH_CHECK(top.scalar_type() == at::kLong, "topk: int64");
    bool* bm = bitmap.data_ptr<bool>();
    const int64_t* t = top.const_data_ptr<int64_t>();
    const int64_t total = top.numel();
    for (int64_t i = 0; i < total; ++i) {
      if (t[i] >= 0 && t[i] < n) bm[t[i]] = true;
    }
    if (prev_bitmap.has_value() && prev_bitmap->defined()) {
      auto pb = prev_bitmap->to(at::kBool).contiguous();
      o[12] = bitmap_jaccard(bm, n, pb.const_data_ptr<bool>(), pb.numel());
      if (prev_top.has_value() && prev_top->defined() && prev_top->sizes() == top.sizes()) {
        auto pt = prev_top->contiguous();
        const int64_t* p = pt.const_data_ptr<int64_t>();
        const int64_t k = top.dim() ? top.size(-1) : 0;
        const int64_t rows = k > 0 ? total / k : 0;
        double acc = 0.0;
        int64_t valid = 0;
        for (int64_t r = 0; r < rows && k > 0; ++r) {
          const int64_t* a = t + r * k;
          const int64_t* b = p + r * k;
          bool ok = true;
          int64_t inter = 0;
          for (int64_t i = 0; i < k; ++i) {
            ok = ok && a[i] >= 0 && b[i] >= 0;
            for (int64_t j = 0; j < k; ++j) inter += a[i] == b[j];
          }
          if (ok) {
            acc += static_cast<double>(inter) / static_cast<double>(2 * k - inter);
            ++valid;
          }
        }
        o[13] = acc / static_cast<double>(valid);
      }
    }
  }
  return {out, bitmap};
}

std::tuple<at::Tensor, at::Tensor> usage_summary(const at::Tensor& indices, int64_t s,
                                                 const std::optional<at::Tensor>& prev_active) {
  TORCH_CHECK(s >= 1, "num_sets must be >= 1");
  std::vector<int64_t> counts(s, 0);
  int64_t out_of_range = 0;
  auto idx = indices.contiguous();
  AT_DISPATCH_INTEGRAL_TYPES(idx.scalar_type(), "usage_summary", [&] {
    const scalar_t* p = idx.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < idx.numel(); ++i) {
      const int64_t v = static_cast<int64_t>(p[i]);
      if (v < 0) continue;
      if (v >= s) {
        ++out_of_range;
      } else {
        ++counts[v];
      }
    }
  });
  auto opts = at::TensorOptions().dtype(at::kDouble).device(indices.device());
  auto out = at::empty({USAGE_NUM}, opts);
  auto active = at::empty({s}, opts.dtype(at::kBool));
  double* o = out.data_ptr<double>();
  bool* act = active.data_ptr<bool>();
  double total = 0.0, n_active = 0.0;
  for (int64_t i = 0; i < s; ++i) {
    act[i] = counts[i] > 0;
    total += static_cast<double>(counts[i]);
    n_active += act[i] ? 1.0 : 0.0;
  }
  const bool ok = total > 0;
  const double ds = static_cast<double>(s);
  const double denom = ok ? total : 1.0;
  double entropy = 0.0, top1 = 0.0;
  std::vector<double> sorted(s);
  for (int64_t i = 0; i < s; ++i) {
    const double u = static_cast<double>(counts[i]) / denom;
    entropy += u > 0 ? -u * std::log(u) : 0.0;
    top1 = std::max(top1, u);
    sorted[i] = static_cast<double>(counts[i]);
  }
  std::sort(sorted.begin(), sorted.end());
  double gini_num = 0.0;
  for (int64_t i = 0; i < s; ++i) gini_num += sorted[i] * (2.0 * static_cast<double>(i) - ds + 1.0);
  const double size_mean = total / n_active;
  double dev2 = 0.0, mean_all = total / ds, var2 = 0.0;
  for (int64_t i = 0; i < s; ++i) {
    const double c = static_cast<double>(counts[i]);
    if (act[i]) dev2 += (c - size_mean) * (c - size_mean);
    var2 += (c - mean_all) * (c - mean_all);
  }
  const double ratio = n_active / ds;
  o[0] = ok ? ratio : kNaN;
  o[1] = ok ? size_mean : kNaN;
  o[2] = n_active > 1 ? std::sqrt(dev2 / (n_active - 1)) : kNaN;
  o[3] = ok ? entropy : kNaN;
  o[4] = (ok && s > 1) ? entropy / std::log(ds) : kNaN;
  o[5] = ok ? gini_num / (ds * total) : kNaN;
  o[6] = ok ? top1 : kNaN;
  o[7] = kNaN;
  if (prev_active.has_value() && prev_active->defined()) {
    auto pa = prev_active->to(at::kBool).contiguous();
    o[7] = bitmap_jaccard(act, s, pa.const_data_ptr<bool>(), pa.numel());
  }
  o[8] = s > 1 ? var2 / (ds - 1) : kNaN;
  o[9] = static_cast<double>(out_of_range);
  o[10] = ratio;
  return {out, active};
}

template <typename T>
void sq_sums(const at::Tensor& p, const at::Tensor* prev, double& norm2, double& diff2, bool copy) {
  const T* a = p.const_data_ptr<T>();
  const int64_t n = p.numel();
  if (prev == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const double x = static_cast<double>(static_cast<float>(a[i]));
      norm2 += x * x;
    }
    return;
  }
  T* b = prev->data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(static_cast<float>(a[i]));
    const double d = x - static_cast<double>(static_cast<float>(b[i]));
    norm2 += x * x;
    diff2 += d * d;
    if (copy) b[i] = a[i];
  }
}

template <>
void sq_sums<double>(const at::Tensor& p, const at::Tensor* prev, double& norm2, double& diff2, bool copy) {
  const double* a = p.const_data_ptr<double>();
  const int64_t n = p.numel();
  double* b = prev ? prev->data_ptr<double>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    norm2 += a[i] * a[i];
    if (b) {
      const double d = a[i] - b[i];
      diff2 += d * d;
      if (copy) b[i] = a[i];
    }
  }
}

void add_sq(const at::Tensor& t_in, const at::Tensor* prev, double& norm2, double& diff2) {
  auto t = t_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "param_norms", [&] {
    sq_sums<scalar_t>(t, prev, norm2, diff2, prev != nullptr);
  });
}

at::Tensor param_norms_(at::TensorList params, at::TensorList grads, at::TensorList prev, bool has_prev) {
  TORCH_CHECK(!has_prev || prev.size() == params.size(), "prev must match params");
  double g2 = 0.0, p2 = 0.0, d2 = 0.0, unused = 0.0;
  for (const auto& g : grads) add_sq(g, nullptr, g2, unused);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor* q = nullptr;
    if (has_prev) {
      TORCH_CHECK(prev[i].is_contiguous() && prev[i].scalar_type() == params[i].scalar_type() &&
                      prev[i].numel() == params[i].numel(),
                  "prev[", i, "] must be a contiguous copy of params[", i, "]");
      q = &prev[i];
    }
    add_sq(params[i], q, p2, d2);
  }
  auto out = at::empty({5}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  // a norm over NaN entries is reported as +inf: non-finite data, not "undefined" (NaN)
  const auto norm = [](double sq) { return std::isnan(sq) ? kInf : std::sqrt(sq); };
  o[0] = norm(g2);
  o[1] = norm(p2);
  o[2] = has_prev ? norm(d2) : kNaN;
  o[3] = o[0] == 0.0 ? 1.0 : 0.0;                      // gradient_missing (None or all zero)
  o[4] = has_prev ? (o[2] > 0.0 ? 1.0 : 0.0) : kNaN;  // moved since the previous update
  return out;
}

}  // namespace

// fastdiag.ops.summaries.attention_values: [entropy, sparsity, top1, effective heads, entropy_norm]
// of a dist_stats result over every per-head row (no reduce_dim, rows=True, eps=0): means over the
// valid rows; per valid row with n = GT_EPS >= 2 attendable keys, H / log n; entropy_norm is its
// mean, a head is effective when its mean of it is below `threshold` (none without such a row)
at::Tensor attention_values(const at::Tensor& sums_in, const at::Tensor& rows_in, int64_t nk,
                            double threshold) {
  auto sums = sums_in.to(at::kDouble).contiguous();
  TORCH_CHECK(rows_in.dim() >= 3 && rows_in.size(-1) == R_NUM, "rows: [B, H, ..., 4]");
  auto rows = rows_in.to(at::kFloat).contiguous();
  const double* S = sums.const_data_ptr<double>();
  const float* R = rows.const_data_ptr<float>();
  const int64_t outer = rows.size(0), heads = rows.size(1);
  const int64_t inner = heads > 0 && outer > 0 ? rows.numel() / (R_NUM * outer * heads) : 0;
  const double c = S[COUNT], dn = static_cast<double>(nk);
  std::vector<double> hsum(heads, 0.0), hcnt(heads, 0.0);
  double usum = 0, ucnt = 0;
  for (int64_t b = 0; b < outer; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* r = R + ((b * heads + h) * inner) * R_NUM;
      for (int64_t i = 0; i < inner; ++i, r += R_NUM) {
        const double n = r[R_GT_EPS];
        if (!(n >= 2.0)) continue;  // invalid (NaN) rows and rows of one key
        const double u = static_cast<double>(r[R_ENTROPY]) / std::log(n);
        hsum[h] += u;
        hcnt[h] += 1.0;
      }
    }
  }
  double effective = 0;
  for (int64_t h = 0; h < heads; ++h) {
    usum += hsum[h];
    ucnt += hcnt[h];
    effective += hsum[h] / hcnt[h] < threshold ? 1.0 : 0.0;  // 0 / 0 = NaN: not effective
  }
  auto out = at::empty({5}, sums.options());
  double* o = out.data_ptr<double>();
  o[0] = S[ENTROPY] / c;
  o[1] = S[GT_TAU] / (c * dn);
  o[2] = S[MAX] / c;
  o[3] = c > 0 ? effective / static_cast<double>(heads) : kNaN;
  o[4] = usum / ucnt;
  return out;
}

TORCH_LIBRARY_FRAGMENT(fastdiag, m) {
  m.def("accumulate_(Tensor(a!) state, Tensor slots, Tensor src, Tensor values) -> ()");
  m.def(
      "dist_summary(Tensor sums, Tensor head_sums, Tensor topk, Tensor? prev_top, Tensor? prev_bitmap, "
      "SymInt n, bool from_heads, bool jaccard) -> (Tensor, Tensor)");
  m.def("usage_summary(Tensor indices, int num_sets, Tensor? prev_active) -> (Tensor, Tensor)");
  m.def("param_norms_(Tensor[] params, Tensor[] grads, Tensor(a!)[] prev, bool has_prev) -> Tensor");
  m.def("attention_values(Tensor sums, Tensor rows, SymInt nk, float threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiag, CPU, m) {
  m.impl("accumulate_", &accumulate_);
  m.impl("dist_summary", &dist_summary);
  m.impl("usage_summary", &usage_summary);
  m.impl("param_norms_", &param_norms_);
  m.impl("attention_values", &attention_values);
}
