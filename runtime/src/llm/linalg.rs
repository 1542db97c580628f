//! Dense symmetric positive-definite linear algebra (f64, or f32 where a caller asks for it):
//! Cholesky with inverse, and SparseGPT's upper factor of H⁻¹.

use super::error::{Result, RuntimeError};
use crate::gemm::matmul;
use candle_core::{DType, Device, Tensor};

/// Below this size the factorization runs as plain loops; above it, recursively with fixed-order matmuls.
const LEAF: usize = 64;

/// Cholesky factor and its inverse of a symmetric positive-definite `a` (n, n), f64:
/// returns `(l, l_inv)` with `a = l lᵀ`, `l` lower triangular.
///
/// Recursive 2x2 block algorithm: the off-diagonal panel and the Schur complement are
/// `gemm::matmul` products, so the cost is dominated by gemm. `what` names the matrix in errors.
pub fn cholesky_with_inverse(a: &Tensor, what: &str) -> Result<(Tensor, Tensor)> {
    cholesky_with_inverse_in(a, DType::F64, what)
}

/// [`cholesky_with_inverse`] computed in `dtype` (`F32` or `F64`) throughout: `a` is cast to
/// it, and every product and leaf factorization runs in it.
pub fn cholesky_with_inverse_in(a: &Tensor, dtype: DType, what: &str) -> Result<(Tensor, Tensor)> {
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(RuntimeError::Invalid(format!(
            "{what}: Cholesky in {dtype:?} (only f32 and f64)"
        )));
    }
    let (n, n2) = a.dims2()?;
    if n != n2 {
        return Err(RuntimeError::Invalid(format!(
            "{what}: {n}x{n2} matrix is not square"
        )));
    }
    let a = a.to_dtype(dtype)?;
    if n <= LEAF {
        return match dtype {
            DType::F32 => leaf::<f32>(&a, n, what),
            _ => leaf::<f64>(&a, n, what),
        };
    }
    let k = n / 2;
    let a11 = a.narrow(0, 0, k)?.narrow(1, 0, k)?;
    let a21 = a.narrow(0, k, n - k)?.narrow(1, 0, k)?;
    let a22 = a.narrow(0, k, n - k)?.narrow(1, k, n - k)?;
    let (l11, i11) = cholesky_with_inverse_in(&a11, dtype, what)?;
    let l21 = matmul(&a21, &i11.t()?)?;
    let schur = (a22 - matmul(&l21, &l21.t()?)?)?;
    let (l22, i22) = cholesky_with_inverse_in(&schur, dtype, what)?;
    let i21 = matmul(&matmul(&i22, &l21)?, &i11)?.neg()?;
    let zeros = Tensor::zeros((k, n - k), dtype, a.device())?;
    let l = Tensor::cat(
        &[
            &Tensor::cat(&[&l11, &zeros], 1)?,
            &Tensor::cat(&[&l21, &l22], 1)?,
        ],
        0,
    )?;
    let inv = Tensor::cat(
        &[
            &Tensor::cat(&[&i11, &zeros], 1)?,
            &Tensor::cat(&[&i21, &i22], 1)?,
        ],
        0,
    )?;
    Ok((l, inv))
}

fn leaf<T>(a: &Tensor, n: usize, what: &str) -> Result<(Tensor, Tensor)>
where
    T: candle_core::WithDType + num_traits::Float + std::fmt::LowerExp,
{
    let a: Vec<T> = a.flatten_all()?.to_vec1()?;
    let l = crate::obs::cholesky(&a, n, what)?;
    let inv = crate::obs::lower_inverse(&l, n);
    Ok((
        Tensor::from_vec(l, (n, n), &Device::Cpu)?,
        Tensor::from_vec(inv, (n, n), &Device::Cpu)?,
    ))
}

/// The upper-triangular `u` with `H⁻¹ = uᵀ u` (what SparseGPT sweeps), for a symmetric positive-definite `h`.
///
/// With J the reversal permutation, `J H J = L Lᵀ` gives `H = V Vᵀ` for the upper `V = J L J`,
/// hence `H⁻¹ = (V⁻¹)ᵀ V⁻¹` and `u = V⁻¹ = J L⁻¹ J`: one Cholesky and one triangular inverse.
pub fn inverse_upper_cholesky(h: &Tensor, what: &str) -> Result<Tensor> {
    let (n, _) = h.dims2()?;
    let rev = Tensor::arange(0u32, n as u32, h.device())?
        .to_vec1::<u32>()?
        .into_iter()
        .rev()
        .collect::<Vec<_>>();
    let rev = Tensor::new(rev.as_slice(), h.device())?;
    let flipped = h.index_select(&rev, 0)?.index_select(&rev, 1)?;
    let (_, l_inv) = cholesky_with_inverse(&flipped, what)?;
    Ok(l_inv.index_select(&rev, 0)?.index_select(&rev, 1)?)
}

/// The same upper `u` with `H⁻¹ = uᵀ u`, computed in f32 the way llm-compressor (after the
/// SparseGPT reference code) does: `H = L Lᵀ`, the explicit inverse `H⁻¹ = L⁻ᵀ L⁻¹`, then
/// `u` = the transposed lower Cholesky factor of `H⁻¹`. Returns f32.
pub fn inverse_upper_cholesky_f32(h: &Tensor, what: &str) -> Result<Tensor> {
    let (_, l_inv) = cholesky_with_inverse_in(h, DType::F32, what)?;
    let h_inv = matmul(&l_inv.t()?, &l_inv)?;
    let (l2, _) = cholesky_with_inverse_in(&h_inv, DType::F32, what)?;
    Ok(l2.t()?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn spd(n: usize, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<f64> = (0..n * (n + 8))
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x = Tensor::from_vec(x, (n + 8, n), &Device::Cpu).unwrap();
        x.t().unwrap().matmul(&x).unwrap()
    }

    fn max_abs(a: &Tensor) -> f64 {
        a.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a - b).unwrap())
    }

    #[test]
    fn cholesky_and_inverse_reconstruct_across_the_leaf_boundary() {
        for n in [5, 64, 65, 150] {
            let a = spd(n, n as u64);
            let (l, inv) = cholesky_with_inverse(&a, "test").unwrap();
            let back = l.matmul(&l.t().unwrap()).unwrap();
            assert!(max_abs_diff(&back, &a) < 1e-8, "n={n}");
            let eye = Tensor::eye(n, DType::F64, &Device::Cpu).unwrap();
            assert!(max_abs_diff(&l.matmul(&inv).unwrap(), &eye) < 1e-8, "n={n}");
            let upper: Vec<Vec<f64>> = l.to_vec2().unwrap();
            assert!((0..n).all(|i| (i + 1..n).all(|j| upper[i][j] == 0.0)));
        }
    }

    #[test]
    fn inverse_upper_factor_satisfies_ut_u_h_equals_identity() {
        let n = 130;
        let h = spd(n, 7);
        let u = inverse_upper_cholesky(&h, "test").unwrap();
        let rows: Vec<Vec<f64>> = u.to_vec2().unwrap();
        assert!((0..n).all(|i| (0..i).all(|j| rows[i][j] == 0.0) && rows[i][i] > 0.0));
        let prod = u.t().unwrap().matmul(&u).unwrap().matmul(&h).unwrap();
        let eye = Tensor::eye(n, DType::F64, &Device::Cpu).unwrap();
        assert!(max_abs_diff(&prod, &eye) < 1e-6);
    }

    #[test]
    fn f32_inverse_upper_factor_is_the_f64_one_to_f32_accuracy() {
        let n = 150;
        // Well-conditioned, as a dampened Hessian: XᵀX plus a tenth of its mean diagonal.
        let h = spd(n, 11);
        let rows: Vec<Vec<f64>> = h.to_vec2().unwrap();
        let mean = (0..n).map(|i| rows[i][i]).sum::<f64>() / n as f64;
        let h = (h + (Tensor::eye(n, DType::F64, &Device::Cpu).unwrap() * (0.1 * mean)).unwrap())
            .unwrap();
        let u64 = inverse_upper_cholesky(&h, "test").unwrap();
        let u32 = inverse_upper_cholesky_f32(&h.to_dtype(DType::F32).unwrap(), "test").unwrap();
        assert_eq!(u32.dtype(), DType::F32);
        let rows: Vec<Vec<f32>> = u32.to_vec2().unwrap();
        assert!((0..n).all(|i| (0..i).all(|j| rows[i][j] == 0.0) && rows[i][i] > 0.0));
        let u32 = u32.to_dtype(DType::F64).unwrap();
        let scale = max_abs(&u64);
        let diff = max_abs_diff(&u32, &u64) / scale;
        // Agrees to f32 rounding, and is not the f64 result cast (it was computed in f32).
        assert!(diff < 1e-4 && diff > 0.0, "relative difference {diff:e}");
    }

    #[test]
    fn f32_factorization_matches_f64_across_the_leaf_boundary() {
        for n in [40, 100] {
            let a = spd(n, n as u64 + 3);
            let (l, inv) = cholesky_with_inverse_in(&a, DType::F32, "test").unwrap();
            assert_eq!((l.dtype(), inv.dtype()), (DType::F32, DType::F32));
            let (l64, _) = cholesky_with_inverse(&a, "test").unwrap();
            let l = l.to_dtype(DType::F64).unwrap();
            let scale = max_abs(&l64);
            assert!(max_abs_diff(&l, &l64) / scale < 1e-4, "n={n}");
        }
        let err = cholesky_with_inverse_in(&spd(4, 1), DType::BF16, "blk.0.q").unwrap_err();
        assert!(err.to_string().contains("only f32 and f64"), "{err}");
    }

    #[test]
    fn indefinite_matrix_is_reported_not_panicked() {
        let a = Tensor::new(&[[1.0f64, 2.0], [2.0, 1.0]], &Device::Cpu).unwrap();
        let err = cholesky_with_inverse(&a, "blk.0.q").unwrap_err();
        assert!(
            err.to_string().contains("blk.0.q") && err.to_string().contains("positive definite")
        );
    }
}
