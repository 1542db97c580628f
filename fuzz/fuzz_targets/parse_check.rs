//! Fuzz target: any bytes through decode → parse → check → fmt must not panic,
//! and fmt must be idempotent on whatever parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = prunec_lang::parse::bytes_to_source(data) else { return };
    let parsed = prunec_lang::source_to_ast(src);
    if !parsed.errors.is_empty() {
        return;
    }
    let _ = prunec_lang::ast_to_checked(&parsed.recipe, src, &[]);
    let once = prunec_lang::fmt::ast_to_source(&parsed.recipe, src);
    let again = prunec_lang::source_to_ast(&once);
    assert!(again.errors.is_empty());
    assert_eq!(once, prunec_lang::fmt::ast_to_source(&again.recipe, &once));
});
