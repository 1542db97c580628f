//! Helpers for the kernels' unit tests.

/// Marsaglia's 32-bit xorshift (13, 17, 5) from `seed` (not zero): cheap, reproducible
/// test data.
pub fn xorshift32(mut x: u32) -> impl FnMut() -> u32 {
    move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    }
}

/// Marsaglia's 64-bit xorshift (13, 7, 17) from `seed` (not zero).
pub fn xorshift64(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
