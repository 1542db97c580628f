//! Activation statistics of the classifier models for activation-aware criteria (Wanda:
//! `|W_ij| * ||X_:,j||_2`): per input column of every linear and convolution weight, the sum
//! of squares of the calibration input that layer sees, accumulated in f64 in a fixed order.
//!
//! A layer's calibration matrix `X` has one column per column of the flattened weight
//! (`[out, in]` for a linear layer, `[out, in_channels * k * k]` for a convolution) and one
//! row per calibration token: per sample for a linear layer, per (sample, output position)
//! for a convolution — the rows of the im2col matrix the forward pass multiplies, zero
//! padding included. The input is the output of the preceding layers in the model's current
//! state (pruned weights included as they are), as [`Model::forward`] computes it.

use candle_core::Tensor;

use crate::data::Dataset;
use crate::error::{CandleContext, Result, RuntimeError};
use crate::model::{arch, Layer, Model};

/// Calibration statistics of one weight's input columns.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationStats {
    /// The weight parameter, e.g. `fc1.weight` or `conv1.weight`.
    pub name: String,
    /// Calibration rows seen: samples for a linear layer, samples x output positions for a
    /// convolution.
    pub rows: usize,
    /// `sum_rows x_rj²` per column of the flattened weight (for a convolution in the order
    /// `(in_channel, ky, kx)`, the order of `weight.reshape([out, in * k * k])`'s columns).
    pub sum_sq: Vec<f64>,
}

impl ActivationStats {
    /// Per-column L2 norms `||X_:,j||_2` (Wanda's activation norm).
    pub fn norms(&self) -> Vec<f32> {
        self.sum_sq.iter().map(|s| s.sqrt() as f32).collect()
    }

    /// Per-column mean of squares `||X_:,j||² / rows` (0 when no row was seen).
    pub fn mean_sq(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.sum_sq.iter().map(|s| (s / n) as f32).collect()
    }
}

/// Per-column L2 norms of every linear and convolution weight's calibration input, over the
/// first `batches` batches of `data` in epoch-0 order (all of them if it has fewer), keyed by
/// the weight's name, in model order. See [`activation_stats`].
pub fn activation_norms(
    model: &Model,
    data: &Dataset,
    batches: usize,
) -> Result<Vec<(String, Vec<f32>)>> {
    Ok(activation_stats(model, data, batches)?
        .into_iter()
        .map(|s| {
            let norms = s.norms();
            (s.name, norms)
        })
        .collect())
}

/// Runs the model forward (detached: no gradient graph) on the first `batches` batches of
/// `data` (epoch-0 order, as [`crate::train::gradients`]) and accumulates, for every linear
/// and convolution weight in model order, the squares of its input columns in f64.
///
/// Batches are added one after another and each batch's values in memory order, so the
/// result does not depend on the thread count (the forward pass itself is thread-count
/// invariant, see the README's determinism section).
pub fn activation_stats(
    model: &Model,
    data: &Dataset,
    batches: usize,
) -> Result<Vec<ActivationStats>> {
    if batches == 0 {
        return Err(RuntimeError::InvalidConfig(
            "activation statistics need at least one calibration batch (got 0)".into(),
        ));
    }
    if data.is_empty() {
        return Err(RuntimeError::InvalidConfig(format!(
            "activation statistics: data set {} has no samples",
            data.name
        )));
    }
    model.check_data(data)?;
    if model.onnx_graph().is_some() {
        return onnx_activation_stats(model, data, batches);
    }
    let layers = model.architecture().layers();
    let mut stats: Vec<ActivationStats> = layers
        .iter()
        .filter_map(|layer| match layer {
            Layer::Linear { name, inputs, .. } => Some(ActivationStats {
                name: format!("{name}.weight"),
                rows: 0,
                sum_sq: vec![0.0; *inputs],
            }),
            Layer::Conv2d {
                name,
                in_channels,
                kernel,
                ..
            } => Some(ActivationStats {
                name: format!("{name}.weight"),
                rows: 0,
                sum_sq: vec![0.0; in_channels * kernel * kernel],
            }),
            _ => None,
        })
        .collect();
    let lookup = |name: &str| -> Result<Tensor> { Ok(model.param(name)?.var.as_detached_tensor()) };
    let mut seen = 0usize;
    for batch in data.batches(0).take(batches) {
        let batch = batch?;
        let mut h = batch.inputs.detach();
        let mut next = 0usize;
        for layer in &layers {
            match layer {
                Layer::Linear { name, .. } => {
                    add_linear(&mut stats[next], name, &h)?;
                    next += 1;
                }
                Layer::Conv2d {
                    name,
                    kernel,
                    padding,
                    ..
                } => {
                    add_conv(&mut stats[next], name, &h, *kernel, *padding)?;
                    next += 1;
                }
                _ => {}
            }
            h = arch::apply_layer(layer, &h, &lookup)?;
        }
        seen += 1;
    }
    if seen == 0 {
        return Err(RuntimeError::InvalidConfig(format!(
            "activation statistics: data set {} yielded no batch",
            data.name
        )));
    }
    Ok(stats)
}

/// [`activation_stats`] of an ONNX graph: every Conv, Gemm and MatMul weight's input as the
/// graph's forward passes it to the node.
fn onnx_activation_stats(
    model: &Model,
    data: &Dataset,
    batches: usize,
) -> Result<Vec<ActivationStats>> {
    let mut stats: Vec<ActivationStats> = model
        .layer_costs()
        .iter()
        .map(|c| {
            let shape = model.param(&c.weight)?.shape();
            Ok(ActivationStats {
                name: c.weight.clone(),
                rows: 0,
                sum_sq: vec![0.0; shape.iter().skip(1).product()],
            })
        })
        .collect::<Result<_>>()?;
    let mut seen = 0usize;
    for batch in data.batches(0).take(batches) {
        let batch = batch?;
        let mut hook = |name: &str, op: &crate::onnx::Op, x: &Tensor| -> Result<()> {
            let Some(s) = stats.iter_mut().find(|s| s.name == name) else {
                return Ok(());
            };
            if matches!(op, crate::onnx::Op::Conv { .. }) {
                let shape = model.param(name)?.shape();
                s.rows +=
                    crate::onnx::ops::conv_column_sum_sq(&x.detach(), &shape, op, &mut s.sum_sq)?;
                Ok(())
            } else {
                add_linear(s, name, &x.detach())
            }
        };
        if let Some(out) = model.onnx_forward(&batch.inputs.detach(), &mut hook) {
            out?;
        }
        seen += 1;
    }
    if seen == 0 {
        return Err(RuntimeError::InvalidConfig(format!(
            "activation statistics: data set {} yielded no batch",
            data.name
        )));
    }
    Ok(stats)
}

/// Adds a linear layer's input `[b, inputs]`: one row per sample.
fn add_linear(stats: &mut ActivationStats, name: &str, x: &Tensor) -> Result<()> {
    let ctx = || format!("activation statistics of `{name}`: input {:?}", x.dims());
    let (rows, cols) = x.dims2().ctx(ctx)?;
    if cols != stats.sum_sq.len() {
        return Err(RuntimeError::ShapeMismatch {
            name: stats.name.clone(),
            context: "activation statistics (input columns)".into(),
            expected: vec![stats.sum_sq.len()],
            found: vec![cols],
        });
    }
    let values: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).ctx(ctx)?;
    for row in values.chunks_exact(cols) {
        for (acc, &v) in stats.sum_sq.iter_mut().zip(row) {
            *acc += f64::from(v) * f64::from(v);
        }
    }
    stats.rows += rows;
    Ok(())
}

/// Adds a stride-1 convolution's input `[b, c, h, w]`. The im2col row of (image, oy, ox) holds
/// `xp[c, oy + ky, ox + kx]` in column `(c, ky, kx)`, `xp` the zero-padded input; so the
/// column's sum of squares is the sum, over the `oh x ow` window positions shifted by
/// `(ky, kx)`, of the per-pixel sums of squares over the batch. Both sums run in a fixed order.
fn add_conv(
    stats: &mut ActivationStats,
    name: &str,
    x: &Tensor,
    k: usize,
    padding: usize,
) -> Result<()> {
    let ctx = || format!("activation statistics of `{name}`: input {:?}", x.dims());
    let (batch, c, h, w) = x.dims4().ctx(ctx)?;
    let (hp, wp) = (h + 2 * padding, w + 2 * padding);
    if c * k * k != stats.sum_sq.len() || hp < k || wp < k {
        return Err(RuntimeError::ShapeMismatch {
            name: stats.name.clone(),
            context: format!(
                "activation statistics of a convolution input {:?}",
                x.dims()
            ),
            expected: vec![stats.sum_sq.len()],
            found: vec![c * k * k],
        });
    }
    let (oh, ow) = (hp - k + 1, wp - k + 1);
    let values: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).ctx(ctx)?;
    // Per padded pixel: sum over the batch of its square (padding stays 0).
    let mut pixel = vec![0f64; c * hp * wp];
    for image in values.chunks_exact(c * h * w) {
        for ci in 0..c {
            for y in 0..h {
                let src = &image[(ci * h + y) * w..(ci * h + y + 1) * w];
                let start = (ci * hp + y + padding) * wp + padding;
                for (acc, &v) in pixel[start..start + w].iter_mut().zip(src) {
                    *acc += f64::from(v) * f64::from(v);
                }
            }
        }
    }
    for ci in 0..c {
        for ky in 0..k {
            for kx in 0..k {
                let mut s = 0f64;
                for oy in 0..oh {
                    let start = (ci * hp + oy + ky) * wp + kx;
                    s += pixel[start..start + ow].iter().sum::<f64>();
                }
                stats.sum_sq[(ci * k + ky) * k + kx] += s;
            }
        }
    }
    stats.rows += batch * oh * ow;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, Architecture, ModelSpec};
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A synthetic data set of `n` samples of `shape`, values in [-1, 2) (negative values
    /// make ReLU matter), seeded.
    fn synthetic(
        n: usize,
        shape: &[usize],
        batch: usize,
        shuffle: Option<u64>,
        seed: u64,
    ) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let per: usize = shape.iter().product();
        let values: Vec<f32> = (0..n * per).map(|_| rng.random_range(-1.0..2.0)).collect();
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..3)).collect();
        let mut dims = vec![n];
        dims.extend_from_slice(shape);
        let d = Device::Cpu;
        Dataset::from_tensors(
            "synthetic",
            Tensor::from_vec(values, dims, &d).unwrap(),
            Tensor::from_vec(labels, n, &d).unwrap(),
            3,
            batch,
            shuffle,
        )
        .unwrap()
    }

    /// The calibration samples (epoch-0 order, first `batches` batches) gathered by hand from
    /// the data set's inputs: `[m, ...sample_shape]` and the sample count.
    fn calibration_inputs(data: &Dataset, batches: usize) -> Tensor {
        let order = data.epoch_order(0);
        let m = (batches * data.batch_size).min(order.len());
        let per: usize = data.meta().sample_shape.iter().product();
        let all: Vec<f32> = data.inputs.flatten_all().unwrap().to_vec1().unwrap();
        let mut picked = Vec::with_capacity(m * per);
        for &i in &order[..m] {
            picked.extend_from_slice(&all[i as usize * per..(i as usize + 1) * per]);
        }
        let mut dims = vec![m];
        dims.extend_from_slice(&data.meta().sample_shape);
        Tensor::from_vec(picked, dims, &Device::Cpu).unwrap()
    }

    /// Column L2 norms of a `[rows, cols]` tensor, in f64 by plain loops.
    fn column_norms(x: &Tensor) -> Vec<f32> {
        let (_, cols) = x.dims2().unwrap();
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut s = vec![0f64; cols];
        for row in v.chunks_exact(cols) {
            for (a, &x) in s.iter_mut().zip(row) {
                *a += f64::from(x) * f64::from(x);
            }
        }
        s.iter().map(|v| v.sqrt() as f32).collect()
    }

    /// Column L2 norms of the im2col matrix of `x` `[b, c, h, w]` (zero padding `pad`,
    /// kernel `k`, stride 1), built row by row with plain loops: row = (image, oy, ox),
    /// column = (ci, ky, kx).
    fn im2col_norms(x: &Tensor, k: usize, pad: usize) -> (Vec<f32>, usize) {
        let (b, c, h, w) = x.dims4().unwrap();
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let (oh, ow) = (h + 2 * pad + 1 - k, w + 2 * pad + 1 - k);
        let mut s = vec![0f64; c * k * k];
        let mut row = vec![0f32; c * k * k];
        let mut rows = 0;
        for n in 0..b {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ci in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (y, xx) = (oy + ky, ox + kx);
                                let inside = y >= pad && y < h + pad && xx >= pad && xx < w + pad;
                                row[(ci * k + ky) * k + kx] = if inside {
                                    v[((n * c + ci) * h + y - pad) * w + xx - pad]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                    for (a, &r) in s.iter_mut().zip(&row) {
                        *a += f64::from(r) * f64::from(r);
                    }
                    rows += 1;
                }
            }
        }
        (s.iter().map(|v| v.sqrt() as f32).collect(), rows)
    }

    fn assert_close(name: &str, ours: &[f32], reference: &[f32]) {
        assert_eq!(ours.len(), reference.len(), "{name}: lengths");
        for (j, (a, r)) in ours.iter().zip(reference).enumerate() {
            assert!(
                (a - r).abs() <= 1e-5 * r.abs().max(1.0),
                "{name} column {j}: ours {a}, reference {r}"
            );
        }
    }

    fn by_name<'a>(norms: &'a [(String, Vec<f32>)], name: &str) -> &'a [f32] {
        &norms.iter().find(|(n, _)| n == name).unwrap().1
    }

    /// A parameter as a candle tensor, read through the public f32 accessor.
    fn param(model: &Model, name: &str) -> Tensor {
        let shape = model.param(name).unwrap().shape();
        Tensor::from_vec(model.param_f32(name).unwrap(), shape, &Device::Cpu).unwrap()
    }

    /// Zeroes every third weight of `name` (a pruned state).
    fn prune_every_third(model: &Model, name: &str) {
        let mut w = model.param_f32(name).unwrap();
        for (i, v) in w.iter_mut().enumerate() {
            if i % 3 == 0 {
                *v = 0.0;
            }
        }
        model.set_param_f32(name, &w).unwrap();
    }

    fn mlp() -> Model {
        ModelSpec::mlp(&[16, 12, 8, 3], Activation::Relu)
            .build(7, &Device::Cpu)
            .unwrap()
    }

    #[test]
    fn mlp_first_layer_norms_are_the_input_pixel_column_norms() {
        let model = mlp();
        // 23 samples of 1x4x4, batches of 5, shuffled: 3 batches = the first 15 of the
        // epoch-0 permutation.
        let data = synthetic(23, &[1, 4, 4], 5, Some(11), 1);
        let norms = activation_norms(&model, &data, 3).unwrap();
        let names: Vec<&str> = norms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["fc1.weight", "fc2.weight", "fc3.weight"]);
        assert_eq!(norms[0].1.len(), 16);
        assert_eq!(norms[1].1.len(), 12);
        assert_eq!(norms[2].1.len(), 8);
        let x = calibration_inputs(&data, 3).flatten_from(1).unwrap();
        assert_eq!(x.dims(), [15, 16]);
        assert_close("fc1.weight", &norms[0].1, &column_norms(&x));
        // Neither all samples nor file order give the same norms.
        let all = column_norms(&calibration_inputs(&data, 5).flatten_from(1).unwrap());
        assert_ne!(norms[0].1, all);
        let file_order = column_norms(
            &data
                .inputs
                .narrow(0, 0, 15)
                .unwrap()
                .flatten_from(1)
                .unwrap(),
        );
        assert_ne!(norms[0].1, file_order);
        // More batches than the data set holds: all of them.
        let every = activation_norms(&model, &data, 100).unwrap();
        assert_close("fc1.weight (all)", &every[0].1, &all);
        let stats = activation_stats(&model, &data, 3).unwrap();
        assert_eq!(stats[0].rows, 15);
        assert_eq!(stats[0].norms(), norms[0].1);
        for (m, s) in stats[0].mean_sq().iter().zip(&stats[0].sum_sq) {
            assert!((f64::from(*m) - s / 15.0).abs() <= 1e-6 * (s / 15.0).max(1.0));
        }
    }

    #[test]
    fn mlp_deeper_layers_see_the_pruned_hidden_activations() {
        let model = mlp();
        prune_every_third(&model, "fc1.weight");
        prune_every_third(&model, "fc2.weight");
        let data = synthetic(20, &[16], 8, None, 2);
        let norms = activation_norms(&model, &data, 2).unwrap();
        let x = calibration_inputs(&data, 2);
        assert_eq!(x.dims(), [16, 16]);
        let linear = |x: &Tensor, layer: &str| {
            x.matmul(&param(&model, &format!("{layer}.weight")).t().unwrap())
                .unwrap()
                .broadcast_add(&param(&model, &format!("{layer}.bias")))
                .unwrap()
        };
        let h1 = linear(&x, "fc1").relu().unwrap();
        let h2 = linear(&h1, "fc2").relu().unwrap();
        assert_close(
            "fc2.weight",
            by_name(&norms, "fc2.weight"),
            &column_norms(&h1),
        );
        assert_close(
            "fc3.weight",
            by_name(&norms, "fc3.weight"),
            &column_norms(&h2),
        );
        // ReLU zeroed some activations: the hidden norms are not those of the pre-activations.
        let pre = column_norms(&linear(&x, "fc1"));
        assert_ne!(by_name(&norms, "fc2.weight"), pre.as_slice());
        // Pruning changes what later layers see.
        let dense = mlp();
        let dense_norms = activation_norms(&dense, &data, 2).unwrap();
        assert_eq!(dense_norms[0].1, norms[0].1);
        assert_ne!(dense_norms[1].1, norms[1].1);
    }

    fn small_lenet5(channels: usize) -> Model {
        ModelSpec::lenet5()
            .with_architecture(Architecture::Lenet5 {
                input_shape: vec![channels, 12, 12],
                classes: 3,
                activation: Activation::Relu,
            })
            .build(5, &Device::Cpu)
            .unwrap()
    }

    #[test]
    fn lenet5_conv_norms_match_an_independent_im2col() {
        let model = small_lenet5(2);
        prune_every_third(&model, "conv1.weight");
        let data = synthetic(9, &[2, 12, 12], 4, Some(3), 3);
        let stats = activation_stats(&model, &data, 2).unwrap();
        let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv1.weight",
                "conv2.weight",
                "fc1.weight",
                "fc2.weight",
                "fc3.weight"
            ]
        );
        let x = calibration_inputs(&data, 2);
        assert_eq!(x.dims(), [8, 2, 12, 12]);
        // conv1: 5x5, padding 2, on the raw inputs; columns (ci, ky, kx) = 2 * 25.
        let (want, rows) = im2col_norms(&x, 5, 2);
        assert_eq!(stats[0].sum_sq.len(), 50);
        assert_eq!(stats[0].rows, rows);
        assert_eq!(rows, 8 * 12 * 12);
        assert_close("conv1.weight", &stats[0].norms(), &want);
        // The padding rows count but add nothing: border columns see fewer non-zero values.
        let corner = stats[0].norms()[0]; // (ci 0, ky 0, kx 0)
        let centre = stats[0].norms()[2 * 5 + 2]; // (ci 0, ky 2, kx 2): every pixel once
        assert!(corner < centre, "{corner} {centre}");
        // conv2: its input is maxpool(relu(conv1(x))) with candle's reference conv2d.
        let h = x
            .conv2d(&param(&model, "conv1.weight"), 2, 1, 1, 1)
            .unwrap()
            .broadcast_add(&param(&model, "conv1.bias").reshape((1, 6, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap()
            .max_pool2d(2)
            .unwrap();
        let (want2, rows2) = im2col_norms(&h, 5, 0);
        assert_eq!(stats[1].sum_sq.len(), 6 * 25);
        assert_eq!(stats[1].rows, rows2);
        assert_close("conv2.weight", &stats[1].norms(), &want2);
        // fc1: flatten(maxpool(relu(conv2(h)))).
        let h2 = h
            .conv2d(&param(&model, "conv2.weight"), 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&param(&model, "conv2.bias").reshape((1, 16, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap()
            .max_pool2d(2)
            .unwrap()
            .flatten_from(1)
            .unwrap();
        assert_close("fc1.weight", &stats[2].norms(), &column_norms(&h2));
    }

    #[test]
    fn digit_cnn_first_conv_pads_the_normalised_input_with_zeros() {
        // Freshly initialised weights with the digit-recognizer architecture (no .pth needed).
        let model = ModelSpec::lenet5()
            .with_architecture(Architecture::DigitCnn)
            .build(2, &Device::Cpu)
            .unwrap();
        let data = synthetic(3, &[1, 28, 28], 2, None, 4);
        let norms = activation_norms(&model, &data, 2).unwrap();
        assert_eq!(norms.len(), 5);
        assert_eq!(norms[0].0, "conv_layers.0.weight");
        assert_eq!(norms[0].1.len(), 9);
        assert_eq!(norms[1].1.len(), 32 * 9);
        let x = calibration_inputs(&data, 2)
            .affine(1.0 / 0.3081, -0.1307 / 0.3081)
            .unwrap();
        let (want, _) = im2col_norms(&x, 3, 1);
        assert_close("conv_layers.0.weight", &norms[0].1, &want);
    }

    #[test]
    fn norms_are_bit_identical_with_1_and_2_threads() {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                // Batch 256 and a 256-wide layer so the GEMMs split over threads.
                let wide = ModelSpec::mlp(&[64, 256, 64, 3], Activation::Relu)
                    .build(9, &Device::Cpu)
                    .unwrap();
                let data = synthetic(600, &[64], 256, Some(5), 5);
                let mut out = activation_norms(&wide, &data, 3).unwrap();
                let lenet = small_lenet5(1);
                let data = synthetic(40, &[1, 12, 12], 16, Some(6), 6);
                out.extend(activation_norms(&lenet, &data, 3).unwrap());
                out
            })
        };
        let (one, two) = (run(1), run(2));
        assert_eq!(one.len(), 8);
        for ((n1, a), (n2, b)) in one.iter().zip(&two) {
            assert_eq!(n1, n2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b), "{n1}");
            assert!(a.iter().any(|&v| v > 0.0), "{n1}: all zero");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let model = mlp();
        let data = synthetic(6, &[16], 3, None, 7);
        let err = activation_norms(&model, &data, 0).unwrap_err();
        assert!(matches!(err, RuntimeError::InvalidConfig(_)), "{err}");
        assert!(err.to_string().contains("at least one"), "{err}");
        // Samples of the wrong size: the model's check_data error.
        let wrong = synthetic(6, &[1, 5, 5], 3, None, 8);
        let err = activation_norms(&model, &wrong, 1).unwrap_err();
        assert!(matches!(err, RuntimeError::ShapeMismatch { .. }), "{err}");
        assert!(err.to_string().contains("[16]"), "{err}");
        // More classes than the model outputs.
        let two_class = ModelSpec::mlp(&[16, 2], Activation::Relu)
            .build(0, &Device::Cpu)
            .unwrap();
        let err = activation_norms(&two_class, &data, 1).unwrap_err();
        assert!(err.to_string().contains("3 classes"), "{err}");
        // A conv model refuses flat samples.
        let lenet = small_lenet5(1);
        let flat = synthetic(4, &[144], 2, None, 9);
        assert!(matches!(
            activation_norms(&lenet, &flat, 1).unwrap_err(),
            RuntimeError::ShapeMismatch { .. }
        ));
    }
}
