// The routing-consistency token table's update, fused for the CPU (fastdiag/ops/token_table.py
// holds the torch code for other devices, the table's layout and its semantics).
//
// token_table_update_(keys, vals, max_id, ids, sets, step) -> float64 [3]
//   keys / vals  int64 [capacity + 1], direct-mapped (slot = id % capacity, -1 = empty, the
//                last slot is the torch code's sink and is never touched here), in place
//   max_id       int64 0-d, the largest valid id ever seen, in place
//   ids          integer, any shape (< 0 = padding)
//   sets         integer, the shape of ids, or ids' shape + [k] (then the first of the k)
//   step         t >= 1, the caller's update count (for the running-max term below)
// Returns [consistency, overflow, t * max_after - (t - 1) * max_before]:
//   consistency  share of the valid tokens (id >= 0 and set >= 0) whose own id sits in its slot
//                before this batch (seen) and whose set there equals this one; NaN if none seen
//   overflow     number of valid ids >= capacity
// Reads for every token happen against the table before the batch, then the writes go in flat
// order, so the last occurrence of an id (or of a slot) in the batch wins.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace {

template <typename I, typename S>
void token_pass(int64_t* keys, int64_t* vals, int64_t cap, const I* ids, const S* sets, int64_t n,
                int64_t k, double* seen_same, int64_t* overflow, int64_t* max_id) {
  int64_t seen = 0, same = 0, over = 0, best = *max_id;
  for (int64_t i = 0; i < n; ++i) {  // reads: the table as it was before the batch
    const int64_t id = static_cast<int64_t>(ids[i]);
    const int64_t set = static_cast<int64_t>(sets[i * k]);
    if (id < 0 || set < 0) continue;
    const int64_t slot = id % cap;
    if (keys[slot] == id) {
      ++seen;
      same += vals[slot] == set;
    }
    over += id >= cap;
    best = std::max(best, id);
  }
  for (int64_t i = 0; i < n; ++i) {  // writes, in flat order: the last occurrence wins
    const int64_t id = static_cast<int64_t>(ids[i]);
    const int64_t set = static_cast<int64_t>(sets[i * k]);
    if (id < 0 || set < 0) continue;
    const int64_t slot = id % cap;
    keys[slot] = id;
    vals[slot] = set;
  }
  seen_same[0] = static_cast<double>(seen);
  seen_same[1] = static_cast<double>(same);
  *overflow = over;
  *max_id = best;
}

at::Tensor token_table_update_(at::Tensor keys, at::Tensor vals, at::Tensor max_id, const at::Tensor& ids_in,
                               const at::Tensor& sets_in, int64_t step) {
  TORCH_CHECK(keys.scalar_type() == at::kLong && vals.scalar_type() == at::kLong && max_id.scalar_type() == at::kLong,
              "token_table_update_: keys, vals and max_id must be int64");
  TORCH_CHECK(keys.dim() == 1 && keys.is_contiguous() && vals.is_contiguous() && vals.numel() == keys.numel() &&
                  keys.numel() >= 2,
              "token_table_update_: keys / vals must be contiguous int64 [capacity + 1], capacity >= 1");
  TORCH_CHECK(max_id.numel() == 1, "token_table_update_: max_id must hold one value");
  TORCH_CHECK(!at::isFloatingType(ids_in.scalar_type()) && !at::isFloatingType(sets_in.scalar_type()) &&
                  ids_in.scalar_type() != at::kBool && sets_in.scalar_type() != at::kBool,
              "token_table_update_: ids and sets must be integer tensors");
  const int64_t n = ids_in.numel();
  int64_t k = 1;
  if (sets_in.numel() != n) {
    TORCH_CHECK(sets_in.dim() == ids_in.dim() + 1 && sets_in.size(-1) > 0 && sets_in.numel() == n * sets_in.size(-1),
                "token_table_update_: sets must have the shape of ids, or ids' shape + [k]");
    k = sets_in.size(-1);
  }
  TORCH_CHECK(step >= 1, "token_table_update_: step must be >= 1");
  const auto ids = ids_in.contiguous();
  const auto sets = sets_in.contiguous();
  const int64_t cap = keys.numel() - 1;
  int64_t* mx = max_id.data_ptr<int64_t>();
  const int64_t before = *mx;
  double counts[2] = {0.0, 0.0};
  int64_t overflow = 0;
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "token_table_ids", [&] {
    using I = scalar_t;
    const I* pi = ids.const_data_ptr<I>();
    AT_DISPATCH_INTEGRAL_TYPES(sets.scalar_type(), "token_table_sets", [&] {
      token_pass<I, scalar_t>(keys.data_ptr<int64_t>(), vals.data_ptr<int64_t>(), cap, pi,
                              sets.const_data_ptr<scalar_t>(), n, k, counts, &overflow, mx);
    });
  });
  auto out = at::empty({3}, keys.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = counts[1] / counts[0];  // 0 / 0 = NaN: no token seen before
  o[1] = static_cast<double>(overflow);
  const double t = static_cast<double>(step);
  o[2] = t * static_cast<double>(*mx) - (t - 1.0) * static_cast<double>(before);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiag, m) {
  m.def(
      "token_table_update_(Tensor(a!) keys, Tensor(b!) vals, Tensor(c!) max_id, Tensor ids, Tensor sets, "
      "int step) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiag, CPU, m) { m.impl("token_table_update_", &token_table_update_); }
