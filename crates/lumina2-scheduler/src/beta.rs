//! The Beta distribution's quantile function (what `scipy.stats.beta.ppf` gives
//! diffusers' beta sigmas), from the regularized incomplete beta function.

/// `ln Γ(x)` for `x > 0`: Lanczos approximation (g = 7, 9 terms), with the
/// reflection formula below 0.5; relative error about 1e-15.
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Γ(x) Γ(1 - x) = π / sin(πx)
        let s = (std::f64::consts::PI * x).sin();
        return (std::f64::consts::PI / s).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// `ln B(a, b)`.
pub fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// Continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const FPMIN: f64 = 1e-300;
    const EPS: f64 = 1e-17;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < FPMIN {
        d = FPMIN;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < FPMIN {
            d = FPMIN;
        }
        c = 1.0 + aa / c;
        if c.abs() < FPMIN {
            c = FPMIN;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < FPMIN {
            d = FPMIN;
        }
        c = 1.0 + aa / c;
        if c.abs() < FPMIN {
            c = FPMIN;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() <= EPS {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function `I_x(a, b)` and its complement
/// `1 - I_x(a, b)`, each computed directly where it is the small one (so both
/// keep their relative accuracy). `a, b > 0`, `x` in [0, 1].
pub fn inc_beta_pair(x: f64, a: f64, b: f64) -> (f64, f64) {
    if x <= 0.0 {
        return (0.0, 1.0);
    }
    if x >= 1.0 {
        return (1.0, 0.0);
    }
    let front = (a * x.ln() + b * (-x).ln_1p() - ln_beta(a, b)).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        let i = front * beta_cf(a, b, x) / a;
        (i, 1.0 - i)
    } else {
        let j = front * beta_cf(b, a, 1.0 - x) / b;
        (1.0 - j, j)
    }
}

/// Solves `I_x(a, b) = p` for `p` in (0, 0.5]: safeguarded Newton iteration
/// inside a shrinking bracket.
fn lower_quantile(p: f64, a: f64, b: f64) -> f64 {
    let lb = ln_beta(a, b);
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    // I_x ~ x^a / (a B(a, b)) for small x.
    let mut x = ((p * a).ln() + lb).exp().powf(1.0 / a);
    if !x.is_finite() || x <= lo || x >= hi {
        x = 0.5;
    }
    for _ in 0..400 {
        let (i, _) = inc_beta_pair(x, a, b);
        let f = i - p;
        if f == 0.0 {
            return x;
        }
        if f < 0.0 {
            lo = x;
        } else {
            hi = x;
        }
        let dens = ((a - 1.0) * x.ln() + (b - 1.0) * (-x).ln_1p() - lb).exp();
        let mut next = x - f / dens;
        if !next.is_finite() || next <= lo || next >= hi {
            next = 0.5 * (lo + hi);
        }
        if (next - x).abs() <= 2.0 * f64::EPSILON * next.abs() || next == lo || next == hi {
            return next;
        }
        x = next;
    }
    x
}

/// The quantile function (inverse CDF) of Beta(a, b) at `p`, as
/// `scipy.stats.beta.ppf(p, a, b)`: 0 at p <= 0, 1 at p >= 1. The upper half is
/// solved through the symmetry `I_x(a, b) = 1 - I_{1-x}(b, a)` so that both
/// tails are accurate.
pub fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p.is_nan() {
        return f64::NAN;
    }
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    if p <= 0.5 {
        lower_quantile(p, a, b)
    } else {
        1.0 - lower_quantile(1.0 - p, b, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_known_values() {
        // Γ(1) = Γ(2) = 1, Γ(1/2) = sqrt(π), Γ(5) = 24.
        assert!(ln_gamma(1.0).abs() < 1e-15);
        assert!(ln_gamma(2.0).abs() < 1e-15);
        let half = std::f64::consts::PI.sqrt().ln();
        assert!((ln_gamma(0.5) - half).abs() < 1e-15);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-14);
        assert!((ln_gamma(0.25) - 3.625_609_908_221_908_f64.ln()).abs() < 1e-14);
    }

    #[test]
    fn incomplete_beta_closed_forms() {
        for &x in &[1e-6, 0.1, 0.3, 0.5, 0.77, 0.999] {
            // I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(1/2, 1/2) = (2/π) asin(sqrt x).
            let (i, c) = inc_beta_pair(x, 1.0, 1.0);
            assert!((i - x).abs() < 1e-15 && (i + c - 1.0).abs() < 1e-15);
            let (i, _) = inc_beta_pair(x, 2.5, 1.0);
            assert!((i - x.powf(2.5)).abs() <= 1e-14 * x.powf(2.5));
            let arcsine = 2.0 / std::f64::consts::PI * x.sqrt().asin();
            let (i, _) = inc_beta_pair(x, 0.5, 0.5);
            assert!(
                (i - arcsine).abs() <= 1e-14 * arcsine,
                "{x}: {i} vs {arcsine}"
            );
        }
    }

    #[test]
    fn ppf_inverts_the_cdf() {
        // Arcsine distribution: ppf(p) = sin²(πp/2).
        for k in 1..50 {
            let p = k as f64 / 50.0;
            let want = (std::f64::consts::FRAC_PI_2 * p).sin().powi(2);
            let got = beta_ppf(p, 0.5, 0.5);
            assert!((got - want).abs() < 1e-14, "{p}: {got} vs {want}");
        }
        for k in 0..=40 {
            let p = k as f64 / 40.0;
            let x = beta_ppf(p, 0.6, 0.6);
            let (i, _) = inc_beta_pair(x, 0.6, 0.6);
            assert!((i - p).abs() < 1e-14, "{p}: I({x}) = {i}");
            // Symmetry of Beta(a, a).
            assert!((x + beta_ppf(1.0 - p, 0.6, 0.6) - 1.0).abs() < 1e-14);
        }
        assert_eq!(beta_ppf(0.0, 0.6, 0.6), 0.0);
        assert_eq!(beta_ppf(1.0, 0.6, 0.6), 1.0);
        assert!(beta_ppf(f64::NAN, 0.6, 0.6).is_nan());
    }
}
