// SPDX-License-Identifier: Apache-2.0
// The host model of the Eigen example: a one-hidden-layer MLP over one-hot features, written
// with Eigen and trained by hand-written backprop and Adam. Nothing here knows about prefopt:
// the model maps feature rows to logits [N, V] and, given dL/dlogits, accumulates dL/dparams.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace mlp {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;

/// N rows of one-hot features, each row the indices of its active inputs (at most K; -1 pads).
/// A one-hot input times W1 is a sum of W1's rows, so the first layer never forms the
/// [N, inputs] matrix.
struct Features {
  int K = 0;
  std::vector<int> idx;  // [N * K]
  int rows() const { return K == 0 ? 0 : static_cast<int>(idx.size()) / K; }
};

/// The parameters (or their gradients, or Adam's moments): logits = relu(x·W1 + b1)·W2 + b2.
struct Params {
  Mat W1, W2;     // [inputs, hidden], [hidden, vocab]
  RowVec b1, b2;  // [hidden], [vocab]
  Params zeros_like() const {
    return {Mat::Zero(W1.rows(), W1.cols()), Mat::Zero(W2.rows(), W2.cols()),
            RowVec::Zero(b1.size()), RowVec::Zero(b2.size())};
  }
  void set_zero() { W1.setZero(), W2.setZero(), b1.setZero(), b2.setZero(); }
};

class MLP {
 public:
  MLP(int inputs, int hidden, int vocab, uint64_t seed) {
    std::mt19937_64 rng(seed);
    const auto init = [&](Eigen::Index r, Eigen::Index c, double scale) {
      std::normal_distribution<float> n(0.f, static_cast<float>(scale));
      Mat m(r, c);
      for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
      return m;
    };
    // He initialisation; each row has ~10 active inputs, so W1's rows start at scale 1/sqrt(10).
    p_.W1 = init(inputs, hidden, std::sqrt(2.0 / 10.0));
    p_.W2 = init(hidden, vocab, std::sqrt(1.0 / hidden));
    p_.b1 = RowVec::Zero(hidden);
    p_.b2 = RowVec::Zero(vocab);
  }

  /// logits [N, V]; `hidden` (if given) receives relu(x·W1 + b1) [N, H] for `backward`.
  Mat forward(const Features& x, Mat* hidden = nullptr) const {
    Mat h(x.rows(), p_.W1.cols());
    for (int n = 0; n < x.rows(); ++n) {
      auto row = h.row(n);
      row = p_.b1;
      for (int k = 0; k < x.K; ++k) {
        const int i = x.idx[static_cast<size_t>(n * x.K + k)];
        if (i >= 0) row += p_.W1.row(i);
      }
    }
    h = h.cwiseMax(0.f);
    Mat logits = h * p_.W2;
    logits.rowwise() += p_.b2;
    if (hidden) *hidden = std::move(h);
    return logits;
  }

  /// Adds dL/dparams to `grad`, given dL/dlogits and the forward pass's hidden activations.
  void backward(const Features& x, const Mat& hidden, const Mat& dlogits, Params& grad) const {
    grad.W2.noalias() += hidden.transpose() * dlogits;
    grad.b2 += dlogits.colwise().sum();
    Mat dh = dlogits * p_.W2.transpose();
    dh = (hidden.array() > 0.f).select(dh, 0.f);  // relu'
    grad.b1 += dh.colwise().sum();
    for (int n = 0; n < x.rows(); ++n) {
      for (int k = 0; k < x.K; ++k) {
        const int i = x.idx[static_cast<size_t>(n * x.K + k)];
        if (i >= 0) grad.W1.row(i) += dh.row(n);
      }
    }
  }

  Params& params() { return p_; }
  const Params& params() const { return p_; }
  int64_t size() const { return p_.W1.size() + p_.W2.size() + p_.b1.size() + p_.b2.size(); }

 private:
  Params p_;
};

/// Adam (Kingma & Ba) with global-norm gradient clipping.
class Adam {
 public:
  Adam(const Params& like, double lr, double clip = 1.0)
      : m_(like.zeros_like()), v_(like.zeros_like()), lr_(lr), clip_(clip) {}
  /// One update of `p` from `g`; returns the gradient's norm before clipping.
  double step(Params& p, const Params& g) {
    const double norm = std::sqrt(static_cast<double>(g.W1.squaredNorm() + g.W2.squaredNorm() +
                                                      g.b1.squaredNorm() + g.b2.squaredNorm()));
    const float scale = clip_ > 0 && norm > clip_ ? static_cast<float>(clip_ / norm) : 1.f;
    ++t_;
    const float c1 = static_cast<float>(1.0 - std::pow(0.9, t_));
    const float c2 = static_cast<float>(1.0 - std::pow(0.999, t_));
    const float lr = static_cast<float>(lr_);
    const auto update = [&](auto& w, const auto& gw, auto& m, auto& v) {
      m = 0.9f * m + 0.1f * scale * gw;
      v = 0.999f * v + 0.001f * (scale * gw).cwiseAbs2();
      w.array() -= lr * (m.array() / c1) / ((v.array() / c2).sqrt() + 1e-8f);
    };
    update(p.W1, g.W1, m_.W1, v_.W1);
    update(p.W2, g.W2, m_.W2, v_.W2);
    update(p.b1, g.b1, m_.b1, v_.b1);
    update(p.b2, g.b2, m_.b2, v_.b2);
    return norm;
  }
  void set_lr(double lr) { lr_ = lr; }

 private:
  Params m_, v_;
  double lr_, clip_;
  int t_ = 0;
};

}  // namespace mlp
