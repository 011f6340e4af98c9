// Torch-free check of the CPU kernel core (csrc/cpu/stack_kernel.h, mlp_stack_kernel.h) on one instruction
// set, chosen when compiling: -DDMUP_CHECK_ISA=avx512, avx2, neon or portable (see the Makefile's
// test-neon target and tests/test_stack_kernel_native.py). It checks, against its own float64
// scalar reference:
// - exp and tanh of the ISA's vectors against std::exp / std::tanh over the float range (a sample of
//   every bit pattern), +-0, +-inf, NaN and the overflow and underflow edges;
// - the stack's output and gradients for every activation, block, mean subtraction and bias setting,
//   and the MLP stack's for every activation, mean subtraction and bias setting, on odd widths, hidden
//   widths and row counts, with float32 outputs poisoned with NaN before the kernel runs;
// - that the results are bitwise the same for 1, 2 and 3 threads, and with depth checkpoints;
// - that +-inf and NaN in the input give non-finite results exactly where the reference has them.
// It prints one line per failure and "N passed, M failed", and exits non-zero on any failure.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#define DMUP_STRINGIFY2(x) #x
#define DMUP_STRINGIFY(x) DMUP_STRINGIFY2(x)

#if defined(DMUP_CHECK_AVX512)
#include "cpu/simd_avx512.h"
using Simd = dmup::avx512::Simd;
#elif defined(DMUP_CHECK_AVX2)
#include "cpu/simd_avx2.h"
using Simd = dmup::avx2::Simd;
#elif defined(DMUP_CHECK_NEON)
#include "cpu/simd_neon.h"
using Simd = dmup::neon::Simd;
#else
#include "cpu/simd_scalar.h"
using Simd = dmup::ScalarSimd<float>;
#endif
#include "cpu/mlp_stack_kernel.h"

namespace {

using dmup::Activation;
using dmup::Block;

int passed = 0, failed = 0;

void expect(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

const char* name_of(Activation a) {
  static const char* names[] = {"identity", "relu", "abs", "gelu", "silu"};
  return names[static_cast<int>(a)];
}

// ---------------------------------------------------------------------------------------------
// exp and tanh of the ISA's vectors
// ---------------------------------------------------------------------------------------------

template <class F>
void apply_lanes(const std::vector<float>& in, std::vector<float>& out, F&& f) {
  out.resize(in.size());
  for (size_t i = 0; i < in.size(); i += Simd::W) {
    float lanes[Simd::W];
    for (int j = 0; j < Simd::W; ++j) lanes[j] = i + j < in.size() ? in[i + j] : 0.0f;
    Simd::store(lanes, f(Simd::load(lanes)));
    for (int j = 0; j < Simd::W && i + j < in.size(); ++j) out[i + j] = lanes[j];
  }
}

float ulp_of(float y) {
  const float a = std::fabs(y);
  return std::nextafter(a, std::numeric_limits<float>::infinity()) - a;
}

// The error bounds: exp within 2 ulp of the correctly rounded result (exact where that is 0 or
// inf); tanh within 2^-22 absolute (it is 1 - 2 / (e^{2x} + 1), which cancels near 0).
constexpr double kExpUlps = 2.0;
constexpr double kTanhAbs = 2.384185791015625e-07;

void check_exp_tanh() {
  std::vector<float> inputs = {0.0f,
                               -0.0f,
                               1.0f,
                               -1.0f,
                               88.72f,
                               88.7228f,
                               88.73f,
                               89.0f,
                               100.0f,
                               -87.3f,
                               -103.9f,
                               -103.97f,
                               -103.98f,
                               -104.0f,
                               -120.0f,
                               1e-30f,
                               -1e-30f,
                               1e-45f,
                               std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::quiet_NaN(),
                               -std::numeric_limits<float>::quiet_NaN(),
                               std::numeric_limits<float>::max(),
                               -std::numeric_limits<float>::max()};
  for (uint64_t bits = 0; bits < (uint64_t(1) << 32); bits += 4099) {  // ~1M patterns, every exponent
    uint32_t b = static_cast<uint32_t>(bits);
    float x;
    std::memcpy(&x, &b, sizeof x);
    inputs.push_back(x);
  }
  std::vector<float> ours_exp, ours_tanh;
  using std::exp;
  using std::tanh;
  apply_lanes(inputs, ours_exp, [](Simd::Vec v) { return exp(v); });
  apply_lanes(inputs, ours_tanh, [](Simd::Vec v) { return tanh(v); });
  double worst_exp = 0, worst_tanh = 0;
  int bad_exp = 0, bad_tanh = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const float x = inputs[i];
    const float e = static_cast<float>(std::exp(static_cast<double>(x)));
    const float t = static_cast<float>(std::tanh(static_cast<double>(x)));
    const float ye = ours_exp[i], yt = ours_tanh[i];
    bool ok_e, ok_t;
    if (std::isnan(x)) {
      ok_e = std::isnan(ye);
      ok_t = std::isnan(yt);
    } else {
      if (std::isinf(e) || e == 0.0f) {
        ok_e = ye == e;
      } else {
        const double err = std::fabs(static_cast<double>(ye) - e) / ulp_of(e);
        worst_exp = std::max(worst_exp, err);
        ok_e = err <= kExpUlps;
      }
      const double err_t = std::fabs(static_cast<double>(yt) - t);
      worst_tanh = std::max(worst_tanh, err_t);
      ok_t = err_t <= kTanhAbs && (!std::isinf(x) || yt == t);
    }
    if (!ok_e && bad_exp++ < 5) std::printf("  exp(%.9g) = %.9g, std::exp %.9g\n", x, ye, e);
    if (!ok_t && bad_tanh++ < 5) std::printf("  tanh(%.9g) = %.9g, std::tanh %.9g\n", x, yt, t);
  }
  std::printf("exp: worst %.2f ulp; tanh: worst %.3g absolute; over %zu inputs\n", worst_exp, worst_tanh,
              inputs.size());
  expect(bad_exp == 0,
         "exp within " + std::to_string(kExpUlps) + " ulp of std::exp (" + std::to_string(bad_exp) + " inputs off)");
  expect(bad_tanh == 0, "tanh within 2^-22 of std::tanh (" + std::to_string(bad_tanh) + " inputs off)");
}

// ---------------------------------------------------------------------------------------------
// float64 reference of the stack
// ---------------------------------------------------------------------------------------------

double phi(Activation a, double h) {
  switch (a) {
    case Activation::Identity: return h;
    case Activation::Relu: return h < 0 ? 0.0 : h;
    case Activation::Abs: return std::fabs(h);
    case Activation::Gelu: return 0.5 * h * (1 + std::tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)));
    case Activation::Silu: return h / (1 + std::exp(-h));
  }
  return 0;
}

// g * phi'(h), with torch's conventions at NaN: relu passes g (threshold_backward), abs gives g * 0.
double phi_backward(Activation a, double h, double g) {
  switch (a) {
    case Activation::Identity: return g;
    case Activation::Relu: return h <= 0 ? 0.0 : g;
    case Activation::Abs: return g * (h > 0 ? 1.0 : h < 0 ? -1.0 : 0.0);
    case Activation::Gelu: {
      const double k = 0.7978845608028654, c = 0.044715, t = std::tanh(k * (h + c * h * h * h));
      return g * (0.5 * (1 + t) + 0.5 * h * (1 - t * t) * k * (1 + 3 * c * h * h));
    }
    case Activation::Silu: {
      const double s = 1 / (1 + std::exp(-h));
      return g * s * (1 + h * (1 - s));
    }
  }
  return 0;
}

struct Config {
  int64_t width, batch, depth;
  Activation activation;
  Block block;
  bool mean_subtract, bias;
  std::string name() const {
    return std::string(name_of(activation)) + (block == Block::Post ? "-post" : "-pre") + (mean_subtract ? "-ms" : "") +
           (bias ? "-bias" : "") + " n=" + std::to_string(width) + " B=" + std::to_string(batch) +
           " L=" + std::to_string(depth);
  }
};

// The output, then the gradients (of x, then of each parameter), in a fixed order per kernel.
using Results = std::vector<std::vector<float>>;
const char* const kStackLabels[] = {"output", "grad x", "grad weight", "grad bias"};
const char* const kMlpLabels[] = {"output", "grad x", "grad weight1", "grad weight2", "grad bias1", "grad bias2"};

// Row-major x (B, n), weight (L, n, n), bias (L, n); returns out and the gradients for grad_out.
Results reference(const Config& c, const std::vector<float>& x0, const std::vector<float>& weight,
                  const std::vector<float>& bias, double scale, const std::vector<float>& grad_out) {
  const int64_t n = c.width, B = c.batch, L = c.depth;
  const bool post = c.block == Block::Post;
  std::vector<double> x(x0.begin(), x0.end());
  std::vector<std::vector<double>> xs(L), hs(L);
  std::vector<double> h(B * n), v(B * n);
  for (int64_t l = 0; l < L; ++l) {
    xs[l] = x;
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t o = 0; o < n; ++o) {
        double sum = c.bias ? bias[l * n + o] : 0.0;
        for (int64_t k = 0; k < n; ++k) {
          const double in = post ? x[r * n + k] : phi(c.activation, x[r * n + k]);
          sum += in * weight[(l * n + o) * n + k];
        }
        h[r * n + o] = sum;
        v[r * n + o] = post ? phi(c.activation, sum) : sum;
      }
      double mean = 0;
      if (c.mean_subtract) {
        for (int64_t o = 0; o < n; ++o) mean += v[r * n + o];
        mean /= n;
      }
      for (int64_t o = 0; o < n; ++o) x[r * n + o] += scale * (v[r * n + o] - mean);
    }
    hs[l] = h;
  }
  Results result(4);
  result[0].assign(x.begin(), x.end());
  std::vector<double> g(grad_out.begin(), grad_out.end()), dh(B * n);
  std::vector<double> dw(L * n * n, 0.0), db(L * n, 0.0);
  for (int64_t l = L - 1; l >= 0; --l) {
    for (int64_t r = 0; r < B; ++r) {
      double mean = 0;
      if (c.mean_subtract) {
        for (int64_t o = 0; o < n; ++o) mean += scale * g[r * n + o];
        mean /= n;
      }
      for (int64_t o = 0; o < n; ++o) {
        const double du = scale * g[r * n + o] - mean;
        dh[r * n + o] = post ? phi_backward(c.activation, hs[l][r * n + o], du) : du;
      }
    }
    for (int64_t o = 0; o < n; ++o) {
      for (int64_t r = 0; r < B; ++r) db[l * n + o] += dh[r * n + o];
      for (int64_t k = 0; k < n; ++k) {
        double sum = 0;
        for (int64_t r = 0; r < B; ++r) {
          const double in = post ? xs[l][r * n + k] : phi(c.activation, xs[l][r * n + k]);
          sum += dh[r * n + o] * in;
        }
        dw[(l * n + o) * n + k] = sum;
      }
    }
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t k = 0; k < n; ++k) {
        double da = 0;
        for (int64_t o = 0; o < n; ++o) da += dh[r * n + o] * weight[(l * n + o) * n + k];
        g[r * n + k] += post ? da : phi_backward(c.activation, xs[l][r * n + k], da);
      }
    }
  }
  result[1].assign(g.begin(), g.end());
  result[2].assign(dw.begin(), dw.end());
  if (c.bias) result[3].assign(db.begin(), db.end());
  return result;
}

// ---------------------------------------------------------------------------------------------
// the kernel
// ---------------------------------------------------------------------------------------------

// The kernel's output and gradients; with checkpoint_every = k > 0 the forward keeps x_0, x_k, ... only
// and the backward recomputes each segment (checkpointed_backward).
Results run_kernel(const Config& c, const std::vector<float>& x, const std::vector<float>& weight,
                   const std::vector<float>& bias, float scale, const std::vector<float>& grad_out, int threads,
                   int64_t checkpoint_every = 0) {
  const int64_t n = c.width, B = c.batch, L = c.depth;
  const auto kernels = dmup::make_stack_kernels<Simd>(c.activation, c.block);
  const dmup::StackProblem<float> problem{
      B,
      n,
      L,
      weight.data(),
      c.bias ? bias.data() : nullptr,
      scale,
      c.activation,
      c.block,
      c.mean_subtract,
      dmup::stack_tile_rows(B, dmup::stack_tile_features(n) * sizeof(float), threads)};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int planes = dmup::mask_planes(c.activation, c.block);
  const int64_t kept = checkpoint_every ? dmup::checkpoint_count(L, checkpoint_every) : L;
  const int64_t span = checkpoint_every ? std::min(checkpoint_every, L) : L;  // layers of scratch
  Results result{std::vector<float>(B * n, nan), std::vector<float>(B * n, nan), std::vector<float>(L * n * n, nan),
                 std::vector<float>(c.bias ? L * n : 0, nan)};
  std::vector<float> saved(kept * n * B, nan), states(span * n * B, nan), grad_carry(n * B, nan);
  std::vector<uint16_t> mask(span * planes * n * dmup::mask_words(B), 0xA5A5);  // bits must not depend on it
  kernels.forward(problem,
                  {x.data(), nullptr, result[0].data(), saved.data(), std::max<int64_t>(checkpoint_every, 1),
                   checkpoint_every ? nullptr : mask.data(), /*saved_bypasses_caches=*/true},
                  threads);
  float* grad_bias = c.bias ? result[3].data() : nullptr;
  const dmup::StackBackwardBuffers<float> buffers{grad_out.data(),   saved.data(),     mask.data(), result[1].data(),
                                                  grad_carry.data(), result[2].data(), grad_bias};
  if (checkpoint_every) {
    dmup::checkpointed_backward(kernels, problem, saved.data(), checkpoint_every, buffers, {states.data(), mask.data()},
                                threads);
    return result;
  }
  kernels.backward(problem, buffers, threads);
  return result;
}

// ||ours - ref|| / ||ref|| over the elements where the reference is finite; the non-finite ones must
// match exactly (NaN for NaN, the same infinity).
double compare(const std::vector<float>& ours, const std::vector<float>& ref, bool* classes_match) {
  double diff = 0, norm = 0;
  *classes_match = ours.size() == ref.size();
  for (size_t i = 0; i < ours.size() && *classes_match; ++i) {
    if (std::isnan(ref[i]) || std::isinf(ref[i])) {
      *classes_match = std::isnan(ref[i]) ? std::isnan(ours[i]) : ours[i] == ref[i];
    } else if (!std::isfinite(ours[i])) {
      *classes_match = false;
    } else {
      diff += (double(ours[i]) - ref[i]) * (double(ours[i]) - ref[i]);
      norm += double(ref[i]) * ref[i];
    }
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

constexpr double kTolerance = 1e-5;  // float32 against float64 at these depths

// Every result of `ours` within kTolerance of the reference's, with the same non-finite elements.
void expect_close(const std::string& name, const char* const* labels, const Results& ours, const Results& ref) {
  for (size_t i = 0; i < ref.size(); ++i) {
    bool classes_match;
    const double err = compare(ours[i], ref[i], &classes_match);
    char line[64];
    std::snprintf(line, sizeof line, ": rel err %.2e", err);
    expect(classes_match && err < kTolerance,
           name + " " + labels[i] + line + (classes_match ? "" : ", non-finite elements differ"));
  }
}

// The runs compared bitwise with one thread saving every layer: other thread counts, and checkpoints every 1
// or 2 layers (2 divides none of the odd depths).
struct Variant {
  int threads;
  int64_t checkpoint_every;
};
const Variant kVariants[] = {{2, 0}, {3, 0}, {1, 1}, {3, 2}};

// run(variant) gives the same bits as `one` (one thread, every layer saved) for every variant.
template <class Run>
void expect_same_bits(const std::string& name, const char* const* labels, const Results& one, Run&& run) {
  for (const Variant& v : kVariants) {
    const Results other = run(v);
    for (size_t i = 0; i < one.size(); ++i) {
      expect(bitwise_equal(one[i], other[i]), name + " " + labels[i] + ": 1 thread != " + std::to_string(v.threads) +
                                                  " threads, checkpoint every " + std::to_string(v.checkpoint_every) +
                                                  " layers");
    }
  }
}

// Random values: normal, scaled by `scale`.
std::vector<float> normal_values(std::mt19937& rng, int64_t count, float scale) {
  std::normal_distribution<float> normal;
  std::vector<float> values(count);
  for (auto& v : values) v = scale * normal(rng);
  return values;
}

// One special value (NaN, inf, -inf) in each of three rows of x (B, n) (fewer where the batch is small).
void poison_rows(std::vector<float>& x, int64_t batch, int64_t width) {
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()};
  for (int i = 0; i < 3; ++i) x[(i * 5 % batch) * width + (i * 3 % width)] = specials[i];
}

void check_stack(const Config& c, std::mt19937& rng, bool poison) {
  const int64_t n = c.width, B = c.batch, L = c.depth;
  std::vector<float> x = normal_values(rng, B * n, 1.0f),
                     weight = normal_values(rng, L * n * n, 1 / std::sqrt(float(n)));
  const std::vector<float> bias = normal_values(rng, L * n, 0.1f), grad_out = normal_values(rng, B * n, 1.0f);
  if (poison) poison_rows(x, B, n);
  const float scale = 0.7f / std::sqrt(float(L));
  const Results one = run_kernel(c, x, weight, bias, scale, grad_out, 1);
  const std::string name = c.name() + (poison ? " (inf/NaN input)" : "");
  expect_close(name, kStackLabels, one, reference(c, x, weight, bias, scale, grad_out));
  expect_same_bits(name, kStackLabels, one, [&](const Variant& v) {
    return run_kernel(c, x, weight, bias, scale, grad_out, v.threads, v.checkpoint_every);
  });
}

// ---------------------------------------------------------------------------------------------
// the MLP stack: float64 reference and the kernel
// ---------------------------------------------------------------------------------------------

struct MlpConfig {
  int64_t width, hidden_width, batch, depth;
  Activation activation;
  bool mean_subtract, bias;
  std::string name() const {
    return std::string("mlp-") + name_of(activation) + (mean_subtract ? "-ms" : "") + (bias ? "-bias" : "") +
           " n=" + std::to_string(width) + " m=" + std::to_string(hidden_width) + " B=" + std::to_string(batch) +
           " L=" + std::to_string(depth);
  }
};

struct MlpParams {
  std::vector<float> weight1, weight2, bias1, bias2;  // (L, m, n), (L, n, m), (L, m), (L, n)
};

// Row-major x (B, n); x <- x + s MS(phi(x W1^T + b1) W2^T + b2) per layer; out and the gradients for grad_out.
Results mlp_reference(const MlpConfig& c, const std::vector<float>& x0, const MlpParams& w, double scale,
                      const std::vector<float>& grad_out) {
  const int64_t n = c.width, m = c.hidden_width, B = c.batch, L = c.depth;
  std::vector<double> x(x0.begin(), x0.end());
  std::vector<std::vector<double>> xs(L), h1s(L, std::vector<double>(B * m));
  std::vector<double> h2(n);
  for (int64_t l = 0; l < L; ++l) {
    xs[l] = x;
    for (int64_t r = 0; r < B; ++r) {
      double* h1 = &h1s[l][r * m];
      for (int64_t j = 0; j < m; ++j) {
        h1[j] = c.bias ? w.bias1[l * m + j] : 0.0;
        for (int64_t k = 0; k < n; ++k) h1[j] += x[r * n + k] * w.weight1[(l * m + j) * n + k];
      }
      double mean = 0;
      for (int64_t o = 0; o < n; ++o) {
        h2[o] = c.bias ? w.bias2[l * n + o] : 0.0;
        for (int64_t j = 0; j < m; ++j) h2[o] += phi(c.activation, h1[j]) * w.weight2[(l * n + o) * m + j];
        mean += c.mean_subtract ? h2[o] / n : 0.0;
      }
      for (int64_t o = 0; o < n; ++o) x[r * n + o] += scale * (h2[o] - mean);
    }
  }
  Results result{std::vector<float>(x.begin(), x.end())};
  std::vector<double> g(grad_out.begin(), grad_out.end()), dh2(n), dh1(m);
  std::vector<double> dw1(L * m * n, 0.0), dw2(L * n * m, 0.0), db1(L * m, 0.0), db2(L * n, 0.0);
  for (int64_t l = L - 1; l >= 0; --l) {
    for (int64_t r = 0; r < B; ++r) {
      const double* h1 = &h1s[l][r * m];
      double mean = 0;
      if (c.mean_subtract) {
        for (int64_t o = 0; o < n; ++o) mean += scale * g[r * n + o];
        mean /= n;
      }
      for (int64_t o = 0; o < n; ++o) dh2[o] = scale * g[r * n + o] - mean;
      for (int64_t j = 0; j < m; ++j) {
        double da = 0;
        for (int64_t o = 0; o < n; ++o) da += dh2[o] * w.weight2[(l * n + o) * m + j];
        dh1[j] = phi_backward(c.activation, h1[j], da);
      }
      for (int64_t o = 0; o < n; ++o) {
        db2[l * n + o] += dh2[o];
        for (int64_t j = 0; j < m; ++j) dw2[(l * n + o) * m + j] += dh2[o] * phi(c.activation, h1[j]);
      }
      for (int64_t j = 0; j < m; ++j) {
        db1[l * m + j] += dh1[j];
        for (int64_t k = 0; k < n; ++k) dw1[(l * m + j) * n + k] += dh1[j] * xs[l][r * n + k];
      }
      for (int64_t k = 0; k < n; ++k) {
        for (int64_t j = 0; j < m; ++j) g[r * n + k] += dh1[j] * w.weight1[(l * m + j) * n + k];
      }
    }
  }
  result.emplace_back(g.begin(), g.end());
  result.emplace_back(dw1.begin(), dw1.end());
  result.emplace_back(dw2.begin(), dw2.end());
  result.emplace_back(c.bias ? db1.begin() : db1.end(), db1.end());
  result.emplace_back(c.bias ? db2.begin() : db2.end(), db2.end());
  return result;
}

// The MLP kernel's output and gradients, NaN-poisoned before it runs; with checkpoint_every = k > 0 the
// forward keeps x_0, x_k, ... only and the backward recomputes each segment.
Results run_mlp_kernel(const MlpConfig& c, const std::vector<float>& x, const MlpParams& w, float scale,
                       const std::vector<float>& grad_out, int threads, int64_t checkpoint_every = 0) {
  const int64_t n = c.width, m = c.hidden_width, B = c.batch, L = c.depth;
  const auto kernels = dmup::make_mlp_stack_kernels<Simd>(c.activation);
  const int64_t row_bytes = dmup::mlp_stack_tile_features(n, m) * sizeof(float);
  const dmup::MlpStackProblem<float> problem{B,
                                             n,
                                             m,
                                             L,
                                             w.weight1.data(),
                                             w.weight2.data(),
                                             c.bias ? w.bias1.data() : nullptr,
                                             c.bias ? w.bias2.data() : nullptr,
                                             scale,
                                             c.activation,
                                             c.mean_subtract,
                                             dmup::stack_tile_rows(B, row_bytes, threads)};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int planes = dmup::mask_planes(c.activation, Block::Post);
  const int64_t kept = checkpoint_every ? dmup::checkpoint_count(L, checkpoint_every) : L;
  const int64_t span = checkpoint_every ? std::min(checkpoint_every, L) : L;  // layers of scratch
  std::vector<float> saved(kept * n * B, nan), states(span * n * B, nan), grad_carry(n * B, nan);
  std::vector<uint16_t> mask(span * planes * m * dmup::mask_words(B), 0xA5A5);  // bits must not depend on it
  Results result{std::vector<float>(B * n, nan),
                 std::vector<float>(B * n, nan),
                 std::vector<float>(L * m * n, nan),
                 std::vector<float>(L * n * m, nan),
                 std::vector<float>(c.bias ? L * m : 0, nan),
                 std::vector<float>(c.bias ? L * n : 0, nan)};
  kernels.forward(problem,
                  {x.data(), nullptr, result[0].data(), saved.data(), std::max<int64_t>(checkpoint_every, 1),
                   checkpoint_every ? nullptr : mask.data(), /*saved_bypasses_caches=*/true},
                  threads);
  const dmup::MlpStackBackwardBuffers<float> buffers{grad_out.data(),
                                                     saved.data(),
                                                     mask.data(),
                                                     result[1].data(),
                                                     grad_carry.data(),
                                                     result[2].data(),
                                                     result[3].data(),
                                                     c.bias ? result[4].data() : nullptr,
                                                     c.bias ? result[5].data() : nullptr};
  if (checkpoint_every) {
    dmup::checkpointed_backward(kernels, problem, saved.data(), checkpoint_every, buffers, {states.data(), mask.data()},
                                threads);
    return result;
  }
  kernels.backward(problem, buffers, threads);
  return result;
}

void check_mlp_stack(const MlpConfig& c, std::mt19937& rng, bool poison) {
  const int64_t n = c.width, m = c.hidden_width, B = c.batch, L = c.depth;
  std::vector<float> x = normal_values(rng, B * n, 1.0f);
  const MlpParams w{normal_values(rng, L * m * n, 1 / std::sqrt(float(n))),
                    normal_values(rng, L * n * m, 1 / std::sqrt(float(m))), normal_values(rng, L * m, 0.1f),
                    normal_values(rng, L * n, 0.1f)};
  const std::vector<float> grad_out = normal_values(rng, B * n, 1.0f);
  if (poison) poison_rows(x, B, n);
  const float scale = 0.7f / std::sqrt(float(L));
  const Results one = run_mlp_kernel(c, x, w, scale, grad_out, 1);
  const std::string name = c.name() + (poison ? " (inf/NaN input)" : "");
  expect_close(name, kMlpLabels, one, mlp_reference(c, x, w, scale, grad_out));
  expect_same_bits(name, kMlpLabels, one, [&](const Variant& v) {
    return run_mlp_kernel(c, x, w, scale, grad_out, v.threads, v.checkpoint_every);
  });
}

}  // namespace

int main() {
  std::printf("stack kernel check, ISA %s (%d lanes)\n", DMUP_STRINGIFY(DMUP_CHECK_ISA), Simd::W);
  check_exp_tanh();
  // (n, B, L): odd widths and row counts, one row, one layer, rows fewer than threads x 16 (the
  // threads then share a tile by features), and rows that are not a multiple of the lanes.
  const int64_t shapes[][3] = {{7, 5, 3}, {20, 37, 2}, {1, 1, 1}, {33, 17, 4}, {48, 64, 3}, {96, 3, 2}, {13, 100, 2}};
  const Activation activations[] = {Activation::Identity, Activation::Relu, Activation::Abs, Activation::Gelu,
                                    Activation::Silu};
  std::mt19937 rng(1234);
  int index = 0;
  for (Activation a : activations) {
    for (Block block : {Block::Post, Block::Pre}) {
      for (bool ms : {false, true}) {
        for (bool bias : {false, true}) {
          for (int s = 0; s < 2; ++s, ++index) {  // two shapes per setting, cycling through the list
            const auto& shape = shapes[index % (sizeof shapes / sizeof shapes[0])];
            check_stack({shape[0], shape[1], shape[2], a, block, ms, bias}, rng, false);
          }
          check_stack({20, 37, 2, a, block, ms, bias}, rng, true);
        }
      }
    }
  }
  // (n, m, B, L): hidden layers narrower and wider than the stream, of 1 and of odd widths.
  const int64_t mlp_shapes[][4] = {{7, 5, 5, 3},    {20, 33, 37, 2}, {1, 1, 1, 1},   {33, 8, 17, 4},
                                   {48, 70, 64, 3}, {16, 96, 3, 2},  {13, 1, 100, 2}};
  for (Activation a : activations) {
    for (bool ms : {false, true}) {
      for (bool bias : {false, true}) {
        for (int s = 0; s < 2; ++s, ++index) {
          const auto& shape = mlp_shapes[index % (sizeof mlp_shapes / sizeof mlp_shapes[0])];
          check_mlp_stack({shape[0], shape[1], shape[2], shape[3], a, ms, bias}, rng, false);
        }
        check_mlp_stack({20, 33, 37, 2, a, ms, bias}, rng, true);
      }
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
