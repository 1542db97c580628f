//! prunec runtime: data sets, models, masked training, evaluation and model I/O on candle.
#![doc = include_str!("../README.md")]

pub mod calib;
pub mod data;
pub mod datascore;
pub mod device;
pub mod error;
pub mod eval;
pub mod gemm;
pub mod io;
pub mod llm;
pub mod masks;
pub mod model;
mod native;
pub mod obs;
pub mod onnx;
pub mod optim;
pub mod paths;
pub mod search;
pub mod train;

pub use calib::{activation_norms, activation_stats, ActivationStats};
pub use data::{Batch, Dataset, DatasetKind, DatasetMeta, DatasetSpec, ImageOptions, Split};
pub use device::DeviceSpec;
pub use error::{Result, RuntimeError};
pub use eval::{evaluate, pqi, sparsity, Metrics, ModelCounts};
pub use io::{load_safetensors, save_safetensors_atomic};
pub use masks::Masks;
pub use model::{Activation, Architecture, InitScheme, Model, ModelSpec, Snapshot};
pub use optim::{LrSchedule, OptimizerSpec};
pub use train::{gradients, train, NoHooks, StepInfo, TrainConfig, TrainHooks, TrainReport};
