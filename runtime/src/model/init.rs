//! Seeded parameter initialisation (PyTorch-default, Kaiming, Xavier), independent of device and threads.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How fresh weights are drawn. Biases are zero except under `PytorchDefault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// PyTorch's `nn.Linear`/`nn.Conv2d` default: weight and bias `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`
    /// (kaiming_uniform with a = sqrt(5)).
    #[default]
    PytorchDefault,
    /// He uniform for ReLU: `U(-sqrt(6/fan_in), sqrt(6/fan_in))`, bias 0.
    KaimingUniform,
    /// He normal for ReLU: `N(0, 2/fan_in)`, bias 0.
    KaimingNormal,
    /// Glorot uniform: `U(-sqrt(6/(fan_in+fan_out)), +...)`, bias 0.
    XavierUniform,
}

/// Fan-in and fan-out of a weight of `shape` (`[out, in, k...]`).
pub fn fans(shape: &[usize]) -> (usize, usize) {
    let receptive: usize = shape.iter().skip(2).product();
    let fan_in = shape.get(1).copied().unwrap_or(1) * receptive;
    let fan_out = shape.first().copied().unwrap_or(1) * receptive;
    (fan_in.max(1), fan_out.max(1))
}

/// Draws the values of parameter number `index` (its own ChaCha stream of `seed`,
/// so one parameter's values do not depend on the others).
/// `weight_shape` is the shape of the layer's weight (fans come from it, also for the bias).
pub fn draw(
    scheme: InitScheme,
    seed: u64,
    index: u64,
    shape: &[usize],
    weight_shape: &[usize],
    is_bias: bool,
) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let n: usize = shape.iter().product();
    let (fan_in, fan_out) = fans(weight_shape);
    let uniform = |rng: &mut ChaCha8Rng, bound: f64| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    match (scheme, is_bias) {
        (InitScheme::PytorchDefault, _) => uniform(&mut rng, 1.0 / (fan_in as f64).sqrt()),
        (_, true) => vec![0.0; n],
        (InitScheme::KaimingUniform, false) => uniform(&mut rng, (6.0 / fan_in as f64).sqrt()),
        (InitScheme::XavierUniform, false) => {
            uniform(&mut rng, (6.0 / (fan_in + fan_out) as f64).sqrt())
        }
        (InitScheme::KaimingNormal, false) => {
            let std = (2.0 / fan_in as f64).sqrt();
            (0..n)
                .map(|_| {
                    // Box-Muller: one normal per pair of uniforms (u1 in (0, 1]).
                    let u1 = 1.0 - rng.random::<f64>();
                    let u2 = rng.random::<f64>();
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
                })
                .collect()
        }
    }
}
