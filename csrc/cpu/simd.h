// Runtime ISA dispatch for the CPU kernels' hot loops.
//
// The extension is compiled for the baseline x86-64 (SSE2) so that it loads on any
// x86 machine; the functions marked ANATOMASK_SIMD_CLONES are also compiled for
// x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512), and the loader picks the widest
// clone the CPU supports (GCC's function multi-versioning, an ifunc resolver),
// as ATen picks its own kernels' CPU_CAPABILITY at run time. Elsewhere: a no-op.
// A cloned function must not throw: GCC (12) treats calls through the resolver as
// nothrow, so an exception ends the process. Clones report errors to their caller.
// Helpers called from a clone's loops are marked ANATOMASK_INLINE: inlined, they are
// compiled for the clone's ISA; called, they would run the baseline code.
// Building with -DANATOMASK_NO_SIMD_CLONES gives the baseline code only.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(ANATOMASK_NO_SIMD_CLONES)
#define ANATOMASK_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ANATOMASK_SIMD_CLONES
#endif

// ANATOMASK_INLINE_LAMBDA is the same for a lambda, after its parameter list:
// `[&](int i) ANATOMASK_INLINE_LAMBDA {`.
#if defined(__GNUC__) || defined(__clang__)
#define ANATOMASK_INLINE __attribute__((always_inline)) inline
#define ANATOMASK_INLINE_LAMBDA __attribute__((always_inline))
#else
#define ANATOMASK_INLINE inline
#define ANATOMASK_INLINE_LAMBDA
#endif
