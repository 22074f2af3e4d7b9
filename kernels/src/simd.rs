//! Run-time CPU feature dispatch for the few hot loops written as plain Rust (quantization, softmax rows):
//! each is compiled for the baseline target, AVX2 and AVX-512, and the widest supported one runs.
//!
//! Invariant: all versions perform the same IEEE operations in the same order (Rust never contracts
//! `a * b + c` into an FMA), so the choice changes speed only, never bits.

/// Whether AVX-512 F, BW and VL are available (cached by the standard library).
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether AVX2 is available.
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `multiversion!(fn name<T: Bound>(args) -> Ret = impl_fn);` defines `name`, which calls the
/// `#[inline(always)]` function `impl_fn` compiled with AVX-512, AVX2 or the baseline, widest first.
macro_rules! multiversion {
    (fn $name:ident<$g:ident: $b:path>($($a:ident: $t:ty),*) -> $r:ty = $impl:ident) => {
        fn $name<$g: $b>($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
                unsafe fn wide<$g: $b>($($a: $t),*) -> $r {
                    $impl($($a),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<$g: $b>($($a: $t),*) -> $r {
                    $impl($($a),*)
                }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU supports AVX-512 F/BW/VL (checked just above).
                    return unsafe { wide($($a),*) };
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($a),*) };
                }
            }
            $impl($($a),*)
        }
    };
}
pub(crate) use multiversion;
