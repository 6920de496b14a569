// Host driver of the CUDA Dice+BCE block code (cuda/dice_bce_block.h): runs the functions the CUDA
// kernels run, block by block and, within a block, phase by phase over the threads in order (the
// executor below stands in for __syncthreads and for the integer ticket). Lets the C++ tests check
// the CUDA index, reduction and gradient code against the float64 reference without a GPU.
#pragma once

#include <cstdint>
#include <vector>

#include "common/mask_math.h"
#include "cuda/dice_bce_block.h"

namespace hsft::test {

template <typename T>
class HostExec {
 public:
  HostExec(int threads, std::vector<unsigned int>& tickets)
      : threads_(threads), states_(static_cast<size_t>(threads)), tickets_(tickets) {}
  int threads() const { return threads_; }
  template <typename F>
  void all(F&& phase) {
    for (int tid = 0; tid < threads_; ++tid) phase(tid, states_[static_cast<size_t>(tid)]);
  }
  bool last_of_mask(int64_t n, int64_t bands) {
    return ++tickets_[static_cast<size_t>(n)] == static_cast<unsigned int>(bands);
  }

 private:
  int threads_;
  std::vector<cuda_block::ThreadState<T>> states_;
  std::vector<unsigned int>& tickets_;
};

// Outputs of the emulated forward (and backward).
template <typename T>
struct EmulatedLoss {
  std::vector<double> sums;
  std::vector<T> losses;
  std::vector<T> adjoint;
  std::vector<T> grad;
};

// Runs the forward blocks of every mask (bands in order, or in reverse to show that the order does
// not matter) with `threads` threads per block, then the elementwise backward.
template <typename T, typename G, int kRows>
EmulatedLoss<T> emulate_cuda_dice_bce(const std::vector<T>& logits, const G* target, const uint8_t* fov,
                                      const cpu::MaskGeometry& g, double dice_weight, double bce_weight, double eps,
                                      const std::vector<T>& grad_loss, int threads, bool reverse_blocks) {
  const int64_t bands = cuda_block::bands_of(g.in_h);
  const int64_t plane = g.in_h * g.in_w;
  EmulatedLoss<T> out{std::vector<double>(g.num_masks * kNumSums), std::vector<T>(g.num_masks),
                      std::vector<T>(g.num_masks * kNumAdjoint * plane), std::vector<T>(g.num_masks * plane)};
  std::vector<double> partial(g.num_masks * bands * kNumSums);
  std::vector<T> carry(g.num_masks * bands * (kMaxAdjointRows - 1) * kNumAdjoint * g.in_w);
  std::vector<unsigned int> tickets(g.num_masks, 0u);
  cuda_block::ForwardArgs<T, T, G> args{logits.data(), target, fov, g.num_masks, g.in_h, g.in_w, g.out_h, g.out_w,
                                        g.mid_h, g.mid_w, dice_weight, bce_weight, eps, out.sums.data(),
                                        out.losses.data(), out.adjoint.data(), partial.data(), carry.data(),
                                        tickets.data(), bands};
  const auto layout = cuda_block::shared_layout<T>(g.in_w, g.out_w, kRows, threads);
  std::vector<T> shared(static_cast<size_t>(layout.total));
  for (int64_t n = 0; n < g.num_masks; ++n)
    for (int64_t i = 0; i < bands; ++i) {
      const int64_t band = reverse_blocks ? bands - 1 - i : i;
      // Shared memory starts with garbage on a GPU: so it does here.
      for (T& v : shared) v = static_cast<T>(-7.5);
      const cuda_block::ForwardBlock<T, T, G, true, kRows> block(args, n, band, shared.data(), threads);
      HostExec<T> exec(threads, tickets);
      cuda_block::run_forward_block(exec, block);
    }
  for (int64_t n = 0; n < g.num_masks; ++n) {
    const DiceBceGradCoefficients<T> k = dice_bce_grad_coefficients<T>(
        out.sums.data() + n * kNumSums, static_cast<double>(grad_loss[n]), dice_weight, bce_weight, eps);
    for (int64_t i = 0; i < plane; ++i) out.grad[n * plane + i] = cuda_block::grad_at(out.adjoint.data(), n, i, plane, k);
  }
  return out;
}

}  // namespace hsft::test
