//! Bit-exact mirrors of the few NumPy routines the schedules are made of.

/// `np.linspace(start, stop, num)` in float64, computed as NumPy 2.x does:
/// `y = arange(num) * step + start` with `step = (stop - start) / (num - 1)`, the
/// last element set to `stop` exactly (and `arange(num) / div * delta + start`
/// when the step underflows to zero).
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let delta = stop - start;
    let div = num - 1;
    let mut y: Vec<f64> = if div > 0 {
        let d = div as f64;
        let step = delta / d;
        if step == 0.0 {
            (0..num).map(|i| (i as f64 / d) * delta + start).collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        vec![0.0 * delta + start]
    };
    if num > 1 {
        if let Some(last) = y.last_mut() {
            *last = stop;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_midpoints() {
        let v = linspace(1.0, 0.25, 4);
        assert_eq!(v, vec![1.0, 0.75, 0.5, 0.25]);
        assert_eq!(linspace(3.0, 7.0, 1), vec![3.0]);
        assert!(linspace(0.0, 1.0, 0).is_empty());
        // The last element is `stop` itself, not start + 29 * step.
        let v = linspace(1.0, 1.0 / 30.0, 30);
        assert_eq!(v[29], 1.0 / 30.0);
        assert_eq!(v[1], 1.0 * (1.0 / 30.0 - 1.0) / 29.0 + 1.0);
    }
}
