// RAFT's radix select-k (raft::matrix::select_k's 11-bits-a-pass algorithm) behind a plain C ABI,
// called from Python through ctypes with PyTorch's pointers and stream. No PyTorch header is
// involved, so one build serves every PyTorch version.
//
// moc_lightning/kernels/raft_select_k.py compiles this file several times, in parallel:
//   -DMOC_RAFT_VALUE=<type> -DMOC_RAFT_NAME=<name>  one select-k entry point per score type;
//   neither                                         the shared part (RAFT resources per device).
// Only the radix algorithm is instantiated (RAFT's own pick for k > 256): the warp-sort variants
// would multiply the build time for shapes MoC does not use.

#include <raft/core/resource/cuda_stream.hpp>
#include <raft/core/resource/device_memory_resource.hpp>
#include <raft/core/resources.hpp>
#include <rmm/cuda_stream_view.hpp>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <exception>

raft::resources& moc_raft_resources(int device, cudaStream_t stream);

namespace {
void copy_message(const char* message, char* error, int error_len)
{
  if (error_len <= 0) { return; }
  std::strncpy(error, message, static_cast<std::size_t>(error_len) - 1);
  error[error_len - 1] = '\0';
}
}  // namespace

#ifdef MOC_RAFT_VALUE

#include <raft/matrix/detail/select_k_layout.cuh>
#include <raft/matrix/detail/select_radix.cuh>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define MOC_RAFT_CONCAT2(a, b) a##b
#define MOC_RAFT_CONCAT(a, b) MOC_RAFT_CONCAT2(a, b)

// Writes the k largest values of each of `rows` rows of `len` contiguous scores to out_val and
// their column indices to out_idx (both rows x k, unordered). Returns 0, or 1 with a message.
extern "C" int MOC_RAFT_CONCAT(moc_raft_select_k_, MOC_RAFT_NAME)(const void* in, int64_t rows, int64_t len,
                                                                  int64_t k, void* out_val, int64_t* out_idx,
                                                                  int device, void* stream, char* error,
                                                                  int error_len)
{
  using value_t = MOC_RAFT_VALUE;
  using layout  = raft::matrix::detail::select::dense_layout<int64_t>;
  try {
    auto& res = moc_raft_resources(device, static_cast<cudaStream_t>(stream));
    raft::matrix::detail::select::radix::select_k<value_t, int64_t, 11, 512, layout>(
      res,
      static_cast<const value_t*>(in),
      nullptr,
      static_cast<int>(rows),
      len,
      k,
      static_cast<value_t*>(out_val),
      out_idx,
      /*select_min=*/false,
      /*fused_last_filter=*/false,
      /*len_i=*/nullptr);
    return 0;
  } catch (const std::exception& exc) {
    copy_message(exc.what(), error, error_len);
    return 1;
  }
}

#else  // the shared part

#include <map>
#include <memory>
#include <mutex>

namespace {
// Workspace pool cap: RAFT's default would plan for a quarter of the GPU beside PyTorch's own.
constexpr std::size_t kWorkspaceBytes = std::size_t{64} << 20;
}  // namespace

// One raft::resources per device, kept for the device properties and the workspace pool it
// caches; the stream is the caller's (PyTorch's current one), set on every call.
raft::resources& moc_raft_resources(int device, cudaStream_t stream)
{
  static std::mutex lock;
  static std::map<int, std::unique_ptr<raft::resources>> per_device;
  std::lock_guard<std::mutex> guard(lock);
  auto& slot = per_device[device];
  if (!slot) {
    slot = std::make_unique<raft::resources>();
    raft::resource::set_workspace_to_pool_resource(*slot, kWorkspaceBytes);
  }
  raft::resource::set_cuda_stream(*slot, rmm::cuda_stream_view(stream));
  return *slot;
}

extern "C" int moc_raft_abi_version() { return 1; }

#endif
