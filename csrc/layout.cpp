// C++ fast path of the PMLM example builder: pmlm_engine.layout.build_example_python, draw for
// draw. The contract (pmlm_engine/masking.py docstring) is the order of SplitMix64 draws:
//   1. span sampling, per attempt: start = randbelow(n); u = uniform();
//      if u < span_prob: length = span_min + randbelow(span_max - span_min + 1);
//   2. factorization order: Fisher-Yates, for i = S-1 .. 1: j = randbelow(i + 1);
//   3. corruption, per masked position in increasing order: u = uniform(), and for a random
//      replacement randbelow(random_hi - random_lo).
// No torch headers: pure pybind11 + numpy, so the extension builds against any torch.

#include "layout.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <sstream>
#include <utility>

#include "bindings.h"
#include "splitmix64.h"

namespace pmlm {

namespace {

using Span = std::pair<int64_t, int64_t>;  // [start, end) in main-sequence positions

// True when some span could still be accepted, i.e. the sampling loop can make progress.
// Only reachable draws count: length 1 needs uniform() >= span_prob, possible iff span_prob < 1
// (uniform() < 1 always); a multi-token span needs span_prob > 0 and an untaken maskable run
// of at least span_min tokens.
bool can_progress(const uint8_t* maskable, const std::vector<uint8_t>& taken, int64_t m,
                  const LayoutParams& p) {
  int64_t run = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (maskable[i] && !taken[i]) {
      if (p.span_prob < 1.0) return true;
      if (++run >= p.span_min && p.span_prob > 0.0) return true;
    } else {
      run = 0;
    }
  }
  return false;
}

// Step 1 of the contract: masking.sample_spans. Marks the accepted spans in `taken`.
std::vector<Span> sample_spans(const uint8_t* maskable, int64_t m, SplitMix64& rng,
                               const LayoutParams& p, std::vector<uint8_t>& taken,
                               int64_t& masked_count) {
  std::vector<int64_t> positions;
  positions.reserve(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i)
    if (maskable[i]) positions.push_back(i);
  const int64_t n = static_cast<int64_t>(positions.size());
  std::vector<Span> spans;
  masked_count = 0;
  if (n == 0) return spans;
  // Same IEEE double product and ceil as Python's math.ceil(cfg.mask_ratio * n).
  const int64_t budget = static_cast<int64_t>(std::ceil(p.mask_ratio * static_cast<double>(n)));
  const uint64_t length_range = static_cast<uint64_t>(p.span_max - p.span_min + 1);
  // No span can be accepted when span_prob == 1 and every untaken run is shorter than span_min.
  // After many rejections in a row check whether progress is still possible (masking.py does the
  // same at the same count, with the same message); the check draws nothing.
  const int64_t check_every = 4096 + 64 * m;
  int64_t rejected = 0;
  while (masked_count < budget) {
    const int64_t start = positions[rng.randbelow(static_cast<uint64_t>(n))];
    int64_t length = 1;
    if (rng.uniform() < p.span_prob)
      length = p.span_min + static_cast<int64_t>(rng.randbelow(length_range));
    const int64_t end = start + length;
    bool ok = end <= m;
    for (int64_t q = start; ok && q < end; ++q) ok = maskable[q] && !taken[q];
    if (!ok) {
      if (++rejected >= check_every) {
        if (!can_progress(maskable, taken, m, p)) {
          std::ostringstream msg;
          msg << "span sampling cannot reach its budget: " << masked_count << " of " << budget
              << " tokens masked and no span can be accepted with span_prob=" << p.span_prob
              << ", span_min=" << p.span_min
              << " (every untaken maskable run is shorter than span_min); lower span_min or use "
                 "span_prob < 1";
          throw LayoutError(msg.str());
        }
        rejected = 0;
      }
      continue;
    }
    rejected = 0;
    for (int64_t q = start; q < end; ++q) taken[q] = 1;
    spans.emplace_back(start, end);
    masked_count += length;
  }
  return spans;
}

}  // namespace

LayoutResult build_example_core(const int64_t* tokens, const int64_t* segment_ids,
                                const uint8_t* maskable, int64_t m, uint64_t seed,
                                const LayoutParams& p) {
  SplitMix64 rng(seed);
  std::vector<uint8_t> taken(static_cast<size_t>(m), 0);
  int64_t masked_count = 0;
  std::vector<Span> spans = sample_spans(maskable, m, rng, p, taken, masked_count);

  // Step 2: masking.shuffle_spans (Fisher-Yates over the acceptance order).
  for (int64_t i = static_cast<int64_t>(spans.size()) - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.randbelow(static_cast<uint64_t>(i + 1)));
    std::swap(spans[i], spans[j]);
  }

  LayoutResult out;
  out.num_main = m;
  out.length = m + 2 * masked_count;
  const int64_t len = out.length;
  out.buffer.resize(static_cast<size_t>(5 * len));
  int64_t* ids = out.buffer.data();
  int64_t* pos = ids + len;
  int64_t* seg = pos + len;
  int64_t* step = seg + len;
  int64_t* labels = step + len;

  // Step 3: masking.corrupt, masked positions in increasing order (`taken` is their union);
  // main labels are the original tokens of the masked positions (AE labels).
  const uint64_t random_range = static_cast<uint64_t>(p.random_hi - p.random_lo);
  const double keep_threshold = p.mask_prob + p.random_prob;  // same double sum as Python
  for (int64_t i = 0; i < m; ++i) {
    ids[i] = tokens[i];
    pos[i] = i;
    seg[i] = segment_ids[i];
    step[i] = 0;
    labels[i] = kIgnore;
    if (!taken[i]) continue;
    labels[i] = tokens[i];
    const double u = rng.uniform();
    if (u < p.mask_prob)
      ids[i] = p.mask_id;
    else if (u < keep_threshold)
      ids[i] = p.random_lo + static_cast<int64_t>(rng.randbelow(random_range));
  }

  // layout._append_steps: per step s, the ORIGINAL span (+s) then one [P] per token (-s).
  int64_t t = m;
  int64_t s = 0;
  for (const Span& span : spans) {
    ++s;
    for (int64_t q = span.first; q < span.second; ++q, ++t) {
      ids[t] = tokens[q];
      pos[t] = q;
      seg[t] = segment_ids[q];
      step[t] = s;
      labels[t] = kIgnore;
    }
    for (int64_t q = span.first; q < span.second; ++q, ++t) {
      ids[t] = p.pseudo_id;
      pos[t] = q;
      seg[t] = segment_ids[q];
      step[t] = -s;
      labels[t] = tokens[q];
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Python binding

namespace {

namespace py = pybind11;

constexpr uint64_t kTwo32 = uint64_t{1} << 32;

template <class T>
std::string repr(const T& value) {
  std::ostringstream s;
  s << value;
  return s.str();
}

[[noreturn]] void bad(const std::string& msg) { throw py::value_error(msg); }

// Validated view of one input sequence; `owner` keeps the numpy buffers alive.
struct SequenceView {
  py::array tokens, segment_ids, maskable;
  const int64_t* tok = nullptr;
  const int64_t* seg = nullptr;
  const uint8_t* mask = nullptr;
  int64_t m = 0;
  uint64_t seed = 0;
};

void check_1d(const py::array& a, const char* name, char kind, const std::string& where,
              const char* fix) {
  if (a.ndim() != 1)
    bad(where + name + " must be 1-D, got ndim=" + repr(a.ndim()) + "; pass one sequence of shape (M,)");
  const py::dtype dt = a.dtype();
  const int64_t want_size = kind == 'b' ? 1 : 8;
  if (dt.kind() != kind || dt.itemsize() != want_size)
    bad(where + name + " has dtype " + py::str(py::object(dt)).cast<std::string>() + "; " + fix);
  if (!(a.flags() & py::array::c_style))
    bad(where + name + " is not C-contiguous; pass np.ascontiguousarray(" + name + ")");
}

SequenceView view_sequence(py::array tokens, py::array segment_ids, py::array maskable,
                           uint64_t seed, const std::string& where) {
  check_1d(tokens, "tokens", 'i', where, "pass np.asarray(tokens, dtype=np.int64)");
  check_1d(segment_ids, "segment_ids", 'i', where, "pass np.asarray(segment_ids, dtype=np.int64)");
  check_1d(maskable, "maskable", 'b', where, "pass np.asarray(maskable, dtype=bool)");
  const int64_t m = static_cast<int64_t>(tokens.shape(0));
  if (segment_ids.shape(0) != m || maskable.shape(0) != m)
    bad(where + "tokens, segment_ids and maskable must have the same length, got " + repr(m) + ", " +
        repr(segment_ids.shape(0)) + ", " + repr(maskable.shape(0)));
  if (static_cast<uint64_t>(m) >= kTwo32)
    bad(where + "tokens has " + repr(m) + " tokens; the generator supports fewer than 2**32");
  SequenceView v;
  v.tok = static_cast<const int64_t*>(tokens.data());
  v.seg = static_cast<const int64_t*>(segment_ids.data());
  v.mask = static_cast<const uint8_t*>(maskable.data());
  v.tokens = std::move(tokens);
  v.segment_ids = std::move(segment_ids);
  v.maskable = std::move(maskable);
  v.m = m;
  v.seed = seed;
  return v;
}

py::array as_array(const py::handle& obj, const char* name, const std::string& where) {
  py::array a = py::array::ensure(obj);
  if (!a) {
    PyErr_Clear();
    bad(where + name + " of type " + py::str(py::type::of(obj).attr("__name__")).cast<std::string>() +
        " is not convertible to a numpy array");
  }
  return a;
}

LayoutParams make_params(double mask_ratio, double span_prob, int64_t span_min, int64_t span_max,
                         double mask_prob, double random_prob, int64_t mask_id, int64_t pseudo_id,
                         int64_t random_lo, int64_t random_hi) {
  // Negated comparisons so that NaN is rejected too.
  if (!(mask_ratio > 0.0 && mask_ratio < 1.0))
    bad("mask_ratio=" + repr(mask_ratio) + " is invalid: expected a value in (0, 1)");
  if (!(span_prob >= 0.0 && span_prob <= 1.0))
    bad("span_prob=" + repr(span_prob) + " is invalid: expected a value in [0, 1]");
  if (!(span_min >= 1 && span_min <= span_max))
    bad("span_min/span_max=(" + repr(span_min) + ", " + repr(span_max) +
        ") is invalid: expected 1 <= span_min <= span_max");
  if (static_cast<uint64_t>(span_max) >= kTwo32)
    bad("span_max=" + repr(span_max) + " is invalid: expected span_max < 2**32");
  if (!(mask_prob >= 0.0 && random_prob >= 0.0 && mask_prob + random_prob <= 1.0))
    bad("mask_prob/random_prob=(" + repr(mask_prob) + ", " + repr(random_prob) +
        ") is invalid: expected non-negative values summing to at most 1");
  // random_hi - random_lo is the argument of randbelow, whose contract is 0 < n < 2**32.
  if (!(random_lo < random_hi) ||
      static_cast<uint64_t>(random_hi) - static_cast<uint64_t>(random_lo) >= kTwo32)
    bad("random_lo/random_hi=(" + repr(random_lo) + ", " + repr(random_hi) +
        ") is invalid: expected random_lo < random_hi with random_hi - random_lo < 2**32 "
        "(random replacements are drawn from [random_lo, random_hi))");
  return LayoutParams{mask_ratio, span_prob, span_min, span_max, mask_prob, random_prob,
                      mask_id,    pseudo_id, random_lo, random_hi};
}

// Wraps a LayoutResult without copying: five views into one buffer owned by a capsule.
py::tuple to_python(LayoutResult&& r) {
  auto* owner = new std::vector<int64_t>(std::move(r.buffer));
  py::capsule base(owner, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  const py::ssize_t len = static_cast<py::ssize_t>(r.length);
  int64_t* data = owner->data();
  py::tuple out(6);
  for (py::ssize_t f = 0; f < 5; ++f) {
    if (len == 0)
      out[f] = py::array_t<int64_t>(0);  // an empty vector may have no storage to point into
    else
      out[f] = py::array_t<int64_t>({len}, {static_cast<py::ssize_t>(sizeof(int64_t))},
                                    data + f * len, base);
  }
  out[5] = py::int_(r.num_main);
  return out;
}

LayoutResult run_core(const SequenceView& v, const LayoutParams& p, std::string* error) {
  try {
    return build_example_core(v.tok, v.seg, v.mask, v.m, v.seed, p);
  } catch (const LayoutError& e) {
    *error = e.what();
    return LayoutResult{};
  }
}

py::tuple build_example(py::array tokens, py::array segment_ids, py::array maskable, uint64_t seed,
                        double mask_ratio, double span_prob, int64_t span_min, int64_t span_max,
                        double mask_prob, double random_prob, int64_t mask_id, int64_t pseudo_id,
                        int64_t random_lo, int64_t random_hi) {
  const LayoutParams p = make_params(mask_ratio, span_prob, span_min, span_max, mask_prob,
                                     random_prob, mask_id, pseudo_id, random_lo, random_hi);
  const SequenceView v =
      view_sequence(std::move(tokens), std::move(segment_ids), std::move(maskable), seed, "");
  std::string error;
  LayoutResult r;
  {
    py::gil_scoped_release nogil;
    r = run_core(v, p, &error);
  }
  if (!error.empty()) bad(error);
  return to_python(std::move(r));
}

py::list build_examples(const py::sequence& tokens, const py::sequence& segment_ids,
                        const py::sequence& maskable, const py::sequence& seeds, double mask_ratio,
                        double span_prob, int64_t span_min, int64_t span_max, double mask_prob,
                        double random_prob, int64_t mask_id, int64_t pseudo_id, int64_t random_lo,
                        int64_t random_hi) {
  const LayoutParams p = make_params(mask_ratio, span_prob, span_min, span_max, mask_prob,
                                     random_prob, mask_id, pseudo_id, random_lo, random_hi);
  const py::ssize_t b = static_cast<py::ssize_t>(py::len(tokens));
  if (static_cast<py::ssize_t>(py::len(segment_ids)) != b ||
      static_cast<py::ssize_t>(py::len(maskable)) != b || static_cast<py::ssize_t>(py::len(seeds)) != b)
    bad("tokens, segment_ids, maskable and seeds must have the same number of sequences, got " +
        repr(b) + ", " + repr(py::len(segment_ids)) + ", " + repr(py::len(maskable)) + ", " +
        repr(py::len(seeds)));
  std::vector<SequenceView> views;
  views.reserve(static_cast<size_t>(b));
  for (py::ssize_t i = 0; i < b; ++i) {
    const std::string where = "sequence " + repr(i) + ": ";
    uint64_t seed;
    try {
      seed = seeds[i].cast<uint64_t>();
    } catch (const py::cast_error&) {
      bad(where + "seed=" + py::repr(seeds[i]).cast<std::string>() +
          " is invalid: expected an int in [0, 2**64)");
    }
    views.push_back(view_sequence(as_array(tokens[i], "tokens", where),
                                  as_array(segment_ids[i], "segment_ids", where),
                                  as_array(maskable[i], "maskable", where), seed, where));
  }
  std::vector<LayoutResult> results(static_cast<size_t>(b));
  std::string error;
  py::ssize_t failed = -1;
  {
    py::gil_scoped_release nogil;
    for (py::ssize_t i = 0; i < b && error.empty(); ++i) {
      results[static_cast<size_t>(i)] = run_core(views[static_cast<size_t>(i)], p, &error);
      if (!error.empty()) failed = i;
    }
  }
  if (!error.empty()) bad("sequence " + repr(failed) + ": " + error);
  py::list out(b);
  for (py::ssize_t i = 0; i < b; ++i) out[i] = to_python(std::move(results[static_cast<size_t>(i)]));
  return out;
}

}  // namespace

void register_layout(py::module_& m) {
  m.def("build_example", &build_example, py::arg("tokens"), py::arg("segment_ids"),
        py::arg("maskable"), py::arg("seed"), py::arg("mask_ratio"), py::arg("span_prob"),
        py::arg("span_min"), py::arg("span_max"), py::arg("mask_prob"), py::arg("random_prob"),
        py::arg("mask_id"), py::arg("pseudo_id"), py::arg("random_lo"), py::arg("random_hi"),
        R"doc(Mask one main sequence and lay it out (C++ twin of layout.build_example_python).

tokens, segment_ids: int64 (M,), C-contiguous; maskable: bool (M,); seed: uint64.
Returns (input_ids, position_ids, segment_ids, step, labels, num_main) with int64 arrays
of the laid-out length. Raises ValueError naming the bad argument. Releases the GIL.)doc");
  m.def("build_examples", &build_examples, py::arg("tokens"), py::arg("segment_ids"),
        py::arg("maskable"), py::arg("seeds"), py::arg("mask_ratio"), py::arg("span_prob"),
        py::arg("span_min"), py::arg("span_max"), py::arg("mask_prob"), py::arg("random_prob"),
        py::arg("mask_id"), py::arg("pseudo_id"), py::arg("random_lo"), py::arg("random_hi"),
        R"doc(Batched build_example: sequences of per-example arrays and seeds, one shared config.

Returns a list of build_example's tuples; the whole batch runs with the GIL released.)doc");
  m.def(
      "derive_seed",
      [](uint64_t seed, const std::vector<uint64_t>& keys) {
        return derive_seed(seed, keys.data(), static_cast<int64_t>(keys.size()));
      },
      py::arg("seed"), py::arg("keys"),
      "rng.derive_seed(seed, *keys) in C++ (keys already reduced mod 2**64).");
}

}  // namespace pmlm
