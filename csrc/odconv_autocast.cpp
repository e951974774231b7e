// The Autocast kernels of odconv::odconv2d: inside torch.autocast("cpu") or torch.autocast("cuda")
// the op runs in the autocast dtype (bfloat16 on CPU by default, float16 or bfloat16 on CUDA), as
// F.conv2d does.
//
// Each casts every floating argument to at::autocast::get_autocast_dtype(device) with
// at::autocast::cached_cast (which, as for the built-in ops, leaves float64 tensors alone and caches
// the casts of leaf parameters for the duration of the autocast region), then redispatches below
// the Autocast key. The casts are ordinary differentiable ops, so the gradients of float32
// parameters come back in float32. Only the forward op needs this: autograd calls
// odconv2d_backward with the tensors saved by the forward, which are already in the autocast dtype.
// Without these kernels the Autocast keys fall through and the op would see mixed dtypes.
// Registering AutocastCUDA needs no CUDA toolkit, so every build has both.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/version.h>

namespace odconv {
namespace {

template <c10::DeviceType kDevice>
at::ScalarType autocast_dtype() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  return at::autocast::get_autocast_dtype(kDevice);
#else
  return kDevice == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype()
                                          : at::autocast::get_autocast_cpu_dtype();
#endif
}

using Odconv2dFn = at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);

template <c10::DeviceType kDevice, c10::DispatchKey kAutocastKey>
at::Tensor odconv2d_autocast(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& channel_att,
    const at::Tensor& filter_att, const at::Tensor& spatial_att, const at::Tensor& kernel_att,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const at::ScalarType dtype = autocast_dtype<kDevice>();
  const auto cast = [dtype](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("odconv::odconv2d", "")
                             .typed<Odconv2dFn>();
  return op.call(
      cast(x), cast(weight), cast(channel_att), cast(filter_att), cast(spatial_att),
      cast(kernel_att), stride, padding, dilation, groups);
}

} // namespace
} // namespace odconv

TORCH_LIBRARY_IMPL(odconv, AutocastCPU, m) {
  m.impl("odconv2d", &odconv::odconv2d_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(odconv, AutocastCUDA, m) {
  m.impl("odconv2d", &odconv::odconv2d_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}
