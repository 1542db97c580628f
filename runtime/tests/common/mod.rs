//! Shared helpers of the runtime's integration tests.
#![allow(dead_code)]

use candle_core::Device;
use prunec_runtime::{Dataset, DatasetKind, DatasetSpec, Split};

/// Loads a data set split, failing (never skipping) with the error's message,
/// which names the missing file and `scripts/fetch-data.sh`.
pub fn load(kind: DatasetKind, split: Split, batch: usize, shuffle: Option<u64>) -> Dataset {
    let mut spec = DatasetSpec::new(kind, split).batch_size(batch);
    spec.shuffle_seed = shuffle;
    spec.load(&Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

/// Unwraps with the error's Display (which names files and tensors).
pub trait OrPanic<T> {
    fn or_panic(self) -> T;
}

impl<T> OrPanic<T> for prunec_runtime::Result<T> {
    fn or_panic(self) -> T {
        self.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
