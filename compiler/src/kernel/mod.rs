//! Fused score → select → mask kernels: reference interpreter and cranelift JIT.
