// Self-test of the emulator (CPU only): warp intrinsics give the values PTX defines, and each
// misuse the emulator claims to detect is detected, with its message (each misuse runs in a
// forked child, since a detected error ends the process).
#include <sys/wait.h>
#include <unistd.h>

#include "common/cuda_launch.cuh"
#include "common/ptx.cuh"
#include "harness.h"

namespace {

__global__ void good_kernel(int* out) {
  const int t = threadIdx.x, lane = t & 31;
  int* o = out + t * 8;
  o[0] = __shfl_sync(0xffffffffu, lane * 10, 3);                // lane 3's value
  o[1] = __shfl_up_sync(0xffffffffu, lane, 2, 8);             // own value in lanes 0,1 of each 8
  o[2] = __shfl_down_sync(0xffffffffu, lane, 3, 16);          // own value past the segment
  o[3] = __shfl_xor_sync(0xffffffffu, lane, 5);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane & 1));
  o[5] = __any_sync(0xffffffffu, lane == 7) + 2 * __all_sync(0xffffffffu, lane < 32);
  // a partial mask: the upper half shuffles among itself
  if (lane >= 16) o[6] = __shfl_sync(0xffff0000u, lane, 17);
  else o[6] = 17;
  __shared__ int cell[64];
  cell[t] = t;
  __syncthreads();
  o[7] = cell[63 - t];
}

__global__ void poison_kernel(float* out) {
  __shared__ float s[32];
  // written only by threads this launch does not have (else the compiler folds the reads of
  // a never-written static to zero)
  if (threadIdx.x >= 32) s[threadIdx.x - 32] = 1.f;
  out[threadIdx.x] = s[threadIdx.x];  // never written: 0xFF bytes, NaN
}

__global__ void __launch_bounds__(32) cp_async_early_kernel(const float* src, float* out) {
  __shared__ __align__(16) float s[32 * 4];
  const uint32_t dst = rtdetr_fast::ptx::smem_addr(&s[threadIdx.x * 4]);
  rtdetr_fast::ptx::cp_async16(dst, src + threadIdx.x * 4, 16);
  rtdetr_fast::ptx::cp_async_commit();
  out[2 * threadIdx.x] = s[threadIdx.x * 4];  // before the wait: garbage
  rtdetr_fast::ptx::cp_async_wait<0>();
  out[2 * threadIdx.x + 1] = s[threadIdx.x * 4];  // after it: the data
}

__global__ void bad_kernel(int which, int* out) {
  const int t = threadIdx.x, lane = t & 31;
  int v = lane;
  switch (which) {
    case 0: v = __shfl_sync(0x1u, v, 0); break;  // lane 1.. not in its own mask
    case 1:  // different intrinsics under one mask
      v = (lane & 1) ? __shfl_xor_sync(0xffffffffu, v, 1) : __shfl_sync(0xffffffffu, v, 0);
      break;
    case 2:  // barrier divergence
      if (t < 32) __syncthreads();
      else __syncthreads();
      break;
    case 3:  // deadlock: lane 0 waits for lane 1, which waits at the block barrier
      if (t == 0) __syncwarp(0x3u);
      else __syncthreads();
      break;
    case 4:  // a lane named in the mask has exited
      if (lane == 5) return;
      v = __shfl_sync(0xffffffffu, v, 0);
      break;
    case 5:  // reading a lane outside the mask
      if (lane < 16) v = __shfl_sync(0x0000ffffu, v, 20);
      break;
    case 6:  // __syncthreads after part of the block returned
      if (t >= 32) return;
      __syncthreads();
      break;
    case 7:  // .aligned op by part of a warp
      if (lane >= 16) return;
      {
        __shared__ __align__(16) unsigned short m[32 * 8];
        uint32_t r0, r1, r2, r3;
        rtdetr_fast::ptx::ldmatrix_x4(rtdetr_fast::ptx::smem_addr(&m[lane * 8]), r0, r1, r2, r3);
        v = static_cast<int>(r0 + r1 + r2 + r3);
      }
      break;
    case 8:  // masks differ within the warp
      v = __shfl_sync(lane < 16 ? 0xffffffffu : 0xfffffffeu, v, 0);
      break;
  }
  out[t] = v;
}

std::string check_good() {
  int* out = harness::alloc<int>(64 * 8);
  RTDETR_LAUNCH(1, 64, 0, 0, good_kernel)(out);
  harness::sync("good_kernel");
  std::string msg;
  for (int t = 0; t < 64 && msg.empty(); ++t) {
    const int lane = t & 31, *o = out + t * 8;
    const int want[8] = {30,
                         (lane & 7) < 2 ? lane : lane - 2,
                         (lane & 15) + 3 >= 16 ? lane : lane + 3,
                         lane ^ 5,
                         static_cast<int>(0xaaaaaaaau),
                         1 + 2,
                         17,
                         63 - t};
    for (int i = 0; i < 8; ++i)
      if (o[i] != want[i]) {
        char buf[128];
        snprintf(buf, sizeof buf, "thread %d value %d: %d, expected %d", t, i, o[i], want[i]);
        msg = buf;
        break;
      }
  }
  harness::release(out);
  return msg;
}

std::string check_poison() {
  float* out = harness::alloc<float>(32, 0);
  RTDETR_LAUNCH(1, 32, 0, 0, poison_kernel)(out);
  harness::sync("poison_kernel");
  std::string msg;
  for (int i = 0; i < 32; ++i)
    if (!std::isnan(out[i])) msg = "uninitialised shared memory read as a number";
  harness::release(out);
  return msg;
}

std::string check_cp_async() {
  float* src = harness::alloc<float>(128, 0);
  for (int i = 0; i < 128; ++i) src[i] = static_cast<float>(i);
  float* out = harness::alloc<float>(64, 0);
  RTDETR_LAUNCH(1, 32, 0, 0, cp_async_early_kernel)(src, out);
  harness::sync("cp_async_early_kernel");
  std::string msg;
  for (int t = 0; t < 32; ++t) {
    if (!std::isnan(out[2 * t])) msg = "a cp.async destination read before its wait was not garbage";
    if (out[2 * t + 1] != static_cast<float>(4 * t)) msg = "cp.async data wrong after the wait";
  }
  harness::release(src);
  harness::release(out);
  return msg;
}

// runs bad_kernel(which) in a child; the child must end with status 3 and `expect` in stderr
std::string check_bad(int which, const char* expect) {
  int fds[2];
  if (pipe(fds) != 0) return "pipe failed";
  fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    int* out = harness::alloc<int>(64);
    RTDETR_LAUNCH(1, 64, 0, 0, bad_kernel)(which, out);
    harness::sync("bad_kernel");
    _exit(0);
  }
  close(fds[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 3)
    return "the emulator did not stop the kernel (status " + std::to_string(status) + ")";
  if (text.find(expect) == std::string::npos)
    return "message without '" + std::string(expect) + "': " + text.substr(0, 300);
  if (text.find("selftest.cu:") == std::string::npos)
    return "message without the file:line of the kernel: " + text.substr(0, 300);
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  std::string filter;
  harness::Cases cases = harness::start(argc, argv, &filter);
  cases.report("emu/intrinsic_values", check_good());
  cases.report("emu/shared_poisoned", check_poison());
  cases.report("emu/cp_async_poisoned_until_wait", check_cp_async());
  const char* expect[] = {"with a mask that does not contain it",
                          "warp operations do not match",
                          "barrier divergence",
                          "deadlock",
                          "exited but is named in the mask",
                          "which is not in its mask",
                          "threads of the block have exited",
                          ".aligned operation run by part of the warp",
                          "warp operations do not match"};
  const char* names[] = {"own_lane_missing", "mismatched_intrinsics", "barrier_divergence",
                         "deadlock", "exited_lane_in_mask", "read_outside_mask",
                         "syncthreads_after_exit", "aligned_partial_warp", "mismatched_masks"};
  for (int i = 0; i < 9; ++i) cases.report(std::string("emu/detects_") + names[i], check_bad(i, expect[i]));
  return cases.finish();
}
