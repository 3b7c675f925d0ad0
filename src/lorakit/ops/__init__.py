"""Compute kernels shared by the methods and the trainer: dense matmuls on the fastest backend available
(matmul.py), the cross-entropy of a language-model head computed in chunks (cross_entropy.py, lm_head.py),
fused RMSNorm and SwiGLU modules that keep less for the backward and Llama attention with a one-pass rotary
embedding (fused_modules.py, rms_norm.py, swiglu.py, rotary.py, recompute.py), and C++ kernels for the CPU: for bf16
training causal attention (attention.py), RMSNorm, the rotary embedding, the LM head's softmax and DoRA's output
scaling (column_scale.py), and for decoding a LoRA adapter's update of a few fp32 or bf16 rows, alone or with the
layer's base product in the same call (lora_rows.py), and a dense layer's product on a few rows
(csrc/linear_rows.cpp, through matmul.py's linear) (csrc/, one library built on first use by cpu_extension.py).

docs/performance.md gives the measurements behind each choice.
"""
