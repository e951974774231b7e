// Shared by every backend of the odconv operators: the convolution geometry and the argument
// checks. The schemas themselves live in odconv.cpp; each backend file registers its own kernels.
//
// Notation used throughout csrc/ (one sample b, one group g):
//   x            (B, Cin, H, W)              input
//   weight       (K, Cout, Cin/G, kh, kw)    the K candidate kernels W_k
//   channel_att  (B, Cin)                    alpha_c
//   filter_att   (B, Cout)                   alpha_f
//   spatial_att  (B, kh, kw)                 alpha_s
//   kernel_att   (B, K)                      alpha_w
//   out          (B, Cout, Ho, Wo)
// and the per-sample kernel the operator convolves x_b with:
//   W_b[o,c,u,v] = alpha_f[b,o] * alpha_c[b,c] * alpha_s[b,u,v] * sum_k alpha_w[b,k] * W_k[o,c,u,v]
// Per group the kernel is a (Cout/G) x J matrix with J = (Cin/G)*kh*kw columns indexed by
// j = (c, u, v); the im2col matrix of x_b is J x P with P = Ho*Wo.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace odconv {

struct Geometry {
  int64_t batch = 0, in_channels = 0, height = 0, width = 0;
  int64_t kernel_num = 0, out_channels = 0, groups = 1;
  int64_t in_per_group = 0, out_per_group = 0;
  int64_t kernel_h = 0, kernel_w = 0;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  int64_t out_h = 0, out_w = 0;

  int64_t taps() const { return kernel_h * kernel_w; }
  // Columns of one group's kernel matrix, J = (Cin/G) * kh * kw.
  int64_t cols_per_group() const { return in_per_group * taps(); }
  // Output pixels per sample, P = Ho * Wo.
  int64_t out_pixels() const { return out_h * out_w; }
  // Elements of one sample's kernel, Cout * J (also the size of one W_k).
  int64_t kernel_numel() const { return out_channels * cols_per_group(); }
  // A 1x1 kernel with unit stride and no padding reads x directly: its im2col matrix is x itself.
  bool im2col_is_identity() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 &&
        pad_w == 0;
  }
};

// Validates the arguments of odconv2d / odconv2d_backward and returns the geometry. Every failure
// message names the argument, the value received and the value expected.
Geometry check_inputs(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& channel_att,
    const at::Tensor& filter_att,
    const at::Tensor& spatial_att,
    const at::Tensor& kernel_att,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups);

// Validates grad_out of the backward against the geometry of the forward.
void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const Geometry& g);

} // namespace odconv
