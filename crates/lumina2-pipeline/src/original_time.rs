//! The Alpha-VLLM sampler's model times, bit for bit, for
//! [`GuidanceMode::Original`](crate::GuidanceMode::Original).
//!
//! The original integrates over `t = torch.linspace(0, 1, steps + 1)` (float32,
//! `transport/integrators.py` line 99) shifted by `t / (t + s - s * t)`
//! (line 101, float32 tensor arithmetic) and hands the model the grid point
//! `t0`, or for the midpoint's second evaluation `t0 + 0.5 * (t1 - t0)`
//! (torchdiffeq's fixed-grid `Midpoint._step_func`). diffusers' sigmas give
//! the same times in exact arithmetic but not in float32, and the guidance
//! truncation `t < cfg_trunc` compares float32 values: a ratio that falls on
//! a grid point decides differently unless the times are the original's.

/// The shifted grid of `steps + 1` model times, from 0 (noise) to 1 (clean):
/// `torch.linspace(0, 1, steps + 1)` ([`crate::torch_linspace`]), shifted.
pub fn time_grid(steps: usize, shift: f32) -> Vec<f32> {
    crate::torch_linspace::linspace_f32(0.0, 1.0, steps + 1)
        .into_iter()
        // Three float32 tensor ops, rounded one by one.
        .map(|t| t / ((t + shift) - shift * t))
        .collect()
}

/// The model time of evaluation `stage` of step `step` on `grid`: the grid
/// point, or the midpoint's `t0 + 0.5 * (t1 - t0)`. `None` past the last step.
pub fn model_time(grid: &[f32], step: usize, stage: usize) -> Option<f32> {
    let (t0, t1) = (*grid.get(step)?, *grid.get(step + 1)?);
    if stage == 0 {
        return Some(t0);
    }
    Some(t0 + 0.5 * (t1 - t0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn grid_is_torchs_bit_for_bit() {
        // torch 2.15 (CPU): t = torch.linspace(0, 1, N + 1); t / (t + 6.0 - 6.0 * t).
        assert_eq!(
            bits(&time_grid(4, 6.0)),
            [0x0, 0x3d579436, 0x3e124925, 0x3eaaaaab, 0x3f800000]
        );
        assert_eq!(
            bits(&time_grid(17, 6.0)),
            [
                0x0, 0x3c28e83f, 0x3cb21643, 0x3d0d3dcb, 0x3d47ce0c, 0x3d84fcae, 0x3daaaaac,
                0x3dd5f85c, 0x3e042109, 0x3e21af29, 0x3e44ec4f, 0x3e6fa8da, 0x3e924925, 0x3eb3e455,
                0x3ee00001, 0x3f0e38e6, 0x3f3a2e8e, 0x3f800000
            ]
        );
    }

    #[test]
    fn midpoint_time_lies_between_grid_points() {
        let g = time_grid(4, 6.0);
        assert_eq!(model_time(&g, 1, 0), Some(g[1]));
        let mid = model_time(&g, 1, 1).unwrap_or(f32::NAN);
        assert!(g[1] < mid && mid < g[2]);
        assert_eq!(model_time(&g, 4, 0), None);
        assert_eq!(model_time(&g, 3, 1), Some(g[3] + 0.5 * (g[4] - g[3])));
    }
}
