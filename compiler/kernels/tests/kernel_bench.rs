//! The kernel benchmark runs end to end at a tiny size and reports every field it promises.

use prunec_kernels::{bench_kernels, bench_table};

#[test]
fn bench_reports_all_cases() {
    // 8 tensors x 16 rows x 4096 columns.
    let v = bench_kernels(&[8 * 16 * 4096], true).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let params = c["params"].as_u64().unwrap();
        assert_eq!(params, 8 * 16 * 4096);
        // 10% kept, exactly for global, per row (409 of 4096) for per-row.
        let kept = c["kept"].as_u64().unwrap();
        match c["selection"].as_str().unwrap() {
            "global" => assert_eq!(kept, params / 10),
            _ => assert_eq!(kept, 8 * 16 * 409),
        }
        for k in [
            "seconds",
            "gb_per_s",
            "streaming_gb_per_s",
            "ratio_to_streaming",
            "paired_ratio_median",
            "prefetched_streaming_gb_per_s",
            "ratio_to_prefetched_streaming",
            "candle_seconds",
            "speedup_vs_candle",
            "read_seconds",
            "two_pass_bound",
        ] {
            let x = c[k].as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{k} = {x}");
        }
    }
    // Which code ran is reported.
    let scans = v["scan_code"].as_str().unwrap();
    assert_eq!(
        scans == "avx512",
        prunec_kernels::wide::available(),
        "{scans}"
    );
    assert!(["avx512", "avx2", "scalar"].contains(&v["selection_code"].as_str().unwrap()));
    // Every timed pass starts with the caches evicted, by reading at least 64 MiB.
    assert!(v["evicted_bytes"].as_u64().unwrap() >= 64 << 20);
    let table = bench_table(&v);
    // Header, separator, four cases, a blank line and the line naming the code.
    assert_eq!(table.lines().count(), 2 + 4 + 2);
    assert!(table.contains(&format!("Scans: {scans} code")));
    assert!(table.contains("caches evicted before every timed pass"));
}
