//! CPU kernels of the scoring forward, beside candle's ops: [`attention`] (a whole attention per
//! block of queries) and [`logits`] (log-probs and log-sum-exp per row of logits) and [`exp`]
//! (exp over f32 slices in SIMD lanes) and [`skinny`] (a few rows against a weight matrix: a
//! decoding step's projections).

/// `pub(crate) fn $name` running `$body` compiled for AVX-512, for AVX2 + FMA or for the
/// baseline, whichever the CPU has. The bodies add and multiply without fusing (Rust does not
/// contract `a * b + c`), so every version computes the same bits.
macro_rules! dispatch {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// An output's base pointer, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// SAFETY: `i` is within the buffer.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}
// SAFETY: the tasks write disjoint elements (each kernel says which) and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

pub mod attention;
pub mod exp;
pub mod logits;
pub mod skinny;
