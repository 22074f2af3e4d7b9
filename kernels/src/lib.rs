//! Numeric kernels: every forward and backward op a DeepSeek-V3 layer needs, FP8 (E4M3) fine-grained
//! quantization and block-scaled GEMM. CPU implementations always; CUDA behind the `cuda` feature.
//!
//! Invariant: no async runtime, no network, no YAML.
