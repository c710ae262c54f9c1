//! `torch.linspace` in float32 on the CPU, bit for bit.
//!
//! PyTorch's CPU kernel computes `step = (end - start) / (steps - 1)` in
//! float32, then `start + step * i` for the first half of the points and
//! `end - step * (steps - 1 - i)` for the second, each with one rounding (the
//! kernel's multiply-add is fused). Z-Image's default sigmas and the
//! Alpha-VLLM sampler's time grid are both such linspaces.

/// `torch.linspace(start, end, steps)` (float32, CPU).
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_torch_bits() {
        // torch 2.15 (CPU): torch.linspace(1.0, 1 / n, n) and linspace(0, 1, 5).
        let bits = |n: usize| -> Vec<u32> {
            linspace_f32(1.0, (1.0 / n as f64) as f32, n)
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(
            bits(7),
            [0x3f800000, 0x3f5b6db7, 0x3f36db6e, 0x3f124925, 0x3edb6db8, 0x3e924925, 0x3e124925]
        );
        assert_eq!(
            bits(9),
            [
                0x3f800000, 0x3f638e39, 0x3f471c72, 0x3f2aaaab, 0x3f0e38e4, 0x3ee38e39, 0x3eaaaaab,
                0x3e638e39, 0x3de38e39
            ]
        );
        let g: Vec<f32> = linspace_f32(0.0, 1.0, 5);
        assert_eq!(g, [0.0, 0.25, 0.5, 0.75, 1.0]);
    }
}
