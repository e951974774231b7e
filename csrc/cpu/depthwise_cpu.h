// Depthwise layers (one input and one output channel per group) on the CPU, computed plane by plane
// without the convolution primitive: see depthwise_cpu.cpp.
#pragma once

#include "../odconv.h"

#include <ATen/core/Tensor.h>

#include <tuple>

namespace odconv {

// Whether g is a depthwise layer these kernels take: groups == Cin == Cout.
inline bool is_depthwise(const Geometry& g) {
  return g.groups > 1 && g.in_per_group == 1 && g.out_per_group == 1;
}

// out (B, C, Ho, Wo) of a depthwise layer; float32 or float64 inputs (checked by the caller).
at::Tensor depthwise_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
                                 const at::Tensor& filter_att, const at::Tensor& spatial_att,
                                 const at::Tensor& kernel_att, const Geometry& g);

// (grad_x, grad_weight, grad_channel_att, grad_filter_att, grad_spatial_att, grad_kernel_att) of a depthwise
// layer; the group not wanted (want_x: grad_x; want_params: the other five) comes back as zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
    const at::Tensor& filter_att, const at::Tensor& spatial_att, const at::Tensor& kernel_att, const Geometry& g,
    bool want_x, bool want_params);

}  // namespace odconv
