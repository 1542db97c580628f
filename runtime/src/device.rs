//! Device selection: CPU by default, CUDA only when built with the `cuda` feature.

use candle_core::Device;

use crate::error::{Result, RuntimeError};

/// Which device tensors live on. `Cuda` is accepted only in builds with the
/// `cuda` feature; the default build and CI never need a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DeviceSpec {
    /// The host CPU (candle's gemm/rayon backend).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Creates the candle device.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => cuda_device(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|source| RuntimeError::Candle {
        context: format!("opening CUDA device {ordinal}"),
        source,
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(RuntimeError::InvalidConfig(format!(
        "CUDA device {ordinal} requested, but prunec-runtime was built without the `cuda` feature"
    )))
}
