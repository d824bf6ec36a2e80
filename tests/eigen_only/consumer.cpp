// SPDX-License-Identifier: Apache-2.0
// A host without libtorch: includes only <prefopt/eigen.h>, computes a DPO loss and its
// gradient, and gathers log-probs from a logits matrix with their gradient. Built by
// tests/eigen_only/run.cmake with Eigen's and prefopt's include directories alone; that script
// fails the test if anything from libtorch (or fmt) is among the headers it reads.
#include <prefopt/eigen.h>

#include <cmath>
#include <cstdio>

int main() {
  namespace pe = prefopt::eigen;
  // Two pairs of summed log-probs.
  Eigen::VectorXd pc(2), pr(2), rc(2), rr(2);
  pc << -12.5, -30.2;
  pr << -14.0, -28.5;
  rc << -13.0, -29.0;
  rr << -13.5, -29.5;
  const auto r = pe::dpo_loss<double>(pc, pr, rc, rr, pe::DPOLossOptions().beta(0.1));
  // loss = mean(−log σ(β·Δ)), dL/dπ_c = −β·σ(−β·Δ)/B.
  const Eigen::VectorXd delta = (pc - pr) - (rc - rr);
  double loss = 0;
  for (int b = 0; b < 2; ++b) loss += std::log1p(std::exp(-0.1 * delta(b))) / 2;
  const double grad0 = -0.1 / (1 + std::exp(0.1 * delta(0))) / 2;
  std::printf("dpo loss %.12f (expected %.12f), grad_policy_chosen[0] %.12f (expected %.12f)\n",
              r.loss(0), loss, r.grad_policy_chosen(0), grad0);
  if (std::abs(r.loss(0) - loss) > 1e-12 || std::abs(r.grad_policy_chosen(0) - grad0) > 1e-12 ||
      std::abs(r.grad_policy_rejected(0) + grad0) > 1e-12)
    return 1;

  // Gathering: 2 sequences of 3 positions over a vocabulary of 4, and dL/dlogits for L = Σ sums.
  pe::RowMatrix<float> logits(6, 4);
  logits << 0.1f, 0.2f, 0.3f, 0.4f, 1, 0, 0, 0, 0, 1, 0, 0, 0.5f, 0.5f, 0, 0, 2, 1, 0, -1, 0, 0, 0,
      0;
  pe::IndexVector labels(6), cu(3);
  labels << -100, 1, 3, -100, 0, 2;
  cu << 0, 3, 6;
  const auto lp = pe::gather_packed_logprobs(logits, labels, cu);
  const auto dlogits = pe::gather_packed_logprobs_backward<float>(
      logits, labels, cu, Eigen::VectorXf::Ones(2), Eigen::VectorXf());
  std::printf("sums %.6f %.6f, counts %ld %ld, dlogits row sums %.2e\n", lp.sum(0), lp.sum(1),
              static_cast<long>(lp.count(0)), static_cast<long>(lp.count(1)),
              dlogits.rowwise().sum().cwiseAbs().maxCoeff());
  if (lp.count(0) != 2 || lp.count(1) != 2 || dlogits.rowwise().sum().cwiseAbs().maxCoeff() > 1e-6)
    return 1;
  std::printf("torch-free consumer OK (prefopt %s)\n", PREFOPT_VERSION_STRING);
  return 0;
}
