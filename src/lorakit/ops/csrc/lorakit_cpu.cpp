// lorakit's CPU kernels as one translation unit: one compiler call parses torch's headers once (~13 s for all,
// against ~12 s per kernel built on its own). Each kernel lives in its own file and namespace; the operators are
// registered under torch.ops.lorakit (causal_attention.cpp declares the library, the others add to it).
#include "causal_attention.cpp"
#include "rms_norm.cpp"
#include "cross_entropy.cpp"
#include "dora_scale.cpp"
#include "rotary.cpp"
#include "swiglu.cpp"
#include "lora_rows.cpp"
#include "linear_rows.cpp"
#include "lora_linear_rows.cpp"  // after linear_rows.cpp and lora_rows.cpp, whose functions it calls
