//! `prunec bench kernels`: JIT pruning throughput against streaming bandwidth and candle.

/// Placeholder replaced below.
pub fn bench_kernels(_sizes: &[usize], _json: bool) -> Result<serde_json::Value, String> {
    Err("not yet".into())
}
