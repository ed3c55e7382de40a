//! The Frechet distance between two Gaussians fitted to feature sets, the FID of Heusel et al. (2017):
//!
//!   d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})
//!
//! S_1 S_2 is not symmetric, but its eigenvalues are real and non-negative: they are those of a
//! symmetric positive semi-definite matrix, so tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i), with the
//! eigenvalues from a symmetric eigen-decomposition in f64. No general matrix square root (which goes
//! complex on round-off, as scipy's `sqrtm` does on singular covariances) is needed:
//!
//! - When one set has fewer images n than features d (500 samples of 2048 Inception features), its
//!   covariance is S_2 = C^T C / (n - 1) with C its n x d centred features, and the non-zero
//!   eigenvalues of S_1 S_2 = (S_1 C^T)(C / (n - 1)) are those of the n x n matrix
//!   C S_1 C^T / (n - 1) (XY and YX share them): one small eigen-decomposition, exact for a
//!   singular S_2.
//! - Otherwise S_1 S_2 is similar to M = S_1^{1/2} S_2 S_1^{1/2}, with S_1^{1/2} from the
//!   eigen-decomposition of S_1.
//!
//! Eigenvalues within round-off of zero (below d eps lambda_max, the rank cut-off of
//! `numpy.linalg.matrix_rank`) are taken as zero: their square roots would turn round-off into
//! distance.

use anyhow::{bail, Result};
use nalgebra::{DMatrix, DVector};

/// The mean and covariance of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// The mean feature, mu.
    pub mean: DVector<f64>,
    /// The unbiased covariance S = sum_i (x_i - mu)(x_i - mu)^T / (n - 1), as `numpy.cov` computes it.
    pub cov: DMatrix<f64>,
    /// How many vectors the statistics were taken over.
    pub count: usize,
    /// The centred features C (count x dim, rows x_i - mu), kept when there are fewer vectors than
    /// dimensions, for the low-rank form of the trace (see the module docs).
    pub centred: Option<DMatrix<f64>>,
}

impl FeatureStats {
    /// The statistics of `n` feature vectors of length `dim`, stored one after the other in `features`.
    /// Needs at least two vectors (a covariance of one vector is undefined).
    pub fn from_features(features: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 || !features.len().is_multiple_of(dim) {
            bail!("features: {} values are not whole vectors of length {dim}", features.len());
        }
        let n = features.len() / dim;
        if n < 2 {
            bail!("features: a covariance needs at least 2 images, got {n}");
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            bail!("features: image {} has a non-finite feature ({})", i / dim, features[i]);
        }
        // X is n x dim; mu = X^T 1 / n; S = (X - 1 mu^T)^T (X - 1 mu^T) / (n - 1)
        let x = DMatrix::from_row_iterator(n, dim, features.iter().map(|&v| v as f64));
        let mean = DVector::from_iterator(dim, x.column_iter().map(|c| c.sum() / n as f64));
        let mut centred = x;
        for mut row in centred.row_iter_mut() {
            row -= mean.transpose();
        }
        let cov = centred.tr_mul(&centred) / (n - 1) as f64;
        let centred = (n < dim).then_some(centred);
        Ok(FeatureStats { mean, cov, count: n, centred })
    }

    /// The feature dimension.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }
}

/// The eigenvalues of a symmetric positive semi-definite matrix, those within round-off of zero
/// (below d eps lambda_max) set to zero.
fn psd_eigenvalues(a: &DMatrix<f64>) -> DVector<f64> {
    let l = symmetric(a).symmetric_eigenvalues();
    cut_round_off(l, a.nrows())
}

/// Sets eigenvalues below d eps lambda_max (negative ones included) to zero.
fn cut_round_off(l: DVector<f64>, d: usize) -> DVector<f64> {
    let tol = d as f64 * f64::EPSILON * l.max().max(0.0);
    l.map(|v| if v > tol { v } else { 0.0 })
}

/// The symmetric square root A^{1/2} = V diag(sqrt(lambda)) V^T of a symmetric positive
/// semi-definite matrix A = V diag(lambda) V^T (eigenvalues within round-off of zero taken as zero).
pub fn sqrt_psd(a: &DMatrix<f64>) -> DMatrix<f64> {
    let eig = symmetric(a).symmetric_eigen();
    let roots = cut_round_off(eig.eigenvalues, a.nrows()).map(f64::sqrt);
    let v = &eig.eigenvectors;
    // V diag(r) V^T: scale the columns of V, then multiply by V^T
    let mut scaled = v.clone();
    for (mut col, r) in scaled.column_iter_mut().zip(roots.iter()) {
        col *= *r;
    }
    scaled * v.transpose()
}

/// (A + A^T) / 2: removes the round-off asymmetry of a product that is symmetric in exact arithmetic.
fn symmetric(a: &DMatrix<f64>) -> DMatrix<f64> {
    (a + a.transpose()) * 0.5
}

/// tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(S_1^{1/2} S_2 S_1^{1/2})), from the covariances alone.
pub fn trace_sqrt_product(s1: &DMatrix<f64>, s2: &DMatrix<f64>) -> f64 {
    let r = sqrt_psd(s1);
    psd_eigenvalues(&(&r * s2 * &r)).iter().map(|l| l.sqrt()).sum()
}

/// tr((S_1 S_2)^{1/2}) with S_2 = C^T C / (n - 1) given by its n x d centred features C:
/// sum_i sqrt(lambda_i(C S_1 C^T / (n - 1))), an n x n eigenvalue problem.
pub fn trace_sqrt_product_low_rank(s1: &DMatrix<f64>, c: &DMatrix<f64>) -> f64 {
    let n = c.nrows();
    let m = c * s1 * c.transpose() / (n.max(2) - 1) as f64;
    psd_eigenvalues(&m).iter().map(|l| l.sqrt()).sum()
}

/// The Frechet distance d^2 between N(mu_1, S_1) and N(mu_2, S_2) (the FID when the statistics are
/// of Inception features; the same formula on any features).
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    if a.dim() != b.dim() {
        bail!("features of different sizes ({} and {}): statistics from different networks", a.dim(), b.dim());
    }
    let diff = &a.mean - &b.mean;
    // |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})
    // tr((S_1 S_2)^{1/2}) = tr((S_2 S_1)^{1/2}): through the smaller set's features where it has
    // fewer images than dimensions
    let smaller = [(a, b), (b, a)].into_iter().filter_map(|(x, y)| Some((x.centred.as_ref()?, y))).min_by_key(|(c, _)| c.nrows());
    let tr_sqrt = match smaller {
        Some((c, other)) => trace_sqrt_product_low_rank(&other.cov, c),
        None => trace_sqrt_product(&a.cov, &b.cov),
    };
    let d2 = diff.dot(&diff) + a.cov.trace() + b.cov.trace() - 2.0 * tr_sqrt;
    // round-off can leave a tiny negative value for two equal distributions
    Ok(d2.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mean: &[f64], cov: DMatrix<f64>) -> FeatureStats {
        FeatureStats { mean: DVector::from_column_slice(mean), cov, count: 100, centred: None }
    }

    /// A rotation of the plane by `a` radians, embedded in the first two of `n` dimensions.
    fn rotation(n: usize, a: f64) -> DMatrix<f64> {
        let mut r = DMatrix::identity(n, n);
        r[(0, 0)] = a.cos();
        r[(0, 1)] = -a.sin();
        r[(1, 0)] = a.sin();
        r[(1, 1)] = a.cos();
        r
    }

    #[test]
    fn one_dimension_is_the_closed_form() {
        // d^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
        let a = stats(&[1.5], DMatrix::from_element(1, 1, 4.0));
        let b = stats(&[-0.5], DMatrix::from_element(1, 1, 0.25));
        let want = 2.0f64.powi(2) + (2.0f64 - 0.5).powi(2);
        assert!((frechet_distance(&a, &b).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn commuting_covariances_are_the_closed_form() {
        // S_i = R diag(d_i) R^T with one rotation: tr((S_1 S_2)^{1/2}) = sum sqrt(d_1 d_2), so
        // d^2 = |mu_1 - mu_2|^2 + sum (sqrt(d_1) - sqrt(d_2))^2
        let r = rotation(3, 0.7);
        let (d1, d2) = ([4.0, 1.0, 9.0], [1.0, 0.0, 2.25]);
        let s = |d: &[f64; 3]| &r * DMatrix::from_diagonal(&DVector::from_column_slice(d)) * r.transpose();
        let a = stats(&[0.0, 1.0, 2.0], s(&d1));
        let b = stats(&[1.0, 1.0, 0.0], s(&d2));
        let want = 1.0 + 4.0 + d1.iter().zip(&d2).map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2)).sum::<f64>();
        assert!((frechet_distance(&a, &b).unwrap() - want).abs() < 1e-10, "{}", frechet_distance(&a, &b).unwrap());
    }

    #[test]
    fn two_by_two_non_commuting_matches_the_closed_form() {
        // For a 2x2 matrix X with eigenvalues l1, l2 >= 0: tr(X^{1/2}) = sqrt(l1) + sqrt(l2)
        // = sqrt(tr X + 2 sqrt(det X)); with X = S_1 S_2, det X = det S_1 det S_2.
        let s1: DMatrix<f64> = DMatrix::from_row_slice(2, 2, &[2.0, 0.6, 0.6, 1.0]);
        let s2: DMatrix<f64> = DMatrix::from_row_slice(2, 2, &[0.5, -0.3, -0.3, 3.0]);
        let want = ((&s1 * &s2).trace() + 2.0 * (s1.determinant() * s2.determinant()).sqrt()).sqrt();
        assert!((trace_sqrt_product(&s1, &s2) - want).abs() < 1e-12);
    }

    #[test]
    fn singular_covariances_and_self_distance() {
        // rank-1 covariances (fewer samples than dimensions): S_1 = u u^T, S_2 = v v^T give
        // tr((S_1 S_2)^{1/2}) = |u . v|
        let u = DVector::from_column_slice(&[1.0, 2.0, 0.0, -1.0]);
        let v = DVector::from_column_slice(&[0.5, -1.0, 3.0, 2.0]);
        let (s1, s2) = (&u * u.transpose(), &v * v.transpose());
        let got = trace_sqrt_product(&s1, &s2);
        assert!((got - u.dot(&v).abs()).abs() < 1e-12, "{got} vs {}", u.dot(&v).abs());
        let a = stats(&[0.0; 4], s1);
        assert!(frechet_distance(&a, &a).unwrap() < 1e-9);
    }

    #[test]
    fn the_low_rank_form_equals_the_full_one() {
        // 3 and 5 vectors of 6 features (both covariances singular): the distance through the
        // centred features (3 x 3 or 5 x 5 problems) equals the one through S_1^{1/2} (6 x 6), and
        // that of a set to itself is 0
        let mut rng = ddpm_core::NoiseRng::new(3);
        let (x, y) = (rng.normal_vec(3 * 6), rng.normal_vec(5 * 6));
        let (a, b) = (FeatureStats::from_features(&x, 6).unwrap(), FeatureStats::from_features(&y, 6).unwrap());
        assert!(a.centred.is_some() && b.centred.is_some());
        let full = |s: &FeatureStats| FeatureStats { centred: None, ..s.clone() };
        let (fast, slow) = (frechet_distance(&a, &b).unwrap(), frechet_distance(&full(&a), &full(&b)).unwrap());
        assert!((fast - slow).abs() < 1e-10 * slow, "{fast} vs {slow}");
        assert!(frechet_distance(&a, &a).unwrap() < 1e-10);
        assert!(frechet_distance(&full(&a), &full(&a)).unwrap() < 1e-10);
    }

    #[test]
    fn statistics_are_numpys_mean_and_unbiased_covariance() {
        // three 2-d points: mean (2, 1); deviations (-1, -1), (0, 0), (1, 1) -> cov [[1, 1], [1, 1]]
        let s = FeatureStats::from_features(&[1.0, 0.0, 2.0, 1.0, 3.0, 2.0], 2).unwrap();
        assert_eq!(s.mean.as_slice(), &[2.0, 1.0]);
        assert_eq!(s.cov, DMatrix::from_row_slice(2, 2, &[1.0, 1.0, 1.0, 1.0]));
        assert!(FeatureStats::from_features(&[1.0, 2.0], 2).unwrap_err().to_string().contains("at least 2"));
        assert!(FeatureStats::from_features(&[1.0, f32::NAN, 0.0, 0.0], 2).unwrap_err().to_string().contains("image 0"));
    }
}
