// Counts the matmul and convolution FLOPs libtorch runs, from its own record of every operator
// call (RecordFunction, the hook its profiler uses): aten::mm, addmm, bmm, baddbmm and
// convolution, from their input shapes, 2 FLOPs per multiply-add. Composite operators (linear,
// matmul, conv2d) are not counted themselves: they run through these. Used by xrayglm's
// model::flops::trace to check the FLOP accounting against what really runs.
#include <ATen/record_function.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

std::mutex mu;
double total = 0.0;
int64_t calls = 0;
at::CallbackHandle handle = 0;

std::vector<int64_t> sizes(c10::ArrayRef<const c10::IValue> in, size_t i) {
  if (i < in.size() && in[i].isTensor()) {
    return in[i].toTensor().sizes().vec();
  }
  return {};
}

std::vector<int64_t> ints(c10::ArrayRef<const c10::IValue> in, size_t i) {
  if (i < in.size() && in[i].isIntList()) {
    return in[i].toIntList().vec();
  }
  return {};
}

double matmul_flops(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  if (a.size() == 2 && b.size() == 2) {
    return 2.0 * a[0] * a[1] * b[1];
  }
  if (a.size() == 3 && b.size() == 3) {
    return 2.0 * a[0] * a[1] * a[2] * b[2];
  }
  return 0.0;
}

// aten::convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
// groups): 2 · N · C_out · (C_in / groups) · k_h · k_w per output position.
double conv_flops(c10::ArrayRef<const c10::IValue> in) {
  auto x = sizes(in, 0), w = sizes(in, 1);
  auto stride = ints(in, 3), pad = ints(in, 4), dil = ints(in, 5);
  if (x.size() != 4 || w.size() != 4 || stride.size() != 2 || pad.size() != 2 || dil.size() != 2) {
    return 0.0;
  }
  double out = 1.0;
  for (int d = 0; d < 2; ++d) {
    int64_t span = dil[d] * (w[2 + d] - 1) + 1;
    out *= (x[2 + d] + 2 * pad[d] - span) / stride[d] + 1;
  }
  return 2.0 * x[0] * w[0] * w[1] * w[2] * w[3] * out;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  const char* name = fn.name();
  if (std::strncmp(name, "aten::", 6) != 0) {
    return nullptr;
  }
  const char* op = name + 6;
  auto in = fn.inputs();
  double f = 0.0;
  if (!std::strcmp(op, "mm") || !std::strcmp(op, "bmm")) {
    f = matmul_flops(sizes(in, 0), sizes(in, 1));
  } else if (!std::strcmp(op, "addmm") || !std::strcmp(op, "baddbmm")) {
    f = matmul_flops(sizes(in, 1), sizes(in, 2));
  } else if (!std::strcmp(op, "convolution")) {
    f = conv_flops(in);
  }
  if (f > 0.0) {
    std::lock_guard<std::mutex> g(mu);
    total += f;
    calls += 1;
  }
  return nullptr;
}

}  // namespace

extern "C" {

// Start counting (every thread); 1 when a count was already running.
int xrayglm_flop_trace_start() {
  std::lock_guard<std::mutex> g(mu);
  if (handle != 0) {
    return 1;
  }
  total = 0.0;
  calls = 0;
  handle = at::addGlobalCallback(at::RecordFunctionCallback(&on_start).needsInputs(true));
  return 0;
}

// Stop counting: the FLOPs, and the calls counted in `n`.
double xrayglm_flop_trace_stop(int64_t* n) {
  at::CallbackHandle h;
  {
    std::lock_guard<std::mutex> g(mu);
    h = handle;
    handle = 0;
  }
  if (h != 0) {
    at::removeCallback(h);
  }
  std::lock_guard<std::mutex> g(mu);
  *n = calls;
  return total;
}
}
