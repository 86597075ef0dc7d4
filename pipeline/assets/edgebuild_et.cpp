// ExecuTorch's C++ runtime (the executorch wheel's prebuilt libexecutorch, optimized/quantized kernels and XNNPACK
// delegate) behind a C ABI, for the aarch64 emulator root: the wheel's Python bindings (_C) link libtorch, and
// PyPI's aarch64 torch is the CUDA build (~2.7 GB with its CUDA wheels), so the root runs the .pte through the
// runtime's own C++ API (extension::Module, as an app on the board does) and edgebuild_et.py drives it with ctypes.
// Built by setup_arm64_emulator.sh with the wheel's headers and its documented compile definitions:
//   aarch64-linux-gnu-g++ -std=c++17 -O2 -shared -fPIC -DC10_USING_CUSTOM_GENERATED_MACROS -DET_EVENT_TRACER_ENABLED
//     -DET_USE_THREADPOOL -I executorch/include -I executorch/include/executorch/runtime/core/portable_type/c10
//     edgebuild_et.cpp -L executorch/lib -Wl,--no-as-needed -lexecutorch ... -Wl,-rpath,'$ORIGIN/executorch/lib'
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace executorch::extension::threadpool {
class ThreadPool {  // libexecutorch_threadpool.so's class; the wheel ships no threadpool.h (only the guard)
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::runtime::EValue;

namespace {
struct Handle {
  std::unique_ptr<Module> module;
  std::vector<TensorPtr> inputs;
  std::vector<EValue> outputs;
};

int fail(char* err, size_t len, const std::string& what, executorch::runtime::Error e) {
  std::snprintf(err, len, "%s (ExecuTorch error 0x%x)", what.c_str(), static_cast<unsigned>(e));
  return 1;
}
}  // namespace

extern "C" {

int et_set_threads(uint32_t threads) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool != nullptr && pool->_unsafe_reset_threadpool(threads) ? 0 : 1;
}

void* et_load(const char* path, char* err, size_t len) {
  auto h = std::make_unique<Handle>();
  h->module = std::make_unique<Module>(path, Module::LoadMode::File);
  auto e = h->module->load_method("forward");
  if (e != executorch::runtime::Error::Ok) {
    fail(err, len, std::string("cannot load method 'forward' of ") + path, e);
    return nullptr;
  }
  return h.release();
}

void et_free(void* handle) { delete static_cast<Handle*>(handle); }

// One input per call (k-th input, in order): dtype is ExecuTorch's ScalarType code; the data is copied.
int et_set_input(void* handle, int k, int dtype, int ndim, const int64_t* sizes, const void* data, size_t nbytes,
                 char* err, size_t len) {
  auto* h = static_cast<Handle*>(handle);
  if (static_cast<size_t>(k) >= h->inputs.size()) h->inputs.resize(k + 1);
  std::vector<executorch::aten::SizesType> shape(sizes, sizes + ndim);
  std::vector<uint8_t> bytes(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + nbytes);
  h->inputs[k] = executorch::extension::make_tensor_ptr(std::move(shape), std::move(bytes), {}, {},
                                                        static_cast<executorch::aten::ScalarType>(dtype));
  return 0;
}

int et_forward(void* handle, char* err, size_t len) {
  auto* h = static_cast<Handle*>(handle);
  std::vector<EValue> args;
  for (auto& t : h->inputs) args.emplace_back(t);
  auto result = h->module->execute("forward", args);
  if (!result.ok()) return fail(err, len, "forward failed", result.error());
  h->outputs = std::move(result.get());
  return 0;
}

int et_num_outputs(void* handle) { return static_cast<int>(static_cast<Handle*>(handle)->outputs.size()); }

// The j-th output of the last forward: 0 and its dtype, shape and data (valid until the next forward), or 1 when it
// is not a tensor.
int et_output(void* handle, int j, int* dtype, int* ndim, int64_t* sizes, const void** data, size_t* nbytes) {
  auto& v = static_cast<Handle*>(handle)->outputs.at(j);
  if (!v.isTensor()) return 1;
  const auto& t = v.toTensor();
  *dtype = static_cast<int>(t.scalar_type());
  *ndim = static_cast<int>(t.dim());
  for (int d = 0; d < t.dim() && d < 16; ++d) sizes[d] = t.size(d);
  *data = t.const_data_ptr();
  *nbytes = t.nbytes();
  return 0;
}
}
