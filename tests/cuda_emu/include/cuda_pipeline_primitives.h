// The CPU stand-in's cp.async primitives (see cuda_runtime.h: emu::async_copy). Each copy's bytes land when
// its thread waits for its group, and the destination reads as garbage (0xFF bytes) until then.
#pragma once

#include "cuda_runtime.h"

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0) {
  emu::async_copy(dst, src, size_and_align, zfill);
}
inline void __pipeline_commit() { emu::async_commit(); }
inline void __pipeline_wait_prior(size_t prior) { emu::async_wait(prior); }
