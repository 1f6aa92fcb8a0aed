// Codes and limits that cross a language boundary (glue C++ <-> CUDA launchers, extension ->
// Python), defined once. Plain C++: no torch, no CUDA header, so the CPU build, the .cu files
// and the CPU emulator's harnesses all include it.
#pragma once

namespace rtdetr_fast {

// element types of the launchers' `dtype` arguments
enum DTypeCode : int { kDTypeFloat32 = 0, kDTypeFloat16 = 1, kDTypeBFloat16 = 2 };

// activations fused into rep_conv ("identity", "relu", "silu" on the Python side)
enum ActCode : int { kActIdentity = 0, kActRelu = 1, kActSilu = 2 };

namespace limits {
// top-K: the selection is sorted in 16 KB of shared memory, each CTA ranks at most
// kTopkMaxChunk anchors (16 KB of order keys); past kTopkMaxK Python takes a full sort
constexpr int kTopkMaxK = 2048;
constexpr int kTopkMaxChunk = 4096;
}  // namespace limits

}  // namespace rtdetr_fast
