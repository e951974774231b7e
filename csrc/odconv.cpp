// The odconv operator library: the two schemas (forward and backward) and the argument checks that
// every backend shares. Backends register their kernels in csrc/cpu/ and csrc/cuda/; the fake
// (shape-only) kernels and the autograd formula are registered from Python (odconv/ops.py).
#include "odconv.h"

#include <Python.h>
#include <torch/library.h>

#include <sstream>

extern "C" {
// Importing odconv._C loads this library, which runs the TORCH_LIBRARY registrations below. The
// module itself has no Python functions: everything is reached through torch.ops.odconv.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace odconv {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_CHECK(
      v.size() == 2, op, ": ", name, " must have 2 elements (height, width), got ", v.size(),
      " elements ", v);
  TORCH_CHECK(
      v[0] >= min_value && v[1] >= min_value, op, ": ", name, " must be >= ", min_value,
      " in both dimensions, got ", v);
}

void check_attention(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& x,
    std::vector<int64_t> expected,
    const char* expected_names) {
  TORCH_CHECK(
      t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ", expected_names,
      " = ", shape_str(expected), ", got ", shape_str(t.sizes()));
  TORCH_CHECK(
      t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (",
      x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(),
      "), got ", t.device());
}

} // namespace

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
    int64_t groups) {
  TORCH_CHECK(
      x.dim() == 4, op, ": x must be a 4-D tensor (B, Cin, H, W), got ", x.dim(),
      "-D with shape ", shape_str(x.sizes()));
  TORCH_CHECK(
      weight.dim() == 5, op, ": weight must be a 5-D tensor (K, Cout, Cin/groups, kh, kw), got ",
      weight.dim(), "-D with shape ", shape_str(weight.sizes()));
  TORCH_CHECK(
      at::isFloatingType(x.scalar_type()), op, ": x must have a floating-point dtype, got ",
      x.scalar_type());
  TORCH_CHECK(
      weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (",
      x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(
      weight.device() == x.device(), op, ": weight must be on the device of x (", x.device(),
      "), got ", weight.device());
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);

  Geometry g;
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.kernel_num = weight.size(0);
  g.out_channels = weight.size(1);
  g.kernel_h = weight.size(3);
  g.kernel_w = weight.size(4);
  g.groups = groups;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];

  TORCH_CHECK(
      g.kernel_num >= 1 && g.out_channels >= 1 && g.kernel_h >= 1 && g.kernel_w >= 1, op,
      ": weight must have K, Cout, kh, kw >= 1, got shape ", shape_str(weight.sizes()));
  TORCH_CHECK(
      g.in_channels % groups == 0, op, ": groups (", groups,
      ") must divide the input channels of x, got Cin = ", g.in_channels);
  TORCH_CHECK(
      g.out_channels % groups == 0, op, ": groups (", groups,
      ") must divide the output channels of weight, got Cout = ", g.out_channels);
  g.in_per_group = g.in_channels / groups;
  g.out_per_group = g.out_channels / groups;
  TORCH_CHECK(
      weight.size(2) == g.in_per_group, op, ": weight.size(2) must be Cin/groups = ",
      g.in_channels, "/", groups, " = ", g.in_per_group, ", got ", weight.size(2),
      " (weight shape ", shape_str(weight.sizes()), ")");

  check_attention(op, "channel_att", channel_att, x, {g.batch, g.in_channels}, "(B, Cin)");
  check_attention(op, "filter_att", filter_att, x, {g.batch, g.out_channels}, "(B, Cout)");
  check_attention(
      op, "spatial_att", spatial_att, x, {g.batch, g.kernel_h, g.kernel_w}, "(B, kh, kw)");
  check_attention(op, "kernel_att", kernel_att, x, {g.batch, g.kernel_num}, "(B, K)");

  const int64_t span_h = g.dil_h * (g.kernel_h - 1) + 1;
  const int64_t span_w = g.dil_w * (g.kernel_w - 1) + 1;
  const int64_t padded_h = g.height + 2 * g.pad_h;
  const int64_t padded_w = g.width + 2 * g.pad_w;
  TORCH_CHECK(
      padded_h >= span_h && padded_w >= span_w, op, ": the padded input (", padded_h, " x ",
      padded_w, ") must be at least as large as the dilated kernel (", span_h, " x ", span_w,
      "); x has H x W = ", g.height, " x ", g.width);
  g.out_h = (padded_h - span_h) / g.stride_h + 1;
  g.out_w = (padded_w - span_w) / g.stride_w + 1;
  return g;
}

void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const Geometry& g) {
  const std::vector<int64_t> expected = {g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(
      grad_out.sizes() == at::IntArrayRef(expected), op,
      ": grad_out must have the output's shape (B, Cout, Ho, Wo) = ", shape_str(expected), ", got ",
      shape_str(grad_out.sizes()));
  TORCH_CHECK(
      grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have the dtype of x (",
      x.scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK(
      grad_out.device() == x.device(), op, ": grad_out must be on the device of x (", x.device(),
      "), got ", grad_out.device());
}

} // namespace odconv

TORCH_LIBRARY(odconv, m) {
  // out[b] = conv2d(x[b], W_b) with W_b as in odconv.h.
  m.def(
      "odconv2d(Tensor x, Tensor weight, Tensor channel_att, Tensor filter_att, "
      "Tensor spatial_att, Tensor kernel_att, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> Tensor");
  // Gradients of odconv2d for (x, weight, channel_att, filter_att, spatial_att, kernel_att).
  // output_mask = [x, parameters]: a gradient that is not asked for is returned as zeros.
  m.def(
      "odconv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor channel_att, "
      "Tensor filter_att, Tensor spatial_att, Tensor kernel_att, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool[2] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
