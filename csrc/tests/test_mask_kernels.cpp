// C++ tests of the CPU mask kernels against a naive double-precision reference that
// materialises the full-resolution logits (written independently of common/mask_math.h).
// Run by ctest; exits non-zero and names the failing check on the first failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/mask_math.h"
#include "cpu/mask_kernels.h"
#include "tests/cuda_block_driver.h"
#include "tests/mask_reference.h"

namespace {

using hsft::test::ref_dice_bce;
using hsft::test::ref_upsample;
using hsft::test::RefLoss;
using hsft::cpu::MaskGeometry;
using hsft::cpu::PlaneType;
using hsft::cpu::TargetPlanes;

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

void expect_close(double got, double want, double rtol, double atol, const std::string& what) {
  const bool ok = std::isfinite(got) && std::fabs(got - want) <= atol + rtol * std::fabs(want);
  if (!ok) std::fprintf(stderr, "  got %.17g want %.17g\n", got, want);
  expect(ok, what);
}

// ---- runners ----------------------------------------------------------------------------------

// Runs tasks in reversed chunks of a given size, to show results do not depend on the split.
hsft::cpu::TaskRunner reversed_chunks(int64_t chunk) {
  return [chunk](int64_t num_tasks, int64_t, const hsft::cpu::TaskBody& body) {
    for (int64_t end = num_tasks; end > 0; end -= chunk) body(std::max<int64_t>(0, end - chunk), end);
  };
}

// ---- cases ------------------------------------------------------------------------------------

enum class TargetKind { kRandomBinary, kEmpty, kFull, kSoft };

struct Case {
  std::string name;
  MaskGeometry g;
  double logit_scale;
  TargetKind target;
};

std::vector<double> make_target(const MaskGeometry& g, TargetKind kind, std::mt19937& rng) {
  std::vector<double> t(g.num_masks * g.out_h * g.out_w);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (double& v : t) {
    switch (kind) {
      case TargetKind::kRandomBinary: v = u(rng) < 0.3 ? 1.0 : 0.0; break;
      case TargetKind::kEmpty: v = 0.0; break;
      case TargetKind::kFull: v = 1.0; break;
      case TargetKind::kSoft: v = u(rng); break;
    }
  }
  return t;
}

template <typename T>
void check_case(const Case& c, const std::vector<double>& logits64, const std::vector<double>& target64,
                const std::vector<uint8_t>& loss_fov, const RefLoss& ref, double rtol, double atol,
                const char* type_name) {
  const MaskGeometry& g = c.g;
  const std::string tag = c.name + (loss_fov.empty() ? "" : " with a field of view") + " [" + type_name + "]";
  const uint8_t* fov_ptr = loss_fov.empty() ? nullptr : loss_fov.data();
  const std::vector<T> logits(logits64.begin(), logits64.end());
  std::vector<uint8_t> target_bytes(target64.size());
  std::transform(target64.begin(), target64.end(), target_bytes.begin(), [](double v) { return v > 0.5 ? 1 : 0; });
  std::vector<T> target_typed(target64.begin(), target64.end());
  const bool binary = c.target != TargetKind::kSoft;
  const PlaneType float_type = sizeof(T) == 4 ? PlaneType::kFloat32 : PlaneType::kFloat64;
  const TargetPlanes planes = binary ? TargetPlanes{target_bytes.data(), PlaneType::kByte}
                                     : TargetPlanes{target_typed.data(), float_type};
  const double dw = 1.0, bw = 0.5, eps = 1e-8;

  const hsft::cpu::ValueType value_type = sizeof(T) == 4 ? hsft::cpu::ValueType::kFloat32
                                                          : hsft::cpu::ValueType::kFloat64;
  const hsft::cpu::ValuePlanes values_in{logits.data(), value_type};
  std::vector<double> sums(g.num_masks * hsft::kNumSums);
  std::vector<T> loss(g.num_masks);
  std::vector<T> adjoint(g.num_masks * hsft::kNumAdjoint * g.in_h * g.in_w);
  hsft::cpu::dice_bce_forward<T>(values_in, planes, fov_ptr, g, dw, bw, eps, sums.data(), loss.data(),
                                 adjoint.data(), hsft::cpu::run_serial);
  for (int64_t n = 0; n < g.num_masks; ++n)
    expect_close(loss[n], ref.loss[n], rtol, atol, tag + " loss of mask " + std::to_string(n));

  // Distinct incoming gradients per mask, read with a stride (autograd may hand an expanded tensor).
  std::vector<T> grad_loss(2 * g.num_masks);
  for (int64_t n = 0; n < g.num_masks; ++n) grad_loss[2 * n] = static_cast<T>(0.5 + 0.25 * static_cast<double>(n));
  std::vector<T> grad(logits.size());
  hsft::cpu::dice_bce_backward<T>(adjoint.data(), sums.data(), grad_loss.data(), 2, g, dw, bw, eps, grad.data(),
                                  value_type, hsft::cpu::run_serial);
  double grad_scale = 0;
  for (double v : ref.grad) grad_scale = std::max(grad_scale, std::fabs(v));
  bool grad_ok = true;
  const int64_t plane = g.in_h * g.in_w;
  for (size_t i = 0; i < grad.size(); ++i) {
    const double weight = static_cast<double>(grad_loss[2 * (i / plane)]);
    const double got = grad[i], want = weight * ref.grad[i];
    if (!std::isfinite(got) || std::fabs(got - want) > atol * grad_scale + rtol * std::fabs(want)) {
      if (grad_ok) std::fprintf(stderr, "  grad[%zu]: got %.17g want %.17g\n", i, got, want);
      grad_ok = false;
    }
  }
  expect(grad_ok, tag + " gradient");

  // Same bits whatever the task split and order; the forward without adjoint planes gives the same sums.
  std::vector<double> sums2(sums.size()), sums3(sums.size());
  std::vector<T> loss2(loss.size()), loss3(loss.size()), adjoint2(adjoint.size());
  std::vector<T> grad2(grad.size());
  const auto runner = reversed_chunks(3);
  hsft::cpu::dice_bce_forward<T>(values_in, planes, fov_ptr, g, dw, bw, eps, sums2.data(), loss2.data(),
                                 adjoint2.data(), runner);
  hsft::cpu::dice_bce_backward<T>(adjoint2.data(), sums2.data(), grad_loss.data(), 2, g, dw, bw, eps, grad2.data(),
                                  value_type, runner);
  expect(sums == sums2 && loss == loss2 && adjoint == adjoint2 && grad == grad2,
         tag + " deterministic under another task split");
  hsft::cpu::dice_bce_forward<T>(values_in, planes, fov_ptr, g, dw, bw, eps, sums3.data(), loss3.data(), nullptr,
                                 runner);
  expect(sums == sums3 && loss == loss3, tag + " forward without adjoint planes: same sums and losses");
  // The CUDA block code run on the host (tests/cuda_block_driver.h), against the same reference.
  std::vector<T> grad_loss_dense(g.num_masks);
  for (int64_t n = 0; n < g.num_masks; ++n) grad_loss_dense[n] = grad_loss[2 * n];
  auto emulate = [&](int threads, bool reverse) {
    auto run = [&](const auto* target_planes) {
      return g.mid_h > 0 ? hsft::test::emulate_cuda_dice_bce<T, std::remove_cv_t<std::remove_pointer_t<decltype(target_planes)>>, 3>(
                               logits, target_planes, fov_ptr, g, dw, bw, eps, grad_loss_dense, threads, reverse)
                         : hsft::test::emulate_cuda_dice_bce<T, std::remove_cv_t<std::remove_pointer_t<decltype(target_planes)>>, 2>(
                               logits, target_planes, fov_ptr, g, dw, bw, eps, grad_loss_dense, threads, reverse);
    };
    return binary ? run(target_bytes.data()) : run(target_typed.data());
  };
  for (const int threads : {hsft::cuda_block::kForwardThreads, 32}) {
    const auto cuda = emulate(threads, false);
    const std::string ctag = tag + " CUDA blocks emulated, " + std::to_string(threads) + " threads";
    for (int64_t n = 0; n < g.num_masks; ++n)
      expect_close(cuda.losses[n], ref.loss[n], rtol, atol, ctag + ": loss of mask " + std::to_string(n));
    bool cuda_grad_ok = true;
    for (size_t i = 0; i < cuda.grad.size(); ++i) {
      const double weight = static_cast<double>(grad_loss[2 * (i / plane)]);
      const double got = cuda.grad[i], want = weight * ref.grad[i];
      if (!std::isfinite(got) || std::fabs(got - want) > atol * grad_scale + rtol * std::fabs(want)) {
        if (cuda_grad_ok) std::fprintf(stderr, "  grad[%zu]: got %.17g want %.17g\n", i, got, want);
        cuda_grad_ok = false;
      }
    }
    expect(cuda_grad_ok, ctag + ": gradient");
    const auto reversed = emulate(threads, true);
    expect(cuda.sums == reversed.sums && cuda.losses == reversed.losses && cuda.adjoint == reversed.adjoint,
           ctag + ": the same bits whatever order the blocks run in");
  }
  if (g.mid_h > 0) return;  // upsample_masks and mask_stats resize in one step

  // Upsampling and stats against the reference's full-resolution logits.
  const std::vector<double> z = ref_upsample(logits64, g);
  std::vector<T> values(z.size());
  std::vector<uint8_t> above(z.size());
  hsft::cpu::upsample_masks(logits.data(), g, T(0), values.data(), above.data(), runner);
  // Rounding error of a convex combination is relative to the inputs, not to the result.
  double logit_scale = 0;
  for (double v : logits64) logit_scale = std::max(logit_scale, std::fabs(v));
  // In float the source coordinates carry a relative error of ~1e-7 too, which moves a weight by
  // up to ~1e-7 * the input size.
  const double up_tol =
      (sizeof(T) == 4 ? 1e-6 + 2e-7 * static_cast<double>(std::max(g.in_h, g.in_w)) : 1e-12) * (1 + logit_scale);
  bool up_ok = true;
  for (size_t i = 0; i < z.size(); ++i) {
    const bool ok = std::fabs(values[i] - z[i]) <= up_tol && above[i] == (values[i] > T(0));
    if (up_ok && !ok) std::fprintf(stderr, "  upsample[%zu]: got %.9g want %.9g\n", i, double(values[i]), z[i]);
    up_ok = up_ok && ok;
  }
  expect(up_ok, tag + " upsample_masks");

  std::vector<uint8_t> fov(z.size());
  for (size_t i = 0; i < fov.size(); ++i) fov[i] = (i % 7) != 0;
  std::vector<int64_t> stats(g.num_masks * hsft::kNumStats);
  hsft::cpu::mask_stats(logits.data(), planes, fov.data(), g, stats.data(), runner);
  const int64_t hw = g.out_h * g.out_w;
  for (int64_t n = 0; n < g.num_masks; ++n) {
    int64_t inter = 0, pred = 0, gt = 0;
    for (int64_t i = n * hw; i < (n + 1) * hw; ++i) {
      if (!fov[i]) continue;
      const bool p = values[i] > T(0), t = target64[i] > 0.5;
      inter += p && t;
      pred += p;
      gt += t;
    }
    const int64_t* s = stats.data() + n * hsft::kNumStats;
    expect(s[0] == inter && s[1] == pred && s[2] == gt && s[3] == pred + gt - inter,
           tag + " mask_stats of mask " + std::to_string(n));
  }
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {"4x upsampling", {2, 8, 8, 32, 32}, 3.0, TargetKind::kRandomBinary},
      {"odd non-integer scale", {3, 5, 7, 23, 17}, 3.0, TargetKind::kRandomBinary},
      {"downsampling", {2, 9, 11, 4, 5}, 3.0, TargetKind::kRandomBinary},
      {"equal size", {2, 6, 5, 6, 5}, 3.0, TargetKind::kRandomBinary},
      {"single pixel input", {1, 1, 1, 7, 9}, 3.0, TargetKind::kRandomBinary},
      {"empty target", {2, 7, 6, 19, 22}, 3.0, TargetKind::kEmpty},
      {"all-positive target", {2, 7, 6, 19, 22}, 3.0, TargetKind::kFull},
      {"soft target", {2, 6, 6, 13, 21}, 3.0, TargetKind::kSoft},
      {"extreme logits", {2, 6, 7, 25, 18}, 80.0, TargetKind::kRandomBinary},
      {"two steps, the release's 4x then to the image", {2, 8, 8, 27, 41, 32, 32}, 3.0, TargetKind::kRandomBinary},
      {"two steps, odd sizes, second step shrinks", {3, 5, 7, 9, 8, 11, 13}, 3.0, TargetKind::kRandomBinary},
      {"two steps, equal first step", {1, 6, 5, 17, 12, 6, 5}, 3.0, TargetKind::kSoft},
      {"two steps, one mask of one pixel", {1, 1, 1, 7, 9, 4, 4}, 3.0, TargetKind::kRandomBinary},
      {"several bands of logit rows", {2, 37, 9, 80, 23}, 3.0, TargetKind::kRandomBinary},
      {"several bands, two steps", {1, 35, 6, 51, 13, 70, 12}, 3.0, TargetKind::kRandomBinary},
  };
  std::mt19937 rng(1234);
  for (const Case& c : cases) {
    std::normal_distribution<double> normal(0.0, c.logit_scale);
    std::vector<double> logits(c.g.num_masks * c.g.in_h * c.g.in_w);
    for (double& v : logits) v = normal(rng);
    // Round to float so the float and double kernels see the same inputs.
    for (double& v : logits) v = static_cast<double>(static_cast<float>(v));
    const std::vector<double> target = make_target(c.g, c.target, rng);
    // Without a field of view, then with one: a disc per mask (a fundus image's), except that the
    // last mask's is empty (no pixel counts: loss 0, gradient 0).
    const int64_t hw = c.g.out_h * c.g.out_w;
    std::vector<uint8_t> disc(c.g.num_masks * hw, 0);
    for (int64_t n = 0; n + 1 < c.g.num_masks; ++n)
      for (int64_t y = 0; y < c.g.out_h; ++y)
        for (int64_t x = 0; x < c.g.out_w; ++x) {
          const double dy = (y + 0.5) / c.g.out_h - 0.5, dx = (x + 0.5) / c.g.out_w - 0.5;
          disc[n * hw + y * c.g.out_w + x] = dy * dy + dx * dx < 0.16 ? 1 : 0;
        }
    for (const std::vector<uint8_t>& fov : {std::vector<uint8_t>{}, disc}) {
      const RefLoss ref = ref_dice_bce(logits, target, fov, c.g, 1.0, 0.5, 1e-8);
      check_case<double>(c, logits, target, fov, ref, 1e-12, 1e-12, "float64");
      check_case<float>(c, logits, target, fov, ref, 2e-5, 2e-5, "float32");
      if (!fov.empty()) {
        const int64_t last = c.g.num_masks - 1;
        bool zero = std::fabs(ref.loss[last]) < 1e-7;
        for (int64_t i = 0; i < c.g.in_h * c.g.in_w; ++i) zero = zero && ref.grad[last * c.g.in_h * c.g.in_w + i] == 0;
        expect(zero, c.name + ": an empty field of view gives loss 0 and no gradient");
      }
    }
  }
  // Bad sizes are refused with a message.
  bool threw = false;
  try {
    hsft::cpu::check_geometry({1, 0, 4, 8, 8});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  expect(threw, "empty logits plane is refused");
  threw = false;
  try {
    hsft::cpu::check_geometry({1, 8, 8, 16, 16, 4, 4});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  expect(threw, "a two-step intermediate grid smaller than the logits is refused");
  if (g_failures == 0) std::printf("all mask kernel checks passed (%zu cases)\n", cases.size());
  return g_failures == 0 ? 0 : 1;
}
