// Fused integer kernels of the deployed modules: one memory pass where the intops reference makes one per
// step. Integer types only. Each kernel computes exactly what its intops counterpart computes (tested).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
// The ISA-specific branches are two GEMMs, AVX2's (int16 pairs) and AVX-512 VNNI's (the attention's and the
// Linears', with their epilogues in registers), and AVX2's softmax probabilities (where AVX-512 is absent), chosen at
// compile time (-march=native): one build holds one CPU's branches. A process built for a lower level
// (ISEG_KERNELS_ISA=avx2 | generic: no AVX-512, no AVX) runs the others a wider CPU does not take, and
// tests/test_isa_builds.py runs the kernels' tests in each. The GEMMs' #else branches only refuse (Python asks for a
// GEMM only where the CPU has its instructions), and the route they leave, the attention and the Linears on
// at::_int_mm, is tested on every machine under the forced "int_mm" path; the probabilities' is the scalar loop.
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <limits>
#include <vector>

namespace {

// round_half_up(v * m / 2**e) in int64: the project's requantization (intops.dyadic); |v| < 2**31, |m| < 2**31.
inline int64_t dyadic(int64_t v, int64_t m, int64_t e) {
  const int64_t half = e > 0 ? (int64_t(1) << (e - 1)) : 0;
  return (v * m + half) >> e;  // arithmetic shift: floor, as torch.bitwise_right_shift
}

// int8(x - offset), wrapping as torch's cast to int8 does (a Linear's input on an asymmetric grid shifted into int8)
inline int8_t wrap_int8(int32_t x, int32_t offset) { return int8_t(uint8_t(uint32_t(x - offset))); }

// Runs body(next) on each of torch's OpenMP threads (at::parallel_for; inline, on this thread, when nested in a
// parallel region): body takes tasks i = next++ while i < n, so a thread slowed by other work on the machine takes
// fewer of them (a static split would wait for it). Per-thread scratch lives in body.
template <typename Body>
void on_threads(int64_t n, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { body(next); });
}

// f(i) for i in [0, n), spread over torch's threads (on_threads).
template <typename F>
void pool_for(int64_t n, const F& f) {
  on_threads(n, [&](std::atomic<int64_t>& next) {
    for (int64_t i; (i = next.fetch_add(1)) < n;) f(i);
  });
}

// Calls f(In(), Out()) with In the type of ``in`` and Out of ``out``, each int8 or int16 (the row kernels'
// inputs and outputs).
template <typename F>
void dispatch_int8_int16(at::ScalarType in, at::ScalarType out, const F& f) {
  AT_DISPATCH_SWITCH(in, "int8 / int16 row kernel input",
    AT_DISPATCH_CASE(at::kChar, [&] {
      using In = scalar_t;
      AT_DISPATCH_SWITCH(out, "int8 / int16 row kernel output",
        AT_DISPATCH_CASE(at::kChar, [&] { f(In(), scalar_t()); })
        AT_DISPATCH_CASE(at::kShort, [&] { f(In(), scalar_t()); }));
    })
    AT_DISPATCH_CASE(at::kShort, [&] {
      using In = scalar_t;
      AT_DISPATCH_SWITCH(out, "int8 / int16 row kernel output",
        AT_DISPATCH_CASE(at::kChar, [&] { f(In(), scalar_t()); })
        AT_DISPATCH_CASE(at::kShort, [&] { f(In(), scalar_t()); }));
    }));
}

// |m| < 2**31 and |v| < 2**31 (the contract of intops.requantize): the product is one widening 32 x 32 -> 64
// multiply, which vectorises; the shift is uniform per tensor, or one per channel. The loops take restrict pointers
// and their constants by value (no aliasing for the compiler to fear: it vectorises them, -march=native), the rows
// spread over torch's threads.
template <typename In, typename Out>
__attribute__((noinline)) void requantize_span(const In* __restrict x, const int32_t* __restrict add, Out* __restrict y,
                                               int64_t count, int64_t m, int64_t half, int64_t shift, int64_t lo,
                                               int64_t hi) {
  for (int64_t c = 0; c < count; ++c) {
    const int64_t v = (int64_t(int32_t(int64_t(x[c]) + add[c])) * m + half) >> shift;
    y[c] = Out(std::min(std::max(v, lo), hi));
  }
}

template <typename In, typename Out>
__attribute__((noinline)) void requantize_span_channels(const In* __restrict x, const int32_t* __restrict add,
                                                        Out* __restrict y, int64_t count, const int64_t* __restrict m,
                                                        const int64_t* __restrict half, const int64_t* __restrict shift,
                                                        int64_t lo, int64_t hi) {
  for (int64_t c = 0; c < count; ++c) {
    const int64_t v = (int64_t(int32_t(int64_t(x[c]) + add[c])) * m[c] + half[c]) >> shift[c];
    y[c] = Out(std::min(std::max(v, lo), hi));
  }
}

// A requantization's constants per channel (one multiplier and shift, or one per channel; the int32 bias or 0),
// padded with zeros to ``padded`` entries (the VNNI Linear's whole panels): built once per call, read by the row loops
// below and by the VNNI Linear's epilogue.
struct ChannelRequant {
  bool per_channel;
  std::vector<int32_t> add;
  std::vector<int64_t> mult, half, shift;  // (multipliers: int32 values)
  ChannelRequant(const int32_t* bias, const int64_t* m, const int64_t* e, bool per_channel, int64_t channels,
                 int64_t padded)
      : per_channel(per_channel), add(padded, 0), mult(padded, 0), half(padded, 0), shift(padded, 0) {
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t k = per_channel ? c : 0;
      mult[c] = int64_t(int32_t(m[k]));
      shift[c] = e[k];
      half[c] = e[k] > 0 ? (int64_t(1) << (e[k] - 1)) : 0;
      if (bias) add[c] = bias[c];
    }
  }
};

template <typename In, typename Out>
void requantize_rows(const In* x, const ChannelRequant& k, int64_t lo, int64_t hi, Out* out, int64_t rows,
                     int64_t channels) {
  const std::vector<int32_t>& add = k.add;
  const std::vector<int64_t>& mult = k.mult, & half = k.half, & shift = k.shift;
  const bool per_channel = k.per_channel;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(channels, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (per_channel)
        requantize_span_channels(x + r * channels, add.data(), out + r * channels, channels, mult.data(), half.data(),
                                 shift.data(), lo, hi);
      else
        requantize_span(x + r * channels, add.data(), out + r * channels, channels, mult[0], half[0], shift[0], lo, hi);
    }
  });
}

template <typename In, typename Out>
void requantize_rows(const In* x, const int32_t* bias, const int64_t* m, const int64_t* e, bool per_channel,
                     int64_t lo, int64_t hi, Out* out, int64_t rows, int64_t channels) {
  requantize_rows(x, ChannelRequant(bias, m, e, per_channel, channels, channels), lo, hi, out, rows, channels);
}

template <typename In>
void requantize_dispatch(const at::Tensor& x, const int32_t* b, const at::Tensor& m, const at::Tensor& e,
                         bool per_channel, int64_t lo, int64_t hi, at::Tensor& out, int64_t rows, int64_t channels) {
  AT_DISPATCH_SWITCH(out.scalar_type(), "requantize_out",
    AT_DISPATCH_CASE(at::kChar, [&] { requantize_rows<In, scalar_t>(x.data_ptr<In>(), b, m.data_ptr<int64_t>(), e.data_ptr<int64_t>(), per_channel, lo, hi, out.data_ptr<scalar_t>(), rows, channels); })
    AT_DISPATCH_CASE(at::kShort, [&] { requantize_rows<In, scalar_t>(x.data_ptr<In>(), b, m.data_ptr<int64_t>(), e.data_ptr<int64_t>(), per_channel, lo, hi, out.data_ptr<scalar_t>(), rows, channels); })
    AT_DISPATCH_CASE(at::kInt, [&] { requantize_rows<In, scalar_t>(x.data_ptr<In>(), b, m.data_ptr<int64_t>(), e.data_ptr<int64_t>(), per_channel, lo, hi, out.data_ptr<scalar_t>(), rows, channels); })
    AT_DISPATCH_CASE(at::kLong, [&] { requantize_rows<In, scalar_t>(x.data_ptr<In>(), b, m.data_ptr<int64_t>(), e.data_ptr<int64_t>(), per_channel, lo, hi, out.data_ptr<scalar_t>(), rows, channels); }));
}

at::Tensor requantize(const at::Tensor& x_, const std::optional<at::Tensor>& bias_, const at::Tensor& multiplier_,
                      const at::Tensor& shift_, int64_t lo, int64_t hi, at::ScalarType out_dtype) {
  const at::Tensor x = x_.contiguous();
  const at::Tensor m = multiplier_.to(at::kLong).contiguous().flatten();
  const at::Tensor e = shift_.to(at::kLong).contiguous().flatten();
  const int64_t channels = x.dim() ? x.size(-1) : 1;
  const bool per_channel = m.numel() > 1;
  TORCH_CHECK(!per_channel || m.numel() == channels, "requantize: one multiplier, or one per channel of the last dim");
  at::Tensor bias;
  if (bias_.has_value()) {
    bias = bias_->to(at::kInt).contiguous();
    TORCH_CHECK(bias.numel() == channels, "requantize: one bias per channel of the last dim");
  }
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const int64_t rows = channels ? x.numel() / channels : 0;
  const int32_t* b = bias.defined() ? bias.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_SWITCH(x.scalar_type(), "requantize_in",
    AT_DISPATCH_CASE(at::kChar, [&] { requantize_dispatch<scalar_t>(x, b, m, e, per_channel, lo, hi, out, rows, channels); })
    AT_DISPATCH_CASE(at::kShort, [&] { requantize_dispatch<scalar_t>(x, b, m, e, per_channel, lo, hi, out, rows, channels); })
    AT_DISPATCH_CASE(at::kInt, [&] { requantize_dispatch<scalar_t>(x, b, m, e, per_channel, lo, hi, out, rows, channels); })
    AT_DISPATCH_CASE(at::kLong, [&] { requantize_dispatch<scalar_t>(x, b, m, e, per_channel, lo, hi, out, rows, channels); }));
  return out;
}

template <typename A, typename B, typename Out>
__attribute__((noinline)) void add_span(const A* __restrict a, const B* __restrict b, int64_t ma, int64_t ha,
                                        int64_t ea, int64_t mb, int64_t hb, int64_t eb, int64_t lo, int64_t hi,
                                        Out* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = ((int64_t(a[i]) * ma + ha) >> ea) + ((int64_t(b[i]) * mb + hb) >> eb);
    out[i] = Out(std::min(std::max(v, lo), hi));
  }
}

template <typename A, typename B, typename Out>
void add_rows(const A* a, const B* b, int64_t ma, int64_t ea, int64_t mb, int64_t eb, int64_t lo, int64_t hi,
              Out* out, int64_t n) {
  const int64_t ha = ea > 0 ? (int64_t(1) << (ea - 1)) : 0, hb = eb > 0 ? (int64_t(1) << (eb - 1)) : 0;
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    add_span(a + begin, b + begin, ma, ha, ea, mb, hb, eb, lo, hi, out + begin, end - begin);
  });
}

template <typename In>
void add_dispatch(const at::Tensor& a, const at::Tensor& b, int64_t ma, int64_t ea, int64_t mb, int64_t eb, int64_t lo,
                  int64_t hi, at::Tensor& out) {
  AT_DISPATCH_SWITCH(out.scalar_type(), "requantize_add_out",
    AT_DISPATCH_CASE(at::kChar, [&] { add_rows(a.data_ptr<In>(), b.data_ptr<In>(), ma, ea, mb, eb, lo, hi, out.data_ptr<scalar_t>(), a.numel()); })
    AT_DISPATCH_CASE(at::kShort, [&] { add_rows(a.data_ptr<In>(), b.data_ptr<In>(), ma, ea, mb, eb, lo, hi, out.data_ptr<scalar_t>(), a.numel()); })
    AT_DISPATCH_CASE(at::kInt, [&] { add_rows(a.data_ptr<In>(), b.data_ptr<In>(), ma, ea, mb, eb, lo, hi, out.data_ptr<scalar_t>(), a.numel()); }));
}

// intops.requantize_add: each operand requantized to the output scale (no clamp), summed, clamped.
at::Tensor requantize_add(const at::Tensor& a_, const at::Tensor& b_, int64_t ma, int64_t ea, int64_t mb, int64_t eb,
                          int64_t lo, int64_t hi, at::ScalarType out_dtype) {
  TORCH_CHECK(a_.sizes() == b_.sizes(), "requantize_add: operands of one shape");
  const bool same = a_.scalar_type() == b_.scalar_type();
  const at::Tensor a = (same ? a_ : a_.to(at::kLong)).contiguous(), b = (same ? b_ : b_.to(at::kLong)).contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options().dtype(out_dtype));
  AT_DISPATCH_SWITCH(a.scalar_type(), "requantize_add_in",
    AT_DISPATCH_CASE(at::kChar, [&] { add_dispatch<scalar_t>(a, b, ma, ea, mb, eb, lo, hi, out); })
    AT_DISPATCH_CASE(at::kShort, [&] { add_dispatch<scalar_t>(a, b, ma, ea, mb, eb, lo, hi, out); })
    AT_DISPATCH_CASE(at::kInt, [&] { add_dispatch<scalar_t>(a, b, ma, ea, mb, eb, lo, hi, out); })
    AT_DISPATCH_CASE(at::kLong, [&] { add_dispatch<scalar_t>(a, b, ma, ea, mb, eb, lo, hi, out); }));
  return out;
}

// intops' integer softmaxes (Shiftmax, bit-exp) over the last dim, their exponential read from its table:
// e = table[max(x - rowmax, low) - low], then round(e * floor(2**62 / sum e) / 2**(62 - out_frac_bits)).
template <typename In>
__attribute__((noinline)) void table_softmax_row(const In* __restrict x, int64_t* __restrict e, int32_t* __restrict y,
                                                 int64_t n, const int64_t* __restrict table, int64_t low, int64_t shift,
                                                 int64_t half) {
  int64_t top = x[0];
  for (int64_t i = 1; i < n; ++i) top = std::max<int64_t>(top, x[i]);
  int64_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    e[i] = table[std::max<int64_t>(int64_t(x[i]) - top, low) - low];
    sum += e[i];
  }
  const int64_t recip = (int64_t(1) << 62) / sum;  // sum >= 1: every table value is > 0
  for (int64_t i = 0; i < n; ++i) y[i] = int32_t((e[i] * recip + half) >> shift);
}

template <typename In>
void softmax_rows(const In* x, const int64_t* table, int64_t low, int64_t out_frac_bits, int32_t* out,
                  int64_t rows, int64_t n) {
  const int64_t shift = 62 - out_frac_bits;
  const int64_t half = int64_t(1) << (shift - 1);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> e(n);
    for (int64_t r = begin; r < end; ++r) table_softmax_row(x + r * n, e.data(), out + r * n, n, table, low, shift, half);
  });
}

at::Tensor table_softmax(const at::Tensor& x_, const at::Tensor& table_, int64_t low, int64_t out_frac_bits) {
  const at::Tensor x = x_.contiguous();
  const at::Tensor table = table_.to(at::kLong).contiguous();
  TORCH_CHECK(table.numel() == 1 - low, "table_softmax: the table spans [low, 0]");
  const int64_t n = x.size(-1);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kInt));
  const int64_t rows = n ? x.numel() / n : 0;
  AT_DISPATCH_SWITCH(x.scalar_type(), "table_softmax",
    AT_DISPATCH_CASE(at::kChar, [&] { softmax_rows(x.data_ptr<scalar_t>(), table.data_ptr<int64_t>(), low, out_frac_bits, out.data_ptr<int32_t>(), rows, n); })
    AT_DISPATCH_CASE(at::kShort, [&] { softmax_rows(x.data_ptr<scalar_t>(), table.data_ptr<int64_t>(), low, out_frac_bits, out.data_ptr<int32_t>(), rows, n); })
    AT_DISPATCH_CASE(at::kInt, [&] { softmax_rows(x.data_ptr<scalar_t>(), table.data_ptr<int64_t>(), low, out_frac_bits, out.data_ptr<int32_t>(), rows, n); })
    AT_DISPATCH_CASE(at::kLong, [&] { softmax_rows(x.data_ptr<scalar_t>(), table.data_ptr<int64_t>(), low, out_frac_bits, out.data_ptr<int32_t>(), rows, n); }));
  return out;
}

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0: floor, as torch.div(rounding_mode="floor")
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

inline int64_t bit_length(int64_t x) { return x > 0 ? 64 - __builtin_clzll(uint64_t(x)) : 0; }

// intops.isqrt: Newton's integer iteration from 2**ceil(bits/2), six steps, min-guarded; 0 for 0.
inline int64_t isqrt(int64_t x) {
  if (x == 0) return 0;
  int64_t y = int64_t(1) << ((bit_length(x) + 1) / 2);
  for (int i = 0; i < 6; ++i) y = std::max<int64_t>(std::min<int64_t>(y, floor_div(y + x / y, 2)), 1);
  return y;
}

// intops.i_layernorm with its output requantization (a per-tensor dyadic), one row at a time.
template <typename In, typename Out>
__attribute__((noinline)) void layernorm_row(const In* __restrict xr, const int64_t* __restrict w,
                                             const int64_t* __restrict b, int64_t eps, int64_t m, int64_t e, int64_t lo,
                                             int64_t hi, int64_t norm_bits, Out* __restrict yr, int64_t* __restrict y,
                                             int64_t n) {
      int64_t sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += int64_t(xr[i]) << 4;  // MEAN_FRAC_BITS
      const int64_t mean = floor_div(2 * sum + n, 2 * n);
      int64_t sumsq = (n * eps) << 8;
      for (int64_t i = 0; i < n; ++i) {
        y[i] = (int64_t(xr[i]) << 4) - mean;
        sumsq += y[i] * y[i];
      }
      const int64_t s = floor_div(61 - bit_length(sumsq), 2);  // ISQRT_MAX_BITS - 1
      const int64_t root = std::max<int64_t>(isqrt(sumsq << (2 * s)), 1);
      const int64_t recip = (int64_t(1) << 61) / root;
      const int64_t shift = 61 - norm_bits - s;
      const int64_t half = shift > 0 ? (int64_t(1) << (shift - 1)) : 0;
      const int64_t half_out = e > 0 ? (int64_t(1) << (e - 1)) : 0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t normed = (y[i] * recip + half) >> shift;
        const int64_t v = ((normed * w[i] + b[i]) * m + half_out) >> e;
        yr[i] = Out(std::min(std::max(v, lo), hi));
      }
}

template <typename In, typename Out>
void layernorm_rows(const In* x, const int64_t* w, const int64_t* b, int64_t eps, int64_t m, int64_t e, int64_t lo,
                    int64_t hi, int64_t norm_bits, Out* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> y(n);
    for (int64_t r = begin; r < end; ++r) layernorm_row(x + r * n, w, b, eps, m, e, lo, hi, norm_bits, out + r * n, y.data(), n);
  });
}

at::Tensor layernorm(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& bias_, int64_t eps,
                     int64_t m, int64_t e, int64_t lo, int64_t hi, int64_t norm_bits, at::ScalarType out_dtype) {
  const at::Tensor x = x_.contiguous();
  const at::Tensor w = weight_.to(at::kLong).contiguous(), b = bias_.to(at::kLong).contiguous();
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.numel() == n && b.numel() == n, "layernorm: one weight and bias per channel");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const int64_t rows = n ? x.numel() / n : 0;
  dispatch_int8_int16(x.scalar_type(), out_dtype, [&](auto in, auto res) {
    using In = decltype(in);
    using Out = decltype(res);
    layernorm_rows<In, Out>(x.data_ptr<In>(), w.data_ptr<int64_t>(), b.data_ptr<int64_t>(), eps, m, e, lo, hi,
                            norm_bits, out.data_ptr<Out>(), rows, n);
  });
  return out;
}

// intops.poly_gelu (k_out bits of phi) with its output requantization (a per-tensor dyadic), element-wise.
template <typename In, typename Out>
__attribute__((noinline)) void poly_gelu_span(const In* __restrict x, int64_t clip, int64_t pre_shift, int64_t half,
                                              int64_t pm, int64_t pe, int64_t phalf, int64_t one, int64_t m, int64_t e,
                                              int64_t ehalf, int64_t lo, int64_t hi, Out* __restrict out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t v = x[i];
    const int64_t c = std::min<int64_t>(std::abs(v), clip) - clip;
    const int64_t quartic = ((c * c) * (c * c) + half) >> pre_shift;
    int64_t erf_abs = ((quartic * pm + phalf) >> pe) + one;
    erf_abs = std::min(std::max(erf_abs, int64_t(0)), one);
    const int64_t sign = (v > 0) - (v < 0);
    const int64_t y = ((v * (one + sign * erf_abs)) * m + ehalf) >> e;
    out[i] = Out(std::min(std::max(y, lo), hi));
  }
}

// out[i] = table[x[i] + 128] for int8 x; the table's 256 values as int32 (values of Out), which the compiler reads
// by a vector gather from an int32-indexed table (a byte-indexed one it extracted and inserted one by one, ~3x slower)
template <typename Out>
__attribute__((noinline)) void lookup_span(const int8_t* __restrict x, const int32_t* __restrict table,
                                           Out* __restrict out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = Out(table[int32_t(x[i]) + 128]);
}

template <typename In, typename Out>
void poly_gelu_elems(const In* x, int64_t clip, int64_t pre_shift, int64_t pm, int64_t pe, int64_t k_out, int64_t m,
                     int64_t e, int64_t lo, int64_t hi, Out* out, int64_t count) {
  const int64_t one = int64_t(1) << (k_out - 2);
  const int64_t half = pre_shift > 0 ? (int64_t(1) << (pre_shift - 1)) : 0;
  const int64_t phalf = pe > 0 ? (int64_t(1) << (pe - 1)) : 0, ehalf = e > 0 ? (int64_t(1) << (e - 1)) : 0;
  if constexpr (sizeof(In) == 1) {
    // an int8 input has 256 values: their outputs, computed by the same span, then read per element (a lookup
    // costs less than the five 64-bit products per element)
    In all[256];
    int32_t table[256];  // (values of Out, clamped to its bounds: lookup_span's int32 table)
    for (int v = 0; v < 256; ++v) all[v] = In(v - 128);
    poly_gelu_span(all, clip, pre_shift, half, pm, pe, phalf, one, m, e, ehalf, lo, hi, table, 256);
    at::parallel_for(0, count, 16384, [&](int64_t begin, int64_t end) {
      lookup_span(x + begin, table, out + begin, end - begin);
    });
    return;
  }
  at::parallel_for(0, count, 16384, [&](int64_t begin, int64_t end) {
    poly_gelu_span(x + begin, clip, pre_shift, half, pm, pe, phalf, one, m, e, ehalf, lo, hi, out + begin, end - begin);
  });
}

at::Tensor poly_gelu(const at::Tensor& x_, int64_t clip, int64_t pre_shift, int64_t pm, int64_t pe, int64_t k_out,
                     int64_t m, int64_t e, int64_t lo, int64_t hi, at::ScalarType out_dtype) {
  const at::Tensor x = x_.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  dispatch_int8_int16(x.scalar_type(), out_dtype, [&](auto in, auto res) {
    using In = decltype(in);
    using Out = decltype(res);
    poly_gelu_elems<In, Out>(x.data_ptr<In>(), clip, pre_shift, pm, pe, k_out, m, e, lo, hi, out.data_ptr<Out>(),
                             x.numel());
  });
  return out;
}

// gemm.uint16_matmul's operands: p in [0, 2**15] as two int8 halves, high - 64 and low - 128, in one pass.
template <typename In>
void split_elems(const In* p, int8_t* high, int8_t* low, int64_t count) {
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t v = p[i];
      high[i] = int8_t((v >> 8) - 64);
      low[i] = int8_t((v & 255) - 128);
    }
  });
}

std::vector<at::Tensor> split_uint16(const at::Tensor& p_) {
  const at::Tensor p = p_.contiguous();
  at::Tensor high = at::empty(p.sizes(), p.options().dtype(at::kChar));
  at::Tensor low = at::empty(p.sizes(), p.options().dtype(at::kChar));
  AT_DISPATCH_SWITCH(p.scalar_type(), "split_uint16",
    AT_DISPATCH_CASE(at::kInt, [&] { split_elems(p.data_ptr<scalar_t>(), high.data_ptr<int8_t>(), low.data_ptr<int8_t>(), p.numel()); })
    AT_DISPATCH_CASE(at::kLong, [&] { split_elems(p.data_ptr<scalar_t>(), high.data_ptr<int8_t>(), low.data_ptr<int8_t>(), p.numel()); }));
  return {high, low};
}

// The two halves' int32 products put back together, (hi + 64 colsum) * 256 + lo + 128 colsum (= p @ v), and
// requantized (a per-tensor dyadic). hi, lo: (B, M, N); colsum: (B, N), the column sums of v.
template <typename Out>
__attribute__((noinline)) void combine_row(const int32_t* __restrict hi, const int32_t* __restrict lo,
                                           const int64_t* __restrict c, int64_t m, int64_t half, int64_t e, int64_t qlo,
                                           int64_t qhi, Out* __restrict out, int64_t n, int64_t high_offset) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t acc = (int64_t(hi[j]) + high_offset * c[j]) * 256 + int64_t(lo[j]) + 128 * c[j];
    out[j] = Out(std::min(std::max((acc * m + half) >> e, qlo), qhi));
  }
}

template <typename Out>
void combine_rows(const int32_t* hi, const int32_t* lo, const int64_t* colsum, int64_t m, int64_t e, int64_t qlo,
                  int64_t qhi, Out* out, int64_t batch, int64_t rows, int64_t n, int64_t high_offset = 64) {
  const int64_t half = e > 0 ? (int64_t(1) << (e - 1)) : 0;
  at::parallel_for(0, batch * rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      combine_row(hi + r * n, lo + r * n, colsum + (r / rows) * n, m, half, e, qlo, qhi, out + r * n, n, high_offset);
  });
}

at::Tensor combine_requantize(const at::Tensor& hi_, const at::Tensor& lo_, const at::Tensor& colsum_, int64_t m,
                              int64_t e, int64_t qlo, int64_t qhi, at::ScalarType out_dtype) {
  TORCH_CHECK(hi_.scalar_type() == at::kInt && lo_.scalar_type() == at::kInt, "combine_requantize: int32 products");
  const at::Tensor hi = hi_.contiguous(), lo = lo_.contiguous(), colsum = colsum_.to(at::kLong).contiguous();
  const int64_t n = hi.size(-1), rows = hi.size(-2), batch = rows * n ? hi.numel() / (rows * n) : 0;
  TORCH_CHECK(colsum.numel() == batch * n, "combine_requantize: one column sum per batch entry and column");
  at::Tensor out = at::empty(hi.sizes(), hi.options().dtype(out_dtype));
  AT_DISPATCH_SWITCH(out_dtype, "combine_requantize",
    AT_DISPATCH_CASE(at::kChar, [&] { combine_rows(hi.data_ptr<int32_t>(), lo.data_ptr<int32_t>(), colsum.data_ptr<int64_t>(), m, e, qlo, qhi, out.data_ptr<scalar_t>(), batch, rows, n); })
    AT_DISPATCH_CASE(at::kShort, [&] { combine_rows(hi.data_ptr<int32_t>(), lo.data_ptr<int32_t>(), colsum.data_ptr<int64_t>(), m, e, qlo, qhi, out.data_ptr<scalar_t>(), batch, rows, n); })
    AT_DISPATCH_CASE(at::kInt, [&] { combine_rows(hi.data_ptr<int32_t>(), lo.data_ptr<int32_t>(), colsum.data_ptr<int64_t>(), m, e, qlo, qhi, out.data_ptr<scalar_t>(), batch, rows, n); }));
  return out;
}

// intops' integer upsampling (bilinear with exact integer weights, one rounding half up; nearest as weights
// (1, 0) over 1), output row by output row: tables per axis, (lo, hi, w_lo, w_hi), the weights over den.
// Bilinear by two passes over a block of output rows: the input rows it reads are interpolated along the columns
// once (hrow: x[lo] w_lo + x[hi] w_hi, int64), then each output row is (above r_lo + below r_hi), rounded: the
// intops expression, whose columns are interpolated first too. The rounding division by 2 den is a shift where
// den is a power of two (floor, as an arithmetic shift is).
// Acc: int64, or int32 where every intermediate fits (max|x| * 2 den + den < 2**31: int16 logits upsampled by 16
// have den = 32 * 32), which doubles the vector lanes; the column tables in the same type.
template <typename T, typename Acc>
__attribute__((noinline)) void bilinear_columns(const T* __restrict x, const Acc* __restrict clo,
                                                const Acc* __restrict chi, const Acc* __restrict cwlo,
                                                const Acc* __restrict cwhi, Acc* __restrict hrow, int64_t wo) {
  for (int64_t j = 0; j < wo; ++j) hrow[j] = Acc(x[clo[j]]) * cwlo[j] + Acc(x[chi[j]]) * cwhi[j];
}

template <typename T, typename Acc>
__attribute__((noinline)) void bilinear_rows(const Acc* __restrict above, const Acc* __restrict below,
                                             Acc wlo, Acc whi, Acc den, int64_t den_shift,
                                             T* __restrict y, int64_t wo) {
  if (den_shift >= 0) {
    for (int64_t j = 0; j < wo; ++j) y[j] = T((2 * (above[j] * wlo + below[j] * whi) + den) >> den_shift);
  } else {
    for (int64_t j = 0; j < wo; ++j) y[j] = T(floor_div(int64_t(2 * (above[j] * wlo + below[j] * whi) + den), 2 * int64_t(den)));
  }
}

// the first and last input rows that output rows [i0, i1) read (their lo and hi rows)
inline std::pair<int64_t, int64_t> input_rows(const int64_t* rlo, const int64_t* rhi, int64_t i0, int64_t i1, int64_t h) {
  int64_t r0 = h, r1 = -1;
  for (int64_t i = i0; i < i1; ++i) {
    r0 = std::min({r0, rlo[i], rhi[i]});
    r1 = std::max({r1, rlo[i], rhi[i]});
  }
  return {r0, r1};
}

template <typename T, typename Acc>
void bilinear_blocks(const T* x, const int64_t* rlo, const int64_t* rhi, const int64_t* rwlo, const int64_t* rwhi,
                     const int64_t* clo, const int64_t* chi, const int64_t* cwlo, const int64_t* cwhi, int64_t den,
                     int64_t den_shift, T* out, int64_t planes, int64_t h, int64_t w, int64_t ho, int64_t wo) {
  const std::vector<Acc> cl(clo, clo + wo), ch(chi, chi + wo), cwl(cwlo, cwlo + wo), cwh(cwhi, cwhi + wo);
  constexpr int64_t kRows = 64;  // output rows per task
  const int64_t chunks = (ho + kRows - 1) / kRows;
  pool_for(planes * chunks, [&](int64_t task) {
    const int64_t plane = task / chunks, i0 = (task % chunks) * kRows, i1 = std::min(ho, i0 + kRows);
    const auto [r0, r1] = input_rows(rlo, rhi, i0, i1, h);
    std::vector<Acc> hrows((r1 - r0 + 1) * wo), row(w);
    for (int64_t r = r0; r <= r1; ++r) {  // (the row widened first: a vector gather reads Acc, not int8 / int16)
      const T* xr = x + (plane * h + r) * w;
      std::copy(xr, xr + w, row.begin());
      bilinear_columns(row.data(), cl.data(), ch.data(), cwl.data(), cwh.data(), hrows.data() + (r - r0) * wo, wo);
    }
    for (int64_t i = i0; i < i1; ++i)
      bilinear_rows(hrows.data() + (rlo[i] - r0) * wo, hrows.data() + (rhi[i] - r0) * wo, Acc(rwlo[i]), Acc(rwhi[i]),
                    Acc(den), den_shift, out + (plane * ho + i) * wo, wo);
  });
}

template <typename T>
void upsample_rows(const T* x, const int64_t* rlo, const int64_t* rhi, const int64_t* rwlo, const int64_t* rwhi,
                   const int64_t* clo, const int64_t* chi, const int64_t* cwlo, const int64_t* cwhi, int64_t den,
                   T* out, int64_t planes, int64_t h, int64_t w, int64_t ho, int64_t wo) {
  if (den == 1) {  // nearest: a copy (its weights are (1, 0))
    at::parallel_for(0, planes * ho, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* top = x + ((r / ho) * h + rlo[r % ho]) * w;
        T* y = out + r * wo;
        for (int64_t j = 0; j < wo; ++j) y[j] = top[clo[j]];
      }
    });
    return;
  }
  const int64_t den_shift = (den & (den - 1)) == 0 ? bit_length(2 * den) - 1 : -1;  // 2 den = 2**den_shift
  const int64_t top = int64_t(1) << (8 * sizeof(T) - 1);  // max |x|
  if (top * 2 * den + den < (int64_t(1) << 31))
    bilinear_blocks<T, int32_t>(x, rlo, rhi, rwlo, rwhi, clo, chi, cwlo, cwhi, den, den_shift, out, planes, h, w, ho, wo);
  else
    bilinear_blocks<T, int64_t>(x, rlo, rhi, rwlo, rwhi, clo, chi, cwlo, cwhi, den, den_shift, out, planes, h, w, ho, wo);
}

at::Tensor upsample(const at::Tensor& x_, const at::Tensor& rows, const at::Tensor& cols, int64_t den) {
  // rows: (4, H_out) = lo, hi, w_lo, w_hi; cols: (4, W_out)
  const at::Tensor x = x_.contiguous(), r = rows.to(at::kLong).contiguous(), c = cols.to(at::kLong).contiguous();
  const int64_t h = x.size(-2), w = x.size(-1), ho = r.size(1), wo = c.size(1);
  const int64_t planes = h * w ? x.numel() / (h * w) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[shape.size() - 2] = ho;
  shape[shape.size() - 1] = wo;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* cp = c.data_ptr<int64_t>();
  AT_DISPATCH_SWITCH(x.scalar_type(), "upsample",
    AT_DISPATCH_CASE(at::kChar, [&] { upsample_rows(x.data_ptr<scalar_t>(), rp, rp + ho, rp + 2 * ho, rp + 3 * ho, cp, cp + wo, cp + 2 * wo, cp + 3 * wo, den, out.data_ptr<scalar_t>(), planes, h, w, ho, wo); })
    AT_DISPATCH_CASE(at::kShort, [&] { upsample_rows(x.data_ptr<scalar_t>(), rp, rp + ho, rp + 2 * ho, rp + 3 * ho, cp, cp + wo, cp + 2 * wo, cp + 3 * wo, den, out.data_ptr<scalar_t>(), planes, h, w, ho, wo); })
    AT_DISPATCH_CASE(at::kInt, [&] { upsample_rows(x.data_ptr<scalar_t>(), rp, rp + ho, rp + 2 * ho, rp + 3 * ho, cp, cp + wo, cp + 2 * wo, cp + 3 * wo, den, out.data_ptr<scalar_t>(), planes, h, w, ho, wo); }));
  return out;
}

// The class map of upsampled logits in the upsampling's pass: for each output pixel, the first channel whose
// upsampled value (upsample's integers, computed as upsample does) is the largest, as argmax_channels of upsample's
// output. Each task keeps a block of output rows' best values and channels in cache, channel by channel. Without
// ``logits`` the full-size logits (a 150-class ViT-S at 512 x 512: 78 MB of int16) are neither written nor read
// again, and only the cropped pixels are computed; with them, they are written once and not read back.
template <typename T, typename Acc, bool kStore>
__attribute__((noinline)) void best_of_rows(const Acc* __restrict above, const Acc* __restrict below, Acc wlo, Acc whi,
                                            Acc den, int64_t den_shift, int32_t channel, Acc* __restrict best,
                                            int32_t* __restrict idx, T* __restrict y, int64_t wo) {
  if (den_shift >= 0) {
    for (int64_t j = 0; j < wo; ++j) {
      const Acc v = (2 * (above[j] * wlo + below[j] * whi) + den) >> den_shift;
      if constexpr (kStore) y[j] = T(v);
      const bool more = v > best[j];
      best[j] = more ? v : best[j];
      idx[j] = more ? channel : idx[j];
    }
  } else {
    for (int64_t j = 0; j < wo; ++j) {
      const Acc v = Acc(floor_div(int64_t(2 * (above[j] * wlo + below[j] * whi) + den), 2 * int64_t(den)));
      if constexpr (kStore) y[j] = T(v);
      const bool more = v > best[j];
      best[j] = more ? v : best[j];
      idx[j] = more ? channel : idx[j];
    }
  }
}

// out: the (n, crop_h, crop_w) class map; logits: the (n, c, ho, wo) upsampled logits, or null
template <typename T, typename Acc>
void class_map_blocks(const T* x, const int64_t* rlo, const int64_t* rhi, const int64_t* rwlo, const int64_t* rwhi,
                      const int64_t* clo, const int64_t* chi, const int64_t* cwlo, const int64_t* cwhi, int64_t den,
                      int64_t den_shift, int64_t* out, T* logits, int64_t n, int64_t c, int64_t h, int64_t w,
                      int64_t ho, int64_t wo, int64_t crop_h, int64_t crop_w) {
  const int64_t rows = logits ? ho : crop_h, cols = logits ? wo : crop_w;  // the pixels computed
  const std::vector<Acc> cl(clo, clo + cols), ch(chi, chi + cols), cwl(cwlo, cwlo + cols), cwh(cwhi, cwhi + cols);
  constexpr int64_t kRows = 64;  // output rows per task: their best values and channels stay in L2
  const int64_t chunks = (rows + kRows - 1) / kRows;
  pool_for(n * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, i0 = (task % chunks) * kRows, i1 = std::min(rows, i0 + kRows);
    const auto [r0, r1] = input_rows(rlo, rhi, i0, i1, h);
    std::vector<Acc> hrows((r1 - r0 + 1) * cols), row(w), best((i1 - i0) * cols, std::numeric_limits<Acc>::min());
    std::vector<int32_t> idx((i1 - i0) * cols, 0);
    for (int64_t k = 0; k < c; ++k) {
      const T* plane = x + (b * c + k) * h * w;
      for (int64_t r = r0; r <= r1; ++r) {
        std::copy(plane + r * w, plane + (r + 1) * w, row.begin());
        bilinear_columns(row.data(), cl.data(), ch.data(), cwl.data(), cwh.data(), hrows.data() + (r - r0) * cols, cols);
      }
      for (int64_t i = i0; i < i1; ++i) {  // (values within T's range: > Acc's minimum, so channel 0 sets every pixel)
        const Acc* above = hrows.data() + (rlo[i] - r0) * cols;
        const Acc* below = hrows.data() + (rhi[i] - r0) * cols;
        Acc* bi = best.data() + (i - i0) * cols;
        int32_t* ii = idx.data() + (i - i0) * cols;
        if (logits)
          best_of_rows<T, Acc, true>(above, below, Acc(rwlo[i]), Acc(rwhi[i]), Acc(den), den_shift, int32_t(k), bi, ii,
                                     logits + ((b * c + k) * ho + i) * wo, cols);
        else
          best_of_rows<T, Acc, false>(above, below, Acc(rwlo[i]), Acc(rwhi[i]), Acc(den), den_shift, int32_t(k), bi, ii,
                                      nullptr, cols);
      }
    }
    for (int64_t i = i0; i < std::min(i1, crop_h); ++i)
      std::copy(idx.begin() + (i - i0) * cols, idx.begin() + (i - i0) * cols + crop_w, out + (b * crop_h + i) * crop_w);
  });
}

// int32 intermediates where they fit, as upsample_rows decides; rp, cp: the (4, ho) and (4, wo) tables
template <typename T>
void class_map_dispatch(const T* x, const int64_t* rp, const int64_t* cp, int64_t den, int64_t* out, T* logits,
                        int64_t n, int64_t c, int64_t h, int64_t w, int64_t ho, int64_t wo, int64_t crop_h,
                        int64_t crop_w) {
  const int64_t den_shift = (den & (den - 1)) == 0 ? bit_length(2 * den) - 1 : -1;  // 2 den = 2**den_shift
  const int64_t top = int64_t(1) << (8 * sizeof(T) - 1);  // max |x|
  if (top * 2 * den + den < (int64_t(1) << 31))
    class_map_blocks<T, int32_t>(x, rp, rp + ho, rp + 2 * ho, rp + 3 * ho, cp, cp + wo, cp + 2 * wo, cp + 3 * wo, den,
                                 den_shift, out, logits, n, c, h, w, ho, wo, crop_h, crop_w);
  else
    class_map_blocks<T, int64_t>(x, rp, rp + ho, rp + 2 * ho, rp + 3 * ho, cp, cp + wo, cp + 2 * wo, cp + 3 * wo, den,
                                 den_shift, out, logits, n, c, h, w, ho, wo, crop_h, crop_w);
}

// x: (N, C, H, W) logits; rows, cols: upsample's (4, H_out), (4, W_out) tables; the class map of the first (crop_h,
// crop_w) pixels, and (with_logits) the upsampled logits
std::vector<at::Tensor> upsample_class_map(const at::Tensor& x_, const at::Tensor& rows, const at::Tensor& cols,
                                           int64_t den, int64_t crop_h, int64_t crop_w, bool with_logits) {
  const at::Tensor x = x_.contiguous(), r = rows.to(at::kLong).contiguous(), c = cols.to(at::kLong).contiguous();
  TORCH_CHECK(x.dim() == 4 && x.size(1) > 0 && r.dim() == 2 && r.size(0) == 4 && c.dim() == 2 && c.size(0) == 4 && den >= 1,
              "upsample_class_map: (N, C, H, W) logits, (4, H_out) and (4, W_out) tables");
  const int64_t n = x.size(0), ch = x.size(1), h = x.size(2), w = x.size(3), ho = r.size(1), wo = c.size(1);
  TORCH_CHECK(crop_h >= 0 && crop_h <= ho && crop_w >= 0 && crop_w <= wo, "upsample_class_map: a crop within the output");
  at::Tensor out = at::empty({n, crop_h, crop_w}, x.options().dtype(at::kLong));
  at::Tensor logits = with_logits ? at::empty({n, ch, ho, wo}, x.options()) : at::Tensor();
  if (n * ho * wo == 0 || (!with_logits && out.numel() == 0)) return {out, logits.defined() ? logits : out};
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* cp = c.data_ptr<int64_t>();
  AT_DISPATCH_SWITCH(x.scalar_type(), "upsample_class_map",
    AT_DISPATCH_CASE(at::kChar, [&] { class_map_dispatch(x.data_ptr<scalar_t>(), rp, cp, den, out.data_ptr<int64_t>(), with_logits ? logits.data_ptr<scalar_t>() : nullptr, n, ch, h, w, ho, wo, crop_h, crop_w); })
    AT_DISPATCH_CASE(at::kShort, [&] { class_map_dispatch(x.data_ptr<scalar_t>(), rp, cp, den, out.data_ptr<int64_t>(), with_logits ? logits.data_ptr<scalar_t>() : nullptr, n, ch, h, w, ho, wo, crop_h, crop_w); })
    AT_DISPATCH_CASE(at::kInt, [&] { class_map_dispatch(x.data_ptr<scalar_t>(), rp, cp, den, out.data_ptr<int64_t>(), with_logits ? logits.data_ptr<scalar_t>() : nullptr, n, ch, h, w, ho, wo, crop_h, crop_w); }));
  return {out, logits.defined() ? logits : out};
}

// The class map: argmax over the channels of (N, C, H, W) integers, cropped to (h, w), the first maximum on ties
// (as torch.argmax); channel-outer loops over one output row keep the reads contiguous.
template <typename T>
__attribute__((noinline)) void argmax_row(const T* __restrict row, int64_t plane, T* __restrict best,
                                          int32_t* __restrict idx, int64_t* __restrict y, int64_t c, int64_t wo) {
  for (int64_t j = 0; j < wo; ++j) { best[j] = row[j]; idx[j] = 0; }
  for (int64_t k = 1; k < c; ++k) {
    const T* __restrict rk = row + k * plane;
    const int32_t kk = int32_t(k);
    for (int64_t j = 0; j < wo; ++j) {
      const bool more = rk[j] > best[j];
      best[j] = more ? rk[j] : best[j];
      idx[j] = more ? kk : idx[j];
    }
  }
  for (int64_t j = 0; j < wo; ++j) y[j] = idx[j];
}

template <typename T>
void argmax_rows(const T* x, int64_t* out, int64_t n, int64_t c, int64_t h, int64_t w, int64_t ho, int64_t wo) {
  at::parallel_for(0, n * ho, 8, [&](int64_t begin, int64_t end) {
    std::vector<T> best(wo);
    std::vector<int32_t> idx(wo);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / ho, i = r % ho;
      argmax_row(x + ((b * c) * h + i) * w, h * w, best.data(), idx.data(), out + r * wo, c, wo);
    }
  });
}

at::Tensor argmax_channels(const at::Tensor& x_, int64_t ho, int64_t wo) {
  const at::Tensor x = x_.contiguous();
  TORCH_CHECK(x.dim() == 4 && x.size(1) > 0 && ho <= x.size(2) && wo <= x.size(3), "argmax_channels: (N, C, H, W), crop within");
  at::Tensor out = at::empty({x.size(0), ho, wo}, x.options().dtype(at::kLong));
  AT_DISPATCH_SWITCH(x.scalar_type(), "argmax_channels",
    AT_DISPATCH_CASE(at::kChar, [&] { argmax_rows(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), x.size(0), x.size(1), x.size(2), x.size(3), ho, wo); })
    AT_DISPATCH_CASE(at::kShort, [&] { argmax_rows(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), x.size(0), x.size(1), x.size(2), x.size(3), ho, wo); })
    AT_DISPATCH_CASE(at::kInt, [&] { argmax_rows(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), x.size(0), x.size(1), x.size(2), x.size(3), ho, wo); }));
  return out;
}

// Exact int8 x int8 -> int32 GEMM for CPUs without VNNI. at::_int_mm is oneDNN's VNNI kernel where the CPU has
// VNNI and a naive loop elsewhere (~50x slower than FP32); AVX2's int8 instruction (vpmaddubsw) saturates its
// int16 pair sums, so it is not exact. Here both operands are sign-extended to int16 and vpmaddwd multiplies
// pairs along k: a pair sum is at most 2 * 128 * 128 = 2**15 in magnitude, exact in its int32 lane, and the int32
// accumulator of k < 2**17 terms cannot overflow. B is packed into 16-column panels of int16 pairs (k, k+1) (once
// per product, or once per weight: pack_avx2_weight), A into int16 rows; each task owns a block of rows,
// cache-blocked along k.
constexpr int64_t kTileRows = 6;     // the register tile: 6 x 16 int32 (12 accumulators, 2 B vectors, 1 A pair, 1 product)
constexpr int64_t kTileCols = 16;
#ifdef __AVX2__
constexpr int64_t kBlockPairs = 256; // k-pairs per cache block: a B panel's 256 pairs (16 KiB) stay in L1
constexpr int64_t kTaskRows = 48;    // rows per parallel task (whole tiles)

inline int64_t avx2_pairs(int64_t k) { return (k + 1) / 2; }
inline int64_t avx2_panels(int64_t n) { return (n + kTileCols - 1) / kTileCols; }
inline int64_t whole_tiles(int64_t rows) { return (rows + kTileRows - 1) / kTileRows * kTileRows; }
inline int64_t avx2_packed_size(int64_t k, int64_t n) { return avx2_panels(n) * avx2_pairs(k) * 2 * kTileCols; }  // int16

struct Avx2B {  // B packed (a view): panel p, pair t, column j, half h at data[((p * pairs + t) * 16 + j) * 2 + h]
  const int16_t* data;
  int64_t n, pairs, panels;
};

// b (k, n) row-major packed into data (avx2_packed_size(k, n) int16), zeroed first: zeros pad an odd k
// and the last panel
void pack_avx2_into(const int8_t* b, int64_t k, int64_t n, int16_t* data) {
  const int64_t pairs = avx2_pairs(k);
  for (int64_t panel = 0; panel < avx2_panels(n); ++panel) {
    const int64_t c0 = panel * kTileCols, cols = std::min(kTileCols, n - c0);
    for (int64_t t = 0; t < pairs; ++t) {
      int16_t* out = data + (panel * pairs + t) * 2 * kTileCols;
      for (int64_t h = 0; h < 2 && 2 * t + h < k; ++h) {
        const int8_t* row = b + (2 * t + h) * n + c0;
        for (int64_t j = 0; j < cols; ++j) out[2 * j + h] = row[j];
      }
    }
  }
}

struct PackedB {  // B packed for one product (the attention's keys and values, per head)
  std::vector<int16_t> data;
  int64_t n, k;
  Avx2B view() const { return {data.data(), n, avx2_pairs(k), avx2_panels(n)}; }
};

// (on the calling thread: one parallel region less per product; a region waits for both threads, which costs a
// scheduler time slice where other processes hold the other core)
PackedB pack_b(const int8_t* b, int64_t k, int64_t n) {  // b: (k, n) row-major
  PackedB p{std::vector<int16_t>(avx2_packed_size(k, n), 0), n, k};
  pack_avx2_into(b, k, n, p.data.data());
  return p;
}

// rows [r0, r1) of a (m, k) row-major as int16 rows of 2 * pairs (zero-padded) into out, wrap_int8(x, offset) of
// each value x
template <typename In>
void pack_a_rows(const In* a, int64_t r0, int64_t r1, int64_t k, int64_t pairs, int16_t* out, int64_t offset = 0) {
  const int32_t off = int32_t(offset);
  for (int64_t i = r0; i < r1; ++i) {
    const In* __restrict x = a + i * k;
    int16_t* __restrict o = out + (i - r0) * 2 * pairs;
    for (int64_t c = 0; c < k; ++c) o[c] = wrap_int8(x[c], off);
    std::fill(o + k, o + 2 * pairs, int16_t(0));
  }
}

// C's row (cols <= 16 of its columns) = lo | hi, or += (add)
__attribute__((always_inline)) inline void store_tile_row(int32_t* row, __m256i lo, __m256i hi, int64_t cols,
                                                          bool add) {
  if (cols == kTileCols) {
    __m256i* dst = reinterpret_cast<__m256i*>(row);
    if (add) {
      lo = _mm256_add_epi32(lo, _mm256_loadu_si256(dst));
      hi = _mm256_add_epi32(hi, _mm256_loadu_si256(dst + 1));
    }
    _mm256_storeu_si256(dst, lo);
    _mm256_storeu_si256(dst + 1, hi);
    return;
  }
  alignas(32) int32_t tile[kTileCols];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tile), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(tile + 8), hi);
  for (int64_t j = 0; j < cols; ++j) row[j] = add ? row[j] + tile[j] : tile[j];
}

// acc (6 x 16 int32, row-major) = 6 int16 rows of a (lda int16 apart, from their pair t0) @ pairs >= 1 pairs of one
// B panel (from its pair t0). Assembly, because GCC 12 compiles the same loop in intrinsics with a B load folded
// into each of its 12 vpmaddwd (with the 6 A broadcasts over the core's load rate) or with an accumulator spilled:
// one thread, ViT shapes, 53 or 42 GMAC/s where this loop runs at 85-90 (Zen 4; a vpmaddwd + vpaddd stream peaks at
// ~98). Per pair step: 2 B loads, and for each row an A pair broadcast, 2 vpmaddwd, 2 vpaddd.
__attribute__((noinline)) void tile_6x16(const int16_t* a, int64_t lda, const int16_t* b, int64_t pairs, int32_t* acc) {
  const int16_t* a3 = a + 3 * lda;
  const int64_t row_bytes = 2 * lda;
#define ISEG_TILE_ROW(pair, lo, hi)                 \
  "vpbroadcastd " pair ", %%ymm14\n\t"              \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"          \
  "vpaddd %%ymm15, %%" lo ", %%" lo "\n\t"          \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"          \
  "vpaddd %%ymm15, %%" hi ", %%" hi "\n\t"
  asm volatile(
      "vpxor %%xmm0, %%xmm0, %%xmm0\n\t"
      "vpxor %%xmm1, %%xmm1, %%xmm1\n\t"
      "vpxor %%xmm2, %%xmm2, %%xmm2\n\t"
      "vpxor %%xmm3, %%xmm3, %%xmm3\n\t"
      "vpxor %%xmm4, %%xmm4, %%xmm4\n\t"
      "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
      "vpxor %%xmm6, %%xmm6, %%xmm6\n\t"
      "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"
      "vpxor %%xmm8, %%xmm8, %%xmm8\n\t"
      "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"
      "vpxor %%xmm10, %%xmm10, %%xmm10\n\t"
      "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"
      "1:\n\t"
      "vmovdqu (%[b]), %%ymm12\n\t"
      "vmovdqu 32(%[b]), %%ymm13\n\t"
      ISEG_TILE_ROW("(%[a])", "ymm0", "ymm1")
      ISEG_TILE_ROW("(%[a],%[ld])", "ymm2", "ymm3")
      ISEG_TILE_ROW("(%[a],%[ld],2)", "ymm4", "ymm5")
      ISEG_TILE_ROW("(%[a3])", "ymm6", "ymm7")
      ISEG_TILE_ROW("(%[a3],%[ld])", "ymm8", "ymm9")
      ISEG_TILE_ROW("(%[a3],%[ld],2)", "ymm10", "ymm11")
      "add $4, %[a]\n\t"
      "add $4, %[a3]\n\t"
      "add $64, %[b]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "vmovdqu %%ymm0, (%[acc])\n\t"
      "vmovdqu %%ymm1, 32(%[acc])\n\t"
      "vmovdqu %%ymm2, 64(%[acc])\n\t"
      "vmovdqu %%ymm3, 96(%[acc])\n\t"
      "vmovdqu %%ymm4, 128(%[acc])\n\t"
      "vmovdqu %%ymm5, 160(%[acc])\n\t"
      "vmovdqu %%ymm6, 192(%[acc])\n\t"
      "vmovdqu %%ymm7, 224(%[acc])\n\t"
      "vmovdqu %%ymm8, 256(%[acc])\n\t"
      "vmovdqu %%ymm9, 288(%[acc])\n\t"
      "vmovdqu %%ymm10, 320(%[acc])\n\t"
      "vmovdqu %%ymm11, 352(%[acc])\n\t"
      : [a] "+r"(a), [a3] "+r"(a3), [b] "+r"(b), [n] "+r"(pairs)
      : [ld] "r"(row_bytes), [acc] "r"(acc)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "memory", "cc");
#undef ISEG_TILE_ROW
}

// rows [0, m) of c (m, b.n) int32 = a16 (int16 rows of lda = 2 * b.pairs; whole_tiles(m) of them readable: the
// last tile's extra rows are computed, not stored) @ b, on this thread
void gemm_rows(const int16_t* a16, int64_t m, const Avx2B& b, int32_t* c) {
  const int64_t lda = 2 * b.pairs, ldc = b.n;
  if (b.pairs == 0) {
    std::fill(c, c + m * ldc, 0);
    return;
  }
  alignas(32) int32_t acc[kTileRows * kTileCols];
  for (int64_t t0 = 0; t0 < b.pairs; t0 += kBlockPairs) {
    const int64_t t1 = std::min(b.pairs, t0 + kBlockPairs);
    for (int64_t panel = 0; panel < b.panels; ++panel) {
      const int16_t* bp = b.data + (panel * b.pairs + t0) * 2 * kTileCols;
      const int64_t c0 = panel * kTileCols, cols = std::min(kTileCols, b.n - c0);
      for (int64_t r = 0; r < m; r += kTileRows) {
        tile_6x16(a16 + r * lda + 2 * t0, lda, bp, t1 - t0, acc);
        for (int64_t i = 0; i < std::min(kTileRows, m - r); ++i)
          store_tile_row(c + (r + i) * ldc + c0, _mm256_load_si256(reinterpret_cast<const __m256i*>(acc + i * kTileCols)),
                         _mm256_load_si256(reinterpret_cast<const __m256i*>(acc + i * kTileCols + 8)), cols, t0 > 0);
      }
    }
  }
}

// (m, k) int8 rows @ packed B -> (m, n) int32 at c: tasks of kTaskRows rows on torch's threads, each packing its own
// rows to int16 (one parallel region per product)
void mm_packed(const int8_t* a, int64_t m, int64_t k, const Avx2B& b, int32_t* c) {
  const int64_t tasks = (m + kTaskRows - 1) / kTaskRows;
  on_threads(tasks, [&](std::atomic<int64_t>& next) {
    std::vector<int16_t> a16(kTaskRows * 2 * b.pairs);
    for (int64_t task; (task = next.fetch_add(1)) < tasks;) {
      const int64_t r0 = task * kTaskRows, r1 = std::min(m, r0 + kTaskRows);
      pack_a_rows(a, r0, r1, k, b.pairs, a16.data());
      gemm_rows(a16.data(), r1 - r0, b, c + r0 * b.n);
    }
  });
}
#endif

// The exact product of int8 (M, K) @ (K, N) or (B, M, K) @ (B, K, N) operands, int32, by the AVX2 kernel above.
at::Tensor int8_mm_avx2(const at::Tensor& a_, const at::Tensor& b_) {
#ifdef __AVX2__
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar && a.dim() == b.dim() &&
              (a.dim() == 2 || a.dim() == 3) && a.size(-1) == b.size(-2) && (a.dim() == 2 || a.size(0) == b.size(0)),
              "int8_mm_avx2: int8 (M, K) @ (K, N), or (B, M, K) @ (B, K, N)");
  const int64_t batch = a.dim() == 3 ? a.size(0) : 1, m = a.size(-2), k = a.size(-1), n = b.size(-1);
  at::Tensor out = at::empty({batch, m, n}, a.options().dtype(at::kInt));
  for (int64_t i = 0; i < batch; ++i)
    mm_packed(a.data_ptr<int8_t>() + i * m * k, m, k, pack_b(b.data_ptr<int8_t>() + i * k * n, k, n).view(),
              out.data_ptr<int32_t>() + i * m * n);
  return a.dim() == 3 ? out : out[0];
#else
  TORCH_CHECK(false, "int8_mm_avx2: these kernels were built for a CPU without AVX2");
  return a_;
#endif
}

// Exact int8 GEMM on AVX-512 VNNI for the fused attention's small products (a block of query rows against one
// head's keys, or its probabilities' low bytes against the head's values). vpdpbusd multiplies u8 by s8 bytes in
// groups of 4 along k into int32 lanes without saturation; A enters as u8 = a + 128 (a ^ 0x80) and 128 * colsum(B)
// is taken off: C = a @ B, the integers of at::_int_mm (|(a + 128) b| sums < 255 * 128 * k < 2**31 for k < 2**16).
// B is packed once per head, where at::_int_mm packs it at every call (once per block of query rows).
constexpr int64_t kVnniCols = 64;  // a panel: 4 zmm of 16 int32 columns
constexpr int kVnniRows = 6;       // the register tile: 6 x 64 int32 (24 accumulators, 4 B vectors, 1 A word)
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define ISEG_VNNI 1

// B packed (a view): panel p, group g (k = 4g..4g+3), column j, byte h at data[((p * groups + g) * 64 + j) * 4 + h];
// corr: 128 * the column sums of B, padded to whole panels
struct VnniB {
  const int8_t* data;
  const int32_t* corr;
  int64_t n, groups, panels;
};

inline int64_t vnni_groups(int64_t k) { return (k + 3) / 4; }
inline int64_t vnni_panels(int64_t n) { return (n + kVnniCols - 1) / kVnniCols; }

__attribute__((noinline)) void interleave4(const int8_t* __restrict r0, const int8_t* __restrict r1,
                                           const int8_t* __restrict r2, const int8_t* __restrict r3,
                                           int8_t* __restrict out, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    out[4 * j] = r0[j];
    out[4 * j + 1] = r1[j];
    out[4 * j + 2] = r2[j];
    out[4 * j + 3] = r3[j];
  }
}

// b (k, n), its rows ldb bytes apart, packed into data (vnni_panels(n) * vnni_groups(k) * 256 bytes) and corr
// (vnni_panels(n) * 64), both zeroed first: zeros pad k to whole groups and n to whole panels
void pack_vnni_into(const int8_t* b, int64_t k, int64_t n, int64_t ldb, int8_t* data, int32_t* corr) {
  TORCH_CHECK(k < (int64_t(1) << 16), "VNNI GEMM: k < 2**16 (int32 sums)");
  const int64_t groups = vnni_groups(k), panels = vnni_panels(n);
  for (int64_t kk = 0; kk < k; ++kk)  // 128 * the column sums
    for (int64_t j = 0; j < n; ++j) corr[j] += 128 * int32_t(b[kk * ldb + j]);
  const std::vector<int8_t> zeros(n, 0);
  for (int64_t g = 0; g < groups; ++g) {  // 4 rows of b interleaved byte by byte, panel by panel
    const int8_t* r[4];
    for (int64_t h = 0; h < 4; ++h) r[h] = 4 * g + h < k ? b + (4 * g + h) * ldb : zeros.data();
    for (int64_t panel = 0; panel < panels; ++panel) {
      const int64_t c0 = panel * kVnniCols, cols = std::min(kVnniCols, n - c0);
      interleave4(r[0] + c0, r[1] + c0, r[2] + c0, r[3] + c0, data + (panel * groups + g) * kVnniCols * 4, cols);
    }
  }
}

struct PackedVnni {  // B packed into vectors of its own (the attention's keys and values, per head)
  std::vector<int8_t> data;
  std::vector<int32_t> corr;
  int64_t n, groups, panels;
  VnniB view() const { return {data.data(), corr.data(), n, groups, panels}; }
};

PackedVnni pack_vnni(const int8_t* b, int64_t k, int64_t n, int64_t ldb) {  // b: (k, n), rows ldb bytes apart
  PackedVnni p{{}, {}, n, vnni_groups(k), vnni_panels(n)};
  p.data.assign(p.panels * p.groups * kVnniCols * 4, 0);
  p.corr.assign(p.panels * kVnniCols, 0);
  pack_vnni_into(b, k, n, ldb, p.data.data(), p.corr.data());
  return p;
}

// B = the transpose of the (n, k) rows of a, ``lda`` bytes apart (an attention's keys, where kt is a transposed
// view of them): B's group g of column j is bytes 4g..4g+3 of a's row j, one 4-byte word
PackedVnni pack_vnni_transposed(const int8_t* a, int64_t n, int64_t k, int64_t lda) {
  PackedVnni p{{}, {}, n, vnni_groups(k), vnni_panels(n)};
  p.data.assign(p.panels * p.groups * kVnniCols * 4, 0);
  p.corr.assign(p.panels * kVnniCols, 0);
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* row = a + j * lda;
    int32_t sum = 0;
    for (int64_t kk = 0; kk < k; ++kk) sum += row[kk];
    p.corr[j] = 128 * sum;
    const int64_t panel = j / kVnniCols, jj = j % kVnniCols;
    int8_t* out = p.data.data() + (panel * p.groups * kVnniCols + jj) * 4;
    for (int64_t g = 0; g < p.groups; ++g)
      std::memcpy(out + g * kVnniCols * 4, row + 4 * g, std::min<int64_t>(4, k - 4 * g));
  }
  return p;
}

// The R x 64 products of R int8 rows of a (lda bytes apart, 4 * groups readable each) and one panel, each 16-column
// vector handed to store(r, q, acc) (acc: the products plus 128 x the column sums, which store takes off)
template <int R, typename Store>
__attribute__((always_inline)) inline void vnni_tile_with(const int8_t* a, int64_t lda, const int8_t* bp, int64_t groups,
                                                          const Store& store) {
  __m512i acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(char(0x80));  // a ^ 0x80 = a + 128 as u8
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* bg = bp + g * kVnniCols * 4;
    const __m512i b0 = _mm512_loadu_si512(bg), b1 = _mm512_loadu_si512(bg + 64), b2 = _mm512_loadu_si512(bg + 128),
                  b3 = _mm512_loadu_si512(bg + 192);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, a + r * lda + 4 * g, sizeof word);
      const __m512i ar = _mm512_xor_si512(_mm512_set1_epi32(word), flip);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], ar, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], ar, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], ar, b3);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) store(r, q, acc[r][q]);
}

inline __mmask16 column_mask(int64_t cols, int q) {  // the columns of vector q that exist among cols of a panel
  const int64_t left = cols - 16 * q;
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// R x 64 of C (cols of them stored) from R int8 rows of a and one panel (vnni_tile_with)
template <int R>
__attribute__((noinline)) void vnni_tile(const int8_t* a, int64_t lda, const int8_t* bp, int64_t groups,
                                         const int32_t* corr, int32_t* c, int64_t ldc, int64_t cols) {
  vnni_tile_with<R>(a, lda, bp, groups, [&](int r, int q, __m512i acc) {
    const __mmask16 mask = column_mask(cols, q);
    if (mask) _mm512_mask_storeu_epi32(c + r * ldc + 16 * q, mask, _mm512_sub_epi32(acc, _mm512_loadu_si512(corr + 16 * q)));
  });
}

// A Linear's epilogue in registers: (product + bias, wrapping in int32) requantized per output column (int32
// multiplier, shift and half as int64: one widening multiply), clamped, then either stored as Out or read through
// ``table`` (256 values of Out, at the int8 output + 128): by word permutes (vpermt2w, 64 entries per pair of
// registers, the four quarters picked by the index's bits 6 and 7) where every value fits int16 (the GELU into fc2:
// a ViT-S fc1 with its GELU 3.9 -> 3.5 ms), else by a gather (Zen 4: ~30 cycles per 16). Constants padded to whole
// panels.
struct LinearConsts {
  const int32_t* bias;    // (panels * 64) zeros where there is no bias
  const int64_t* m;       // multipliers (int32 values)
  const int64_t* half;
  const int64_t* shift;
  int64_t lo, hi;
  const int32_t* table;   // or null
  const int16_t* table16; // the table as int16 where every value fits, else null
};

template <typename Out>
inline void store_out(Out* y, __mmask16 mask, __m512i v) {
  if constexpr (sizeof(Out) == 1) _mm512_mask_cvtepi32_storeu_epi8(y, mask, v);
  else if constexpr (sizeof(Out) == 2) _mm512_mask_cvtepi32_storeu_epi16(y, mask, v);
  else _mm512_mask_storeu_epi32(y, mask, v);
}

// R rows x one panel of the Linear's output (columns c0.. of rows y, ldy apart)
template <int R, typename Out>
__attribute__((noinline)) void vnni_linear_tile(const int8_t* a, int64_t lda, const int8_t* bp, int64_t groups,
                                                const int32_t* corr, const LinearConsts& k, int64_t c0, Out* y,
                                                int64_t ldy, int64_t cols) {
  const __m512i lo = _mm512_set1_epi64(k.lo), hi = _mm512_set1_epi64(k.hi), off = _mm512_set1_epi32(128);
  __m512i t[8];  // the int16 table, 32 values a register
  for (int i = 0; i < 8; ++i) t[i] = k.table16 ? _mm512_loadu_si512(k.table16 + 32 * i) : _mm512_setzero_si512();
  const __m512i bit6 = _mm512_set1_epi16(64), bit7 = _mm512_set1_epi16(128);
  vnni_tile_with<R>(a, lda, bp, groups, [&](int r, int q, __m512i acc) {
    const __mmask16 mask = column_mask(cols, q);
    if (!mask) return;
    const int64_t col = c0 + 16 * q;
    const __m512i v = _mm512_add_epi32(_mm512_sub_epi32(acc, _mm512_loadu_si512(corr + 16 * q)),
                                       _mm512_loadu_si512(k.bias + col));
    __m512i p0 = _mm512_mul_epi32(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)), _mm512_loadu_si512(k.m + col));
    __m512i p1 = _mm512_mul_epi32(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)), _mm512_loadu_si512(k.m + col + 8));
    p0 = _mm512_srav_epi64(_mm512_add_epi64(p0, _mm512_loadu_si512(k.half + col)), _mm512_loadu_si512(k.shift + col));
    p1 = _mm512_srav_epi64(_mm512_add_epi64(p1, _mm512_loadu_si512(k.half + col + 8)), _mm512_loadu_si512(k.shift + col + 8));
    p0 = _mm512_min_epi64(_mm512_max_epi64(p0, lo), hi);
    p1 = _mm512_min_epi64(_mm512_max_epi64(p1, lo), hi);
    __m512i out = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(p0)), _mm512_cvtepi64_epi32(p1), 1);
    if (k.table16) {  // 16 word indices in [0, 256), looked up by quarters
      const __m512i idx = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_add_epi32(out, off)));
      const __mmask32 b6 = _mm512_test_epi16_mask(idx, bit6), b7 = _mm512_test_epi16_mask(idx, bit7);
      const __m512i low = _mm512_mask_blend_epi16(b6, _mm512_permutex2var_epi16(t[0], idx, t[1]),
                                                  _mm512_permutex2var_epi16(t[2], idx, t[3]));
      const __m512i high = _mm512_mask_blend_epi16(b6, _mm512_permutex2var_epi16(t[4], idx, t[5]),
                                                   _mm512_permutex2var_epi16(t[6], idx, t[7]));
      out = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(_mm512_mask_blend_epi16(b7, low, high)));
    } else if (k.table) {
      out = _mm512_i32gather_epi32(_mm512_add_epi32(out, off), k.table, 4);
    }
    store_out(y + r * ldy + 16 * q, mask, out);
  });
}

// tile.template operator()<R>(r, panel, c0, cols) for each R-row tile (6 rows, then the rest) of m rows, panel by
// panel of b (its first column c0, cols of its 64 that exist)
template <typename Tile>
void for_each_tile(int64_t m, const VnniB& b, const Tile& tile) {
  for (int64_t panel = 0; panel < b.panels; ++panel) {
    const int64_t c0 = panel * kVnniCols, cols = std::min(kVnniCols, b.n - c0);
    for (int64_t r = 0; r < m; r += kVnniRows) {
      switch (std::min<int64_t>(kVnniRows, m - r)) {
        case 6: tile.template operator()<6>(r, panel, c0, cols); break;
        case 5: tile.template operator()<5>(r, panel, c0, cols); break;
        case 4: tile.template operator()<4>(r, panel, c0, cols); break;
        case 3: tile.template operator()<3>(r, panel, c0, cols); break;
        case 2: tile.template operator()<2>(r, panel, c0, cols); break;
        default: tile.template operator()<1>(r, panel, c0, cols);
      }
    }
  }
}

inline const int8_t* panel_data(const VnniB& b, int64_t panel) { return b.data + panel * b.groups * kVnniCols * 4; }

// rows [0, m) of the Linear's output y (n columns, ldy apart) = the epilogue of a (m int8 rows, lda apart) @ b
template <typename Out>
void vnni_linear(const int8_t* a, int64_t m, int64_t lda, const VnniB& b, const LinearConsts& k, Out* y, int64_t ldy) {
  for_each_tile(m, b, [&]<int R>(int64_t r, int64_t panel, int64_t c0, int64_t cols) {
    vnni_linear_tile<R>(a + r * lda, lda, panel_data(b, panel), b.groups, b.corr + c0, k, c0, y + r * ldy + c0, ldy, cols);
  });
}

// c (m rows, ldc apart) int32 = a (m int8 rows, lda >= 4 * b.groups bytes apart, readable) @ b, on this thread
void vnni_gemm(const int8_t* a, int64_t m, int64_t lda, const VnniB& b, int32_t* c, int64_t ldc) {
  for_each_tile(m, b, [&]<int R>(int64_t r, int64_t panel, int64_t c0, int64_t cols) {
    vnni_tile<R>(a + r * lda, lda, panel_data(b, panel), b.groups, b.corr + c0, c + r * ldc + c0, ldc, cols);
  });
}
#endif

// One row of the attention's softmax, as table_softmax computes it: the scores (n int32 products) requantized to
// the softmax's input (m1, e1, [lo1, hi1]), the exponential of (score - row max), the probabilities
// round(e * floor(2**62 / sum e) / 2**shift) in [0, 2**(62 - shift)]. The exponential is read from a table over
// [low, 0], or computed element by element in bit-exp's form (intops.exp.BitExpForm): the table over an int16
// difference has 2**16 values, and its gathers cost more than the arithmetic (Zen 4: 9.9 vs 10.7 ms per ViT-S
// attention, one thread; a table of the 2**12 mantissas, in L1, was no faster: the gather itself is the cost).
// Plain loops over restrict pointers, every constant a local: the compiler vectorises them (-march=native), so the
// same source is exact on every ISA. Multipliers are int32 (< 2**31): their products are widening 32 x 32 -> 64
// multiplies, except bit-exp's exponent, taken in int32 halves where that is exact (bit_exp_row).
struct BitExp {  // intops.exp.BitExpForm; every step after the exponent's product fits int32
  int32_t m;
  int64_t half, e, low;
  int32_t frac_bits, c1, c2, k_inter;
  bool split;          // the exponent's product in int32 halves (bit_exp_row): scores span <= 2**16 - 1, 17 <= e <= 47
  bool clamps;         // the clamp at low can act: the row's lowest exponent (scores span) lies below it
  int64_t lane_terms;  // exponentials (each <= 2**(frac_bits + 1 + k_inter)) a uint32 lane of the row sum can add
};

// bit-exp's exponentials (BitExpForm's steps) of the row sc - top into e, and floor(2**62 / their sum). With Split,
// the exponent p = floor((d m + 2**(e-1)) / 2**e) of d = sc - top in [-(2**16 - 1), 0] in int32 lanes (no widening
// multiply): with nd = -d, m = mh 2**16 + ml (mh < 2**15, ml < 2**16), -floor(d m / 2**16) = nd mh + ceil(nd ml /
// 2**16) = P < 2**31 (nd ml + 2**16 - 1 < 2**32 as uint32), and p = (2**(e-17) - P) >> (e - 16): the half adds
// 2**(e-17) to d m / 2**16, and dropping d m's low 16 bits (the fraction below that) does not change a floor by
// 2**(e-16). e = mant << (k_inter - q) is intops' (mant << k_inter) >> q (its low k_inter bits are zero, q <= k_inter).
// The sum: uint32 lanes of lane_terms exponentials each, added into int64 (the vectorised sum has no widening).
template <bool Split, bool Clamp>
__attribute__((always_inline)) inline int64_t bit_exp_row(const int32_t* __restrict sc, int32_t top,
                                                          int32_t* __restrict e, int64_t n, const BitExp& x) {
  const int32_t m = x.m, frac_bits = x.frac_bits, c1 = x.c1, c2 = x.c2, k_inter = x.k_inter;
  const int32_t mask = (int32_t(1) << frac_bits) - 1, one = int32_t(1) << frac_bits, fhalf = one >> 1;
  const uint32_t mh = uint32_t(m) >> 16, ml = uint32_t(m) & 0xffffu;
  const int32_t carry = Split ? int32_t(1) << (x.e - 17) : 0, split_shift = int32_t(x.e - 16);
  const int64_t half = x.half, shift = x.e, plow = x.low;
  for (int64_t j = 0; j < n; ++j) {
    int32_t p;
    if constexpr (Split) {
      const uint32_t nd = uint32_t(top - sc[j]);
      p = (carry - int32_t(nd * mh + ((nd * ml + 0xffffu) >> 16))) >> split_shift;
      if constexpr (Clamp) p = std::max(p, int32_t(plow));
    } else {  // (scores span < 2**31: no int32 overflow in the difference)
      const int64_t wide = (int64_t(sc[j] - top) * int64_t(m) + half) >> shift;
      p = int32_t(Clamp ? std::max(wide, plow) : wide);
    }
    const int32_t r = p & mask;
    const int32_t mant = one + ((r * (c1 + ((c2 * r + fhalf) >> frac_bits)) + fhalf) >> frac_bits);
    e[j] = mant << (k_inter + (p >> frac_bits));
  }
  constexpr int64_t kLanes = 16;
  const int64_t chunk = x.lane_terms * kLanes;
  int64_t sum = 0, j = 0;
  for (; j + chunk <= n; j += chunk) {
    uint32_t lanes[kLanes] = {};
    for (int64_t t = j; t < j + chunk; t += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += uint32_t(e[t + l]);
    for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  }
  for (; j < n; ++j) sum += e[j];
  return (int64_t(1) << 62) / sum;
}

struct SoftmaxRow {
  int32_t m1;                        // the scores' requantization
  int64_t half1, e1, lo1, hi1;
  const int64_t* table;              // the exponential over [low, 0], or null (bit-exp's form)
  const int32_t* table32;            // the same where every value fits int32 (half the gathers), else null
  int64_t low, shift, half;
  BitExp bit_exp;
  bool int32_exps() const { return table32 || !table; }  // every exponential fits int32
};

// the exponentials e (n of E: int32 where int32_exps, else int64) of the row of products acc; returns
// floor(2**62 / sum e)
template <typename E>
__attribute__((always_inline)) inline int64_t softmax_exp(const int32_t* __restrict acc, int32_t* __restrict sc,
                                                          E* __restrict e, int64_t n, const SoftmaxRow& k) {
  const int32_t m1 = k.m1;
  const int64_t half1 = k.half1, e1 = k.e1, lo1 = k.lo1, hi1 = k.hi1, low = k.low;
  int32_t top = std::numeric_limits<int32_t>::min();
  for (int64_t j = 0; j < n; ++j) {
    int64_t s = (int64_t(acc[j]) * int64_t(m1) + half1) >> e1;
    s = std::min(std::max(s, lo1), hi1);  // int8 / int16 bounds (the table's span): fits int32
    sc[j] = int32_t(s);
    top = std::max(top, int32_t(s));
  }
  int64_t sum = 0;
  if constexpr (sizeof(E) == 4) {
    if (!k.table) {
      const BitExp& x = k.bit_exp;
      if (x.split) return x.clamps ? bit_exp_row<true, true>(sc, top, e, n, x) : bit_exp_row<true, false>(sc, top, e, n, x);
      return x.clamps ? bit_exp_row<false, true>(sc, top, e, n, x) : bit_exp_row<false, false>(sc, top, e, n, x);
    }
  }
  const E* __restrict table;
  if constexpr (sizeof(E) == 4) table = k.table32; else table = k.table;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t d = std::max<int32_t>(sc[j] - top, int32_t(low));  // >= -(2**16 - 1): no int32 overflow
    e[j] = table[d - int32_t(low)];
    sum += e[j];
  }
  return (int64_t(1) << 62) / sum;  // sum >= 1: every table value is > 0
}

// A probability (e recip + half) >> shift of one exponential e of a row (0 < e <= sum, recip = floor(2**62 / sum):
// e recip <= 2**62, so p <= 2**(62 - shift) <= 2**15; 47 <= shift <= 62, half = 2**(shift - 1)).
template <typename E>
__attribute__((always_inline)) inline int64_t probability(E e, int64_t recip, int64_t half, int64_t shift) {
  return (int64_t(e) * recip + half) >> shift;
}

// AVX2 without AVX-512: probability() of 8 int32 exponentials (e < 2**31), with recip = rh 2**32 + rl, as
// (e rh + ((e rl + half) >> 32)) >> (shift - 32) (a floor of a floor quotient; e rl + half < 2**64): uint32 x uint32
// -> uint64 products (vpmuludq, which multiplies the even lanes: the odd ones shifted down for a second product, each
// p < 2**32 put back in its lane) and logical shifts. GCC vectorises the scalar form with three vpmuludq per int64
// product, and an int64 arithmetic shift has no instruction before AVX-512: the loops below on this were 2x slower
// (ViT-S, AVX2 level).
// With AVX-512 the compiler's vpmullq loop was faster (ViT-S attention, VNNI path: 8.9 vs 9.4 ms).
#if defined(__AVX2__) && !defined(__AVX512F__)
#define ISEG_PROBABILITIES8 1
struct Probabilities8 {
  __m256i rl, rh, half;
  __m128i shift;  // shift - 32
  Probabilities8(int64_t recip, int64_t h, int64_t s)
      : rl(_mm256_set1_epi64x(int64_t(uint32_t(recip)))), rh(_mm256_set1_epi64x(int64_t(uint64_t(recip) >> 32))),
        half(_mm256_set1_epi64x(h)), shift(_mm_cvtsi64_si128(s - 32)) {}
  __m256i operator()(const int32_t* e) const {
    const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e)), odd = _mm256_srli_epi64(even, 32);
    return _mm256_or_si256(of_even(even), _mm256_slli_epi64(of_even(odd), 32));
  }
  __m256i of_even(__m256i x) const {
    const __m256i low = _mm256_srli_epi64(_mm256_add_epi64(_mm256_mul_epu32(x, rl), half), 32);
    return _mm256_srl_epi64(_mm256_add_epi64(_mm256_mul_epu32(x, rh), low), shift);
  }
};
#endif

// the probabilities' high bytes p >> 8 (uint8, at most 128) as they are, and their low bytes as _int_mm's int8 operand
// (p & 255) - 128
template <typename E>
__attribute__((noinline)) void softmax_row_bytes(const int32_t* __restrict acc, int32_t* __restrict sc,
                                                 E* __restrict e, uint8_t* __restrict high, int8_t* __restrict lowh,
                                                 int64_t n, const SoftmaxRow& k) {
  const int64_t recip = softmax_exp(acc, sc, e, n, k);
  const int64_t shift = k.shift, half = k.half;
  int64_t j = 0;
#ifdef ISEG_PROBABILITIES8
  if constexpr (sizeof(E) == 4) {  // 32 at a time: p >> 8 and (p & 255) ^ 128 packed to bytes (packs interleave
    const Probabilities8 probs(recip, half, shift);  // 128-bit lanes: a dword permute puts them back in order)
    const __m256i low_byte = _mm256_set1_epi32(255), flip = _mm256_set1_epi8(char(0x80));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; j + 32 <= n; j += 32) {
      const __m256i p0 = probs(e + j), p1 = probs(e + j + 8), p2 = probs(e + j + 16), p3 = probs(e + j + 24);
      const auto bytes = [&](__m256i a, __m256i b, __m256i c, __m256i d) {
        return _mm256_permutevar8x32_epi32(
            _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d)), order);
      };
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(high + j),
                          bytes(_mm256_srli_epi32(p0, 8), _mm256_srli_epi32(p1, 8), _mm256_srli_epi32(p2, 8),
                                _mm256_srli_epi32(p3, 8)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lowh + j),
                          _mm256_xor_si256(bytes(_mm256_and_si256(p0, low_byte), _mm256_and_si256(p1, low_byte),
                                                 _mm256_and_si256(p2, low_byte), _mm256_and_si256(p3, low_byte)), flip));
    }
  }
#endif
  for (; j < n; ++j) {
    const int64_t p = probability(e[j], recip, half, shift);
    high[j] = uint8_t(p >> 8);
    lowh[j] = int8_t((p & 255) - 128);
  }
}

// ctx (dv int32) = high @ v for one row of high bytes, over its non-zero entries only. A row of probabilities sums
// to about 2**15, so at most ~128 of them reach 256 (a non-zero high byte): a sparse row, where the int8 GEMM of
// the high half (offset by -64) was as dense as the low half's. |ctx| <= 128 * 129 * 128: no int32 overflow.
__attribute__((always_inline)) inline void add_scaled_row(int32_t* __restrict ctx, int32_t h, const int8_t* __restrict vr,
                                                          int64_t dv) {
  for (int64_t c = 0; c < dv; ++c) ctx[c] += h * int32_t(vr[c]);
}

__attribute__((noinline)) void sparse_high_row(const uint8_t* __restrict high, const int8_t* __restrict v,
                                               int64_t ldv, int32_t* __restrict ctx, int64_t n, int64_t dv) {
  std::fill(ctx, ctx + dv, 0);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {  // 8 bytes at a time: most words are zero
    uint64_t word;
    std::memcpy(&word, high + j, sizeof word);
    while (word) {
      const int bit = __builtin_ctzll(word) & ~7;
      const int64_t jj = j + bit / 8;
      add_scaled_row(ctx, high[jj], v + jj * ldv, dv);
      word &= ~(uint64_t(0xff) << bit);
    }
  }
  for (; j < n; ++j)
    if (high[j]) add_scaled_row(ctx, high[j], v + j * ldv, dv);
}

// the AVX2 GEMM's operand: the probabilities as int16, 2**15 entered as 2**15 - 1; returns the row's reciprocal if
// one was (the caller finds it again from e), else 0
template <typename E>
__attribute__((noinline)) int64_t softmax_row_int16(const int32_t* __restrict acc, int32_t* __restrict sc,
                                                 E* __restrict e, int16_t* __restrict probs, int64_t n,
                                                 const SoftmaxRow& k) {
  const int64_t recip = softmax_exp(acc, sc, e, n, k);
  const int64_t shift = k.shift, half = k.half;
  int64_t top = 0, j = 0;
#ifdef ISEG_PROBABILITIES8
  if constexpr (sizeof(E) == 4) {  // 16 at a time, packed to int16 with signed saturation (2**15 -> 2**15 - 1)
    const Probabilities8 probabilities(recip, half, shift);
    __m256i most = _mm256_setzero_si256();
    for (; j + 16 <= n; j += 16) {
      const __m256i p0 = probabilities(e + j), p1 = probabilities(e + j + 8);
      most = _mm256_max_epi32(most, _mm256_max_epi32(p0, p1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(p0, p1), 0xd8));
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), most);
    top = *std::max_element(lanes, lanes + 8);
  }
#endif
  for (; j < n; ++j) {
    const int64_t p = probability(e[j], recip, half, shift);
    probs[j] = int16_t(std::min<int64_t>(p, 32767));
    top = std::max(top, p);
  }
  return top > 32767 ? recip : 0;
}

// the attention's GEMMs (kernels.ATTENTION_GEMMS)
constexpr int64_t kGemmIntMm = 0, kGemmAvx2 = 1, kGemmVnni = 2;

// Attention, fused by blocks of query rows so that the scores, probabilities and their int8 halves stay in
// cache: scores = requantize(q @ kT) (int32 GEMM, its requantization), the table softmax of table_softmax,
// the probabilities split as split_uint16, their two int8 products with v recombined and requantized as
// combine_requantize. The same integers as those steps one after the other (tested). The GEMMs (gemm) are torch's
// exact int8 ones (at::_int_mm: oneDNN with VNNI), the VNNI kernel above or the AVX2 one, the last two with kT and
// v packed once per batch entry. With int8 GEMMs (_int_mm, VNNI) the probabilities' high bytes (p >> 8, non-zero
// for at most ~128 keys of a row) multiply v as a sparse row (sparse_high_row) instead of a second dense int8 GEMM.
// The (batch entry, block) tasks run on torch's OpenMP threads (on_threads), each GEMM of a task on its thread (a
// oneDNN call inside a parallel region runs single-threaded), into per-thread scratch.
at::Tensor attention(const at::Tensor& q_, const at::Tensor& kt_, const at::Tensor& v_, int64_t m1, int64_t e1,
                     int64_t lo1, int64_t hi1, const at::Tensor& table_, int64_t low, at::IntArrayRef bit_exp,
                     int64_t out_frac_bits, int64_t m2, int64_t e2, int64_t lo2, int64_t hi2, at::ScalarType out_dtype, int64_t block,
                     int64_t gemm) {
  TORCH_CHECK(gemm == kGemmIntMm || gemm == kGemmAvx2 || gemm == kGemmVnni, "attention: GEMM 0 (_int_mm), 1 (AVX2) or 2 (VNNI)");
  const bool avx2_gemm = gemm == kGemmAvx2, vnni = gemm == kGemmVnni;
  // The VNNI GEMM reads q's and v's rows, and the keys' rows (kt a transposed view of them), where they lie (views of
  // the qkv Linear's output: no copies); the other GEMMs take contiguous operands.
  const bool strided = vnni && q_.dim() == 3 && kt_.dim() == 3 && v_.dim() == 3 && q_.stride(2) == 1 &&
                       v_.stride(2) == 1 && kt_.stride(1) == 1;
  const at::Tensor q = strided ? q_ : q_.contiguous(), kt = strided ? kt_ : kt_.contiguous(),
                   v = strided ? v_ : v_.contiguous();
  const at::Tensor table = table_.to(at::kLong).contiguous();
  TORCH_CHECK(q.dim() == 3 && kt.dim() == 3 && v.dim() == 3 && q.scalar_type() == at::kChar &&
              kt.scalar_type() == at::kChar && v.scalar_type() == at::kChar, "attention: int8 (B, M, D), (B, D, N), (B, N, Dv)");
  const int64_t batch = q.size(0), rows = q.size(1), d = q.size(2), n = kt.size(2), dv = v.size(2);
  TORCH_CHECK(kt.size(0) == batch && v.size(0) == batch && kt.size(1) == d && v.size(1) == n, "attention: shapes");
  TORCH_CHECK(out_frac_bits >= 0 && out_frac_bits <= 15, "attention: probabilities of at most 2**15 (their bytes, or int16)");
  TORCH_CHECK(lo1 <= hi1 && hi1 - lo1 <= std::numeric_limits<int32_t>::max() && lo1 >= std::numeric_limits<int32_t>::min() &&
              hi1 <= std::numeric_limits<int32_t>::max() && e1 >= 0, "attention: scores within 31 bits of span");
  // element strides: batch entries and rows of q, of v, of the keys (contiguous: (B, D, N) kt's, else k's rows)
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), vs0 = v.stride(0), vs1 = v.stride(1), ks0 = kt.stride(0),
                ks1 = strided ? kt.stride(2) : kt.stride(1);
  std::vector<int64_t> colsum(avx2_gemm ? 0 : batch * dv, 0);  // (B, Dv) column sums of v, for _int_mm's halves
  if (!avx2_gemm)
    pool_for(batch, [&](int64_t b) {
      const int8_t* vb = v.data_ptr<int8_t>() + b * vs0;
      int64_t* c = colsum.data() + b * dv;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t col = 0; col < dv; ++col) c[col] += vb[j * vs1 + col];
    });
  at::Tensor out = at::empty({batch, rows, dv}, q.options().dtype(out_dtype));
  if (batch * rows * dv == 0) return out;
  const int64_t blocks = (rows + block - 1) / block;
  const int64_t shift = 62 - out_frac_bits;
  const int64_t* tp = table.data_ptr<int64_t>();
  std::vector<int32_t> table32;
  if (std::all_of(tp, tp + table.numel(), [](int64_t t) { return t <= std::numeric_limits<int32_t>::max(); }))
    table32.assign(tp, tp + table.numel());  // (table values are > 0)
  TORCH_CHECK(m1 >= std::numeric_limits<int32_t>::min() && m1 <= std::numeric_limits<int32_t>::max(),
              "attention: a scores multiplier of |m| < 2**31 (intops.requantize's)");
  BitExp bx{};
  if (!bit_exp.empty()) {  // m, e, frac_bits, c1, c2, k_inter; low: the exponent's clamp
    TORCH_CHECK(bit_exp.size() == 6 && table.numel() == 0, "attention: bit-exp's form, m, e, frac_bits, c1, c2, k_inter");
    const int64_t m = bit_exp[0], e = bit_exp[1], f = bit_exp[2], c1 = bit_exp[3], c2 = bit_exp[4], ki = bit_exp[5];
    // int32 steps: c2 r, r (c1 + ...) < 2**(2 f + 1); mant << k_inter <= 2**(f + 1 + k_inter); q = -(p >> f) < 32
    TORCH_CHECK(m >= 0 && m <= std::numeric_limits<int32_t>::max() && e >= 0 && e < 63 && f >= 1 && f <= 14 &&
                c1 >= 0 && c2 >= 0 && c1 + c2 <= (int64_t(1) << f) && ki >= 0 && f + 1 + ki <= 30 && low <= 0 &&
                -(low >> f) <= ki, "attention: bit-exp's constants out of their int32 ranges");
    const int64_t half = e > 0 ? (int64_t(1) << (e - 1)) : 0;
    const bool split = hi1 - lo1 < (int64_t(1) << 16) && e >= 17 && e <= 47;
    const bool clamps = (((lo1 - hi1) * m + half) >> e) < low;  // (|lo1 - hi1| < 2**31, m < 2**31: fits int64)
    const int64_t lane_terms = std::numeric_limits<uint32_t>::max() / (int64_t(1) << (f + 1 + ki));
    bx = BitExp{int32_t(m), half, e, low, int32_t(f), int32_t(c1), int32_t(c2), int32_t(ki), split, clamps, lane_terms};
  } else {
    TORCH_CHECK(low > -(int64_t(1) << 16) && low <= 0, "attention: a table spans int8 / int16 scores");
  }
  const SoftmaxRow k{int32_t(m1), e1 > 0 ? (int64_t(1) << (e1 - 1)) : 0, e1, lo1, hi1,
                     bit_exp.empty() ? tp : nullptr, bit_exp.empty() && !table32.empty() ? table32.data() : nullptr,
                     low, shift, int64_t(1) << (shift - 1), bx};
  // the block's context rows, int32 products pv (rr, Dv) (hi and lo halves: _int_mm), requantized into out
  const auto store = [&](int64_t b, int64_t r0, int64_t rr, const int32_t* pv, const int32_t* pv_low, int64_t high_offset) {
    AT_DISPATCH_SWITCH(out_dtype, "attention_out",
      AT_DISPATCH_CASE(at::kChar, [&] {
        scalar_t* o = out.data_ptr<scalar_t>() + (b * rows + r0) * dv;
        if (pv_low) combine_rows(pv, pv_low, colsum.data() + b * dv, m2, e2, lo2, hi2, o, 1, rr, dv, high_offset);
        else requantize_rows<int32_t, scalar_t>(pv, nullptr, &m2, &e2, false, lo2, hi2, o, rr, dv);
      })
      AT_DISPATCH_CASE(at::kShort, [&] {
        scalar_t* o = out.data_ptr<scalar_t>() + (b * rows + r0) * dv;
        if (pv_low) combine_rows(pv, pv_low, colsum.data() + b * dv, m2, e2, lo2, hi2, o, 1, rr, dv, high_offset);
        else requantize_rows<int32_t, scalar_t>(pv, nullptr, &m2, &e2, false, lo2, hi2, o, rr, dv);
      }));
  };
#ifdef __AVX2__
  if (avx2_gemm) {
    std::vector<PackedB> kts(batch), vs(batch);
    pool_for(batch, [&](int64_t b) {
      kts[b] = pack_b(kt.data_ptr<int8_t>() + b * d * n, d, n);
      vs[b] = pack_b(v.data_ptr<int8_t>() + b * n * dv, n, dv);
    });
    const int64_t lda = 2 * avx2_pairs(n);
    on_threads(batch * blocks, [&](std::atomic<int64_t>& next) {
      std::vector<int32_t> acc(block * n), sc(n), pv(block * dv);
      std::vector<int64_t> e(n);
      std::vector<int32_t> e32(n);
      std::vector<int16_t> probs(whole_tiles(block) * lda, 0);  // (the columns past n stay 0: pairs pad an odd n)
      std::vector<std::pair<int64_t, int64_t>> whole;  // (i, j) of the p = 2**15 entries
      for (int64_t task; (task = next.fetch_add(1)) < batch * blocks;) {
        const int64_t b = task / blocks, r0 = (task % blocks) * block, rr = std::min(block, rows - r0);
        mm_packed(q.data_ptr<int8_t>() + (b * rows + r0) * d, rr, d, kts[b].view(), acc.data());
        // The AVX2 GEMM takes int16 operands: the probabilities enter it whole, one GEMM where _int_mm needs one
        // per int8 half. p = 2**15 (a one-hot row) does not fit int16: it enters as 2**15 - 1 and the row gets
        // v's row once more. |p @ v| <= (2**15 + N) * 128 (rows sum to 2**15 up to rounding): no int32 overflow.
        whole.clear();
        for (int64_t i = 0; i < rr; ++i) {
          const int64_t recip = k.int32_exps()
              ? softmax_row_int16(acc.data() + i * n, sc.data(), e32.data(), probs.data() + i * lda, n, k)
              : softmax_row_int16(acc.data() + i * n, sc.data(), e.data(), probs.data() + i * lda, n, k);
          if (recip)
            for (int64_t j = 0; j < n; ++j)
              if ((k.int32_exps() ? probability(e32[j], recip, k.half, k.shift) : probability(e[j], recip, k.half, k.shift)) > 32767)
                whole.emplace_back(i, j);
        }
        gemm_rows(probs.data(), rr, vs[b].view(), pv.data());
        const int8_t* vb = v.data_ptr<int8_t>() + b * n * dv;
        for (const auto& [i, j] : whole)
          for (int64_t col = 0; col < dv; ++col) pv[i * dv + col] += vb[j * dv + col];
        store(b, r0, rr, pv.data(), nullptr, 0);
      }
    });
    return out;
  }
#else
  TORCH_CHECK(!avx2_gemm, "attention: these kernels were built for a CPU without AVX2");
#endif
  // the two int8 products on the kernels' VNNI GEMM (keys and values packed once per batch entry) or at::_int_mm
#ifdef ISEG_VNNI
  std::vector<PackedVnni> kts(vnni ? batch : 0), vs(vnni ? batch : 0);
  if (vnni)
    pool_for(batch, [&](int64_t b) {
      const int8_t* kb = kt.data_ptr<int8_t>() + b * ks0;
      kts[b] = strided ? pack_vnni_transposed(kb, n, d, ks1) : pack_vnni(kb, d, n, ks1);
      vs[b] = pack_vnni(v.data_ptr<int8_t>() + b * vs0, n, dv, vs1);
    });
#else
  TORCH_CHECK(!vnni, "attention: these kernels were built for a CPU without AVX-512 VNNI");
#endif
  // rows of the GEMMs' left operands: the VNNI GEMM reads whole groups of 4 bytes (q copied where d is not a
  // multiple of 4; the low bytes' rows padded)
  const int64_t qa = vnni ? (d + 3) / 4 * 4 : d, la = vnni ? (n + 3) / 4 * 4 : n;
  on_threads(batch * blocks, [&](std::atomic<int64_t>& next) {
    const auto i32 = q.options().dtype(at::kInt);
    at::Tensor acc = at::empty({block, n}, i32), lowh = at::zeros({block, la}, q.options()),
               pv_lo = at::empty({block, dv}, i32);
    std::vector<int8_t> qpad(qa != d ? block * qa : 0, 0);
    std::vector<uint8_t> high(n);
    std::vector<int32_t> sc(n), pv_hi(block * dv);
    std::vector<int64_t> e(n);
    std::vector<int32_t> e32(n);
    for (int64_t task; (task = next.fetch_add(1)) < batch * blocks;) {
      const int64_t b = task / blocks, r0 = (task % blocks) * block, rr = std::min(block, rows - r0);
      // (scratch by pointer; tensor views only for _int_mm's calls)
      int32_t* ap = acc.data_ptr<int32_t>();
      int8_t* lp = lowh.data_ptr<int8_t>();
      int32_t* plp = pv_lo.data_ptr<int32_t>();
      const int8_t* qb = q.data_ptr<int8_t>() + b * qs0 + r0 * qs1;
#ifdef ISEG_VNNI
      if (vnni) {
        int64_t lda = qs1;
        if (qa != d) {
          for (int64_t i = 0; i < rr; ++i) std::copy(qb + i * qs1, qb + i * qs1 + d, qpad.data() + i * qa);
          qb = qpad.data();
          lda = qa;
        }
        vnni_gemm(qb, rr, lda, kts[b].view(), ap, n);
      }
#endif
      if (!vnni) {
        at::Tensor a = acc.narrow(0, 0, rr);
        at::_int_mm_out(a, q[b].narrow(0, r0, rr), kt[b]);
      }
      const int8_t* vb = v.data_ptr<int8_t>() + b * vs0;
      for (int64_t i = 0; i < rr; ++i) {  // the low bytes' GEMM below; the high bytes' product here, row by row
        if (k.int32_exps()) softmax_row_bytes(ap + i * n, sc.data(), e32.data(), high.data(), lp + i * la, n, k);
        else softmax_row_bytes(ap + i * n, sc.data(), e.data(), high.data(), lp + i * la, n, k);
        sparse_high_row(high.data(), vb, vs1, pv_hi.data() + i * dv, n, dv);
      }
#ifdef ISEG_VNNI
      if (vnni) vnni_gemm(lp, rr, la, vs[b].view(), plp, dv);
#endif
      if (!vnni) {
        at::Tensor pl = pv_lo.narrow(0, 0, rr);
        at::_int_mm_out(pl, lowh.narrow(0, 0, rr), v[b]);
      }
      store(b, r0, rr, pv_hi.data(), plp, 0);
    }
  });
  return out;
}

// w (K, N) int8 packed for the VNNI GEMM once (a Linear's weights): [data, 128 * column sums] (linear's ``packed``)
std::vector<at::Tensor> pack_vnni_weight(const at::Tensor& w_) {
  const at::Tensor w = w_.contiguous();
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "pack_vnni_weight: int8 w (K, N)");
#ifdef ISEG_VNNI
  const int64_t k = w.size(0), n = w.size(1);
  at::Tensor data = at::zeros({vnni_panels(n) * vnni_groups(k) * kVnniCols * 4}, w.options());
  at::Tensor corr = at::zeros({vnni_panels(n) * kVnniCols}, w.options().dtype(at::kInt));
  pack_vnni_into(w.data_ptr<int8_t>(), k, n, n, data.data_ptr<int8_t>(), corr.data_ptr<int32_t>());
  return {data, corr};
#else
  TORCH_CHECK(false, "pack_vnni_weight: these kernels were built for a CPU without AVX-512 VNNI");
  return {};
#endif
}

// w (K, N) int8 packed for the AVX2 GEMM once (a Linear's weights): [int16 panels] (linear's ``packed``)
std::vector<at::Tensor> pack_avx2_weight(const at::Tensor& w_) {
  const at::Tensor w = w_.contiguous();
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "pack_avx2_weight: int8 w (K, N)");
#ifdef __AVX2__
  const int64_t k = w.size(0), n = w.size(1);
  at::Tensor data = at::zeros({avx2_packed_size(k, n)}, w.options().dtype(at::kShort));
  pack_avx2_into(w.data_ptr<int8_t>(), k, n, data.data_ptr<int16_t>());
  return {data};
#else
  TORCH_CHECK(false, "pack_avx2_weight: these kernels were built for a CPU without AVX2");
  return {};
#endif
}

// y = int8(x - offset), wrapping as torch's cast to int8 does
template <typename In>
__attribute__((noinline)) void shift_into_int8(const In* __restrict x, int64_t offset, int8_t* __restrict y, int64_t count) {
  const int32_t off = int32_t(offset);
  for (int64_t i = 0; i < count; ++i) y[i] = wrap_int8(x[i], off);
}

// Linear: requantize(int8(x - offset) @ w + bias) of x (M, K) and w (K, N), by blocks of rows on torch's threads, an
// input on an asymmetric grid shifted into int8 block by block (no shifted copy of x passes through memory). The
// products: the kernels' VNNI GEMM with w packed once (``packed``: pack_vnni_weight's data and column sums, which the
// module keeps; blocks of 48 rows), the bias, requantization, clamp (and element-wise table) applied to each tile in
// registers and stored as the output type: no int32 products pass through memory. Else the kernels' AVX2 GEMM with w
// packed once (``packed``: pack_avx2_weight's panels; blocks of 48 rows, shifted and widened to int16 in one pass)
// or at::_int_mm (single-threaded inside the parallel region; ~256-row blocks: it packs w again at every call, and its
// cost per row grows on fewer rows), each block's int32 products requantized while they are in cache. The same integers as
// Linear's int8_matmul, bias add and Requant one after the other (the shift wraps into int8 as torch's cast does;
// the bias add wraps in int32 as an int32 tensor add does). ``then``: an element-wise module's outputs for the 256
// int8 values (LinearThen), read for each int8 output.
at::Tensor linear(const at::Tensor& x_, const at::Tensor& w_, const std::optional<at::Tensor>& bias_,
                  const at::Tensor& multiplier_, const at::Tensor& shift_, int64_t lo, int64_t hi, int64_t offset,
                  at::ScalarType out_dtype, const std::optional<at::Tensor>& then_, at::TensorList packed) {
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0) && w.scalar_type() == at::kChar &&
              (x.scalar_type() == at::kChar || x.scalar_type() == at::kShort),
              "linear: int8 / int16 x (M, K), int8 w (K, N)");
  const int64_t rows = x.size(0), k = x.size(1), n = w.size(1);
  const at::Tensor m = multiplier_.to(at::kLong).contiguous().flatten(), e = shift_.to(at::kLong).contiguous().flatten();
  const bool per_channel = m.numel() > 1;
  TORCH_CHECK((m.numel() == 1 || m.numel() == n) && e.numel() == m.numel(), "linear: one multiplier, or one per output");
  at::Tensor bias;
  if (bias_.has_value()) {
    bias = bias_->to(at::kInt).contiguous();
    TORCH_CHECK(bias.numel() == n, "linear: one bias per output");
  }
  at::Tensor then;
  if (then_.has_value()) {
    then = then_->contiguous();
    TORCH_CHECK(then.numel() == 256 && lo >= -128 && hi <= 127 && out_dtype == at::kChar,
                "linear: an element-wise table follows int8 outputs (256 values)");
  }
  // packed weights: VNNI's (int8 panels and int32 column sums) or AVX2's (int16 panels)
  const bool avx2 = packed.size() == 1 && packed[0].scalar_type() == at::kShort, vnni = !packed.empty() && !avx2;
#ifdef __AVX2__
  Avx2B wa{};
  if (avx2) {
    TORCH_CHECK(packed[0].is_contiguous() && packed[0].numel() == avx2_packed_size(k, n),
                "linear: w packed by pack_avx2_weight");
    wa = Avx2B{packed[0].data_ptr<int16_t>(), n, avx2_pairs(k), avx2_panels(n)};
  }
#else
  TORCH_CHECK(!avx2, "linear: these kernels were built for a CPU without AVX2");
#endif
#ifdef ISEG_VNNI
  VnniB wb{};
  if (vnni) {
    TORCH_CHECK(packed.size() == 2 && packed[0].scalar_type() == at::kChar && packed[1].scalar_type() == at::kInt &&
                packed[0].is_contiguous() && packed[1].is_contiguous() &&
                packed[0].numel() == vnni_panels(n) * vnni_groups(k) * kVnniCols * 4 &&
                packed[1].numel() == vnni_panels(n) * kVnniCols, "linear: w packed by pack_vnni_weight");
    wb = VnniB{packed[0].data_ptr<int8_t>(), packed[1].data_ptr<int32_t>(), n, vnni_groups(k), vnni_panels(n)};
  }
#else
  TORCH_CHECK(!vnni, "linear: these kernels were built for a CPU without AVX-512 VNNI");
#endif
  const at::Tensor table = then.defined() ? then.to(at::kInt).contiguous() : at::Tensor();  // (lookup_span's)
  at::Tensor out = at::empty({rows, n}, x.options().dtype(then.defined() ? then.scalar_type() : out_dtype));
  if (rows * n == 0) return out;
  // the GEMM's left operand: x's rows as they are, or shifted into int8 (and, for the VNNI GEMM, which reads whole
  // groups of 4 bytes, zero-padded to them) block by block
  // (the AVX2 GEMM's operand: int16 rows, shifted as they are widened)
  const int64_t lda = vnni ? (k + 3) / 4 * 4 : k;
  const bool as_is = avx2 || (x.scalar_type() == at::kChar && offset == 0 && lda == k);
  // tasks of ~48 rows (VNNI, AVX2: whole 6-row tiles) or at most ~256 rows (_int_mm), a multiple of the threads in
  // number and within one unit (a tile, a row) of each other in size: a last task much smaller than the others left
  // one thread idle at the end of each Linear (~2 % of a ViT-B forward)
  const int64_t threads = at::get_num_threads(), unit = vnni ? kVnniRows : avx2 ? kTileRows : 1, target = (vnni || avx2 ? 48 : 256) / unit;
  const int64_t units = (rows + unit - 1) / unit;
  const int64_t tasks = std::min(units, threads * ((units + target * threads - 1) / (target * threads)));
  const int64_t per_task = unit * ((units + tasks - 1) / tasks);  // rows of the largest task
  // the requantization's constants per output column, once (the VNNI epilogue reads whole panels of them)
  const ChannelRequant cr(bias.defined() ? bias.data_ptr<int32_t>() : nullptr, m.data_ptr<int64_t>(),
                          e.data_ptr<int64_t>(), per_channel, n, vnni ? (n + kVnniCols - 1) / kVnniCols * kVnniCols : n);
#ifdef ISEG_VNNI
  std::vector<int16_t> table16;
  if (then.defined()) {
    const int32_t* tv = table.data_ptr<int32_t>();
    if (std::all_of(tv, tv + 256, [](int32_t t) { return t >= INT16_MIN && t <= INT16_MAX; })) table16.assign(tv, tv + 256);
  }
  const LinearConsts consts{cr.add.data(), cr.mult.data(), cr.half.data(), cr.shift.data(), lo, hi,
                            then.defined() ? table.data_ptr<int32_t>() : nullptr,
                            table16.empty() ? nullptr : table16.data()};
#endif
  on_threads(tasks, [&](std::atomic<int64_t>& next) {
    at::Tensor acc = vnni ? at::Tensor() : at::empty({per_task, n}, x.options().dtype(at::kInt));
#ifdef __AVX2__
    std::vector<int16_t> a16(avx2 ? per_task * 2 * wa.pairs : 0);
#endif
    at::Tensor shifted = as_is ? at::Tensor() : at::zeros({per_task, lda}, x.options().dtype(at::kChar));
    at::Tensor ints = then.defined() && !vnni ? at::empty({per_task, n}, x.options().dtype(at::kChar)) : at::Tensor();
    for (int64_t task; (task = next.fetch_add(1)) < tasks;) {
      const int64_t r0 = unit * (task * units / tasks), rr = std::min(rows, unit * ((task + 1) * units / tasks)) - r0;
      if (rr <= 0) continue;
      at::Tensor a = x.narrow(0, r0, rr);
      if (!as_is) {
        at::Tensor s = shifted.narrow(0, 0, rr);
        AT_DISPATCH_SWITCH(x.scalar_type(), "linear_shift",
          AT_DISPATCH_CASE(at::kChar, [&] { for (int64_t i = 0; i < rr; ++i) shift_into_int8(a.data_ptr<scalar_t>() + i * k, offset, s.data_ptr<int8_t>() + i * lda, k); })
          AT_DISPATCH_CASE(at::kShort, [&] { for (int64_t i = 0; i < rr; ++i) shift_into_int8(a.data_ptr<scalar_t>() + i * k, offset, s.data_ptr<int8_t>() + i * lda, k); }));
        a = s;
      }
#ifdef ISEG_VNNI
      if (vnni) {  // the products and their epilogue in registers, straight into the output
        AT_DISPATCH_SWITCH(out.scalar_type(), "linear_vnni",
          AT_DISPATCH_CASE(at::kChar, [&] { vnni_linear(a.data_ptr<int8_t>(), rr, lda, wb, consts, out.data_ptr<scalar_t>() + r0 * n, n); })
          AT_DISPATCH_CASE(at::kShort, [&] { vnni_linear(a.data_ptr<int8_t>(), rr, lda, wb, consts, out.data_ptr<scalar_t>() + r0 * n, n); })
          AT_DISPATCH_CASE(at::kInt, [&] { vnni_linear(a.data_ptr<int8_t>(), rr, lda, wb, consts, out.data_ptr<scalar_t>() + r0 * n, n); }));
        continue;
      }
#endif
      at::Tensor c = acc.narrow(0, 0, rr);
#ifdef __AVX2__
      if (avx2) {
        AT_DISPATCH_SWITCH(x.scalar_type(), "linear_avx2",
          AT_DISPATCH_CASE(at::kChar, [&] { pack_a_rows(x.data_ptr<scalar_t>(), r0, r0 + rr, k, wa.pairs, a16.data(), offset); })
          AT_DISPATCH_CASE(at::kShort, [&] { pack_a_rows(x.data_ptr<scalar_t>(), r0, r0 + rr, k, wa.pairs, a16.data(), offset); }));
        gemm_rows(a16.data(), rr, wa, c.data_ptr<int32_t>());
      }
#endif
      if (!avx2) at::_int_mm_out(c, a, w);
      if (then.defined()) {  // the int8 outputs into scratch, then their element-wise values
        requantize_rows<int32_t, int8_t>(c.data_ptr<int32_t>(), cr, lo, hi, ints.data_ptr<int8_t>(), rr, n);
        AT_DISPATCH_SWITCH(then.scalar_type(), "linear_then",
          AT_DISPATCH_CASE(at::kChar, [&] { lookup_span(ints.data_ptr<int8_t>(), table.data_ptr<int32_t>(), out.data_ptr<scalar_t>() + r0 * n, rr * n); })
          AT_DISPATCH_CASE(at::kShort, [&] { lookup_span(ints.data_ptr<int8_t>(), table.data_ptr<int32_t>(), out.data_ptr<scalar_t>() + r0 * n, rr * n); })
          AT_DISPATCH_CASE(at::kInt, [&] { lookup_span(ints.data_ptr<int8_t>(), table.data_ptr<int32_t>(), out.data_ptr<scalar_t>() + r0 * n, rr * n); }));
        continue;
      }
      AT_DISPATCH_SWITCH(out_dtype, "linear_out",
        AT_DISPATCH_CASE(at::kChar, [&] { requantize_rows<int32_t, scalar_t>(c.data_ptr<int32_t>(), cr, lo, hi, out.data_ptr<scalar_t>() + r0 * n, rr, n); })
        AT_DISPATCH_CASE(at::kShort, [&] { requantize_rows<int32_t, scalar_t>(c.data_ptr<int32_t>(), cr, lo, hi, out.data_ptr<scalar_t>() + r0 * n, rr, n); })
        AT_DISPATCH_CASE(at::kInt, [&] { requantize_rows<int32_t, scalar_t>(c.data_ptr<int32_t>(), cr, lo, hi, out.data_ptr<scalar_t>() + r0 * n, rr, n); }));
    }
  });
  return out;
}

// intops.pixels_to_int8: (B, C, H, W) uint8 pixels -> int8, per channel clamp((256 p - mean) * m / 2**e, rounded
// half up, to [-128, 127]), one pass over each plane (the mean has 8 fraction bits; |256 p - mean| < 2**17).
__attribute__((noinline)) void pixels_plane(const uint8_t* __restrict p, int8_t* __restrict y, int64_t count,
                                            int64_t mean, int64_t m, int64_t half, int64_t e) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t v = ((int64_t(p[i]) * 256 - mean) * m + half) >> e;
    y[i] = int8_t(std::min(std::max(v, int64_t(-128)), int64_t(127)));
  }
}

at::Tensor pixels_to_int8(const at::Tensor& x_, const at::Tensor& mean_, const at::Tensor& m_, const at::Tensor& e_) {
  const at::Tensor x = x_.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kByte && x.dim() == 4, "pixels_to_int8: uint8 (B, C, H, W) pixels");
  const int64_t c = x.size(1), plane = x.size(2) * x.size(3);
  const at::Tensor mean = mean_.to(at::kLong).contiguous().flatten(), m = m_.to(at::kLong).contiguous().flatten(),
                   e = e_.to(at::kLong).contiguous().flatten();
  TORCH_CHECK(mean.numel() == c && (m.numel() == 1 || m.numel() == c) && e.numel() == m.numel(),
              "pixels_to_int8: one mean per channel, one multiplier per channel or per tensor");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const int64_t* mp = m.data_ptr<int64_t>();
  const int64_t* ep = e.data_ptr<int64_t>();
  const int64_t* meanp = mean.data_ptr<int64_t>();
  const int64_t chunk = 1 << 16;  // elements per task: planes in pieces, so that one image spreads over the threads
  const int64_t pieces = (plane + chunk - 1) / chunk, planes = x.size(0) * c;
  pool_for(planes * pieces, [&](int64_t task) {
    const int64_t pl = task / pieces, i0 = (task % pieces) * chunk, count = std::min(chunk, plane - i0);
    const int64_t ch = pl % c, k = m.numel() == 1 ? 0 : ch;
    pixels_plane(x.data_ptr<uint8_t>() + pl * plane + i0, out.data_ptr<int8_t>() + pl * plane + i0, count, meanp[ch],
                 mp[k], ep[k] > 0 ? (int64_t(1) << (ep[k] - 1)) : 0, ep[k]);
  });
  return out;
}

// intops' ShiftExp (_shift_exp_int) of p <= 0 computed directly: base 2 by shift-add, the exponent clamped at
// -k_inter, 2**(r/i0) ~ 1 + r/(2 i0).
inline int64_t shift_exp(int64_t x, int64_t i0, int64_t k_inter) {
  int64_t p = x + (x >> 1) - (x >> 4);
  p = std::max(p, -k_inter * i0);
  const int64_t q = p / -i0;  // p <= 0 < i0: a non-negative quotient, where truncation is the floor
  const int64_t r = p + q * i0;
  return ((r >> 1) + i0) << (k_inter - q);
}

// intops.shift_gelu / lambda_shift_gelu (cap < 0: no cap) over rows of the last dim, with the module's output
// requantization (a per-tensor dyadic).
template <typename In, typename Out>
void sigmoid_gelu_rows(const In* x, int64_t i0, int64_t cap, int64_t frac_bits, int64_t k_inter, int64_t k_out,
                       int64_t m, int64_t e, int64_t lo, int64_t hi, Out* out, int64_t rows, int64_t n) {
  const int64_t shift = 62 - (k_out - 1), half = int64_t(1) << (shift - 1);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> z(n);
    for (int64_t r = begin; r < end; ++r) {
      const In* xr = x + r * n;
      int64_t ref = 0;  // the row max of z, at least 0
      for (int64_t i = 0; i < n; ++i) {
        int64_t xs = int64_t(xr[i]) << frac_bits;
        if (cap >= 0) xs = std::min(xs, cap);
        z[i] = xs + (xs >> 1) + (xs >> 3) + (xs >> 4);  // x * 1.6875
        ref = std::max(ref, z[i]);
      }
      const int64_t e2 = shift_exp(-ref, i0, k_inter);
      Out* yr = out + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e1 = shift_exp(z[i] - ref, i0, k_inter);
        const int64_t recip = (int64_t(1) << 62) / (e1 + e2);
        const int64_t sigma = (e1 * recip + half) >> shift;
        yr[i] = Out(std::min(std::max(dyadic(int64_t(xr[i]) * sigma, m, e), lo), hi));
      }
    }
  });
}

at::Tensor sigmoid_gelu(const at::Tensor& x_, int64_t i0, int64_t cap, int64_t frac_bits, int64_t k_inter,
                        int64_t k_out, int64_t m, int64_t e, int64_t lo, int64_t hi, at::ScalarType out_dtype) {
  const at::Tensor x = x_.contiguous();
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  dispatch_int8_int16(x.scalar_type(), out_dtype, [&](auto in, auto res) {
    using In = decltype(in);
    using Out = decltype(res);
    sigmoid_gelu_rows<In, Out>(x.data_ptr<In>(), i0, cap, frac_bits, k_inter, k_out, m, e, lo, hi,
                               out.data_ptr<Out>(), rows, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(iseg_kernels, m) {
  m.def("requantize(Tensor x, Tensor? bias, Tensor multiplier, Tensor shift, int lo, int hi, ScalarType out_dtype) -> Tensor");
  m.def("requantize_add(Tensor a, Tensor b, int ma, int ea, int mb, int eb, int lo, int hi, ScalarType out_dtype) -> Tensor");
  m.def("table_softmax(Tensor x, Tensor table, int low, int out_frac_bits) -> Tensor");
  m.def("layernorm(Tensor x, Tensor weight, Tensor bias, int eps, int m, int e, int lo, int hi, int norm_bits, ScalarType out_dtype) -> Tensor");
  m.def("split_uint16(Tensor p) -> Tensor[]");
  m.def("combine_requantize(Tensor hi, Tensor lo, Tensor colsum, int m, int e, int lo_bound, int hi_bound, ScalarType out_dtype) -> Tensor");
  m.def("argmax_channels(Tensor x, int h, int w) -> Tensor");
  m.def("upsample_class_map(Tensor x, Tensor rows, Tensor cols, int den, int crop_h, int crop_w, bool with_logits) -> Tensor[]");
  m.def("attention(Tensor q, Tensor kt, Tensor v, int m1, int e1, int lo1, int hi1, Tensor table, int low, int[] bit_exp, int out_frac_bits, int m2, int e2, int lo2, int hi2, ScalarType out_dtype, int block, int gemm) -> Tensor");
  m.def("sigmoid_gelu(Tensor x, int i0, int cap, int frac_bits, int k_inter, int k_out, int m, int e, int lo, int hi, ScalarType out_dtype) -> Tensor");
  m.def("upsample(Tensor x, Tensor rows, Tensor cols, int den) -> Tensor");
  m.def("int8_mm_avx2(Tensor a, Tensor b) -> Tensor");
  m.def("linear(Tensor x, Tensor w, Tensor? bias, Tensor multiplier, Tensor shift, int lo, int hi, int offset, ScalarType out_dtype, Tensor? then, Tensor[] packed) -> Tensor");
  m.def("pack_vnni_weight(Tensor w) -> Tensor[]");
  m.def("pack_avx2_weight(Tensor w) -> Tensor[]");
  m.def("pixels_to_int8(Tensor pixels, Tensor mean, Tensor multiplier, Tensor shift) -> Tensor");
  m.def("poly_gelu(Tensor x, int clip, int pre_shift, int pm, int pe, int k_out, int m, int e, int lo, int hi, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(iseg_kernels, CPU, m) {
  m.impl("requantize", &requantize);
  m.impl("requantize_add", &requantize_add);
  m.impl("table_softmax", &table_softmax);
  m.impl("layernorm", &layernorm);
  m.impl("poly_gelu", &poly_gelu);
  m.impl("upsample", &upsample);
  m.impl("sigmoid_gelu", &sigmoid_gelu);
  m.impl("attention", &attention);
  m.impl("int8_mm_avx2", &int8_mm_avx2);
  m.impl("linear", &linear);
  m.impl("pack_vnni_weight", &pack_vnni_weight);
  m.impl("pack_avx2_weight", &pack_avx2_weight);
  m.impl("argmax_channels", &argmax_channels);
  m.impl("upsample_class_map", &upsample_class_map);
  m.impl("split_uint16", &split_uint16);
  m.impl("combine_requantize", &combine_requantize);
  m.impl("pixels_to_int8", &pixels_to_int8);
}
