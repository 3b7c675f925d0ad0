// Which of ATen's vectorised implementations (at::vec) lorakit's kernels compile against: the widest this compiler
// targets with -march=native. ATen picks its Vectorized<T> specialisations from these macros, which PyTorch's own
// build sets per dispatch target; without them at::vec falls back to scalar loops. Include before any ATen header.
#pragma once
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
