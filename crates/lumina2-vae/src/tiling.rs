//! Tiled decoding and encoding, the algorithm of diffusers' `AutoencoderKL`
//! (`tiled_decode`, `_tiled_encode`, `blend_v`, `blend_h`), processed one row
//! of tiles at a time so that only two rows of tiles are held besides the output.

use candle_core::{DType, Tensor};

use crate::config::AutoencoderKLConfig;
use crate::error::{Result, VaeError};

/// Tile sizes of tiled encoding and decoding (diffusers' `enable_tiling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// Image tile size (`tile_sample_min_size`): encoding tiles images larger
    /// than this, and decoded tiles are this large.
    pub sample_tile: usize,
    /// Latent tile size (`tile_latent_min_size`): decoding tiles latents
    /// larger than this.
    pub latent_tile: usize,
    /// Fraction of a tile that overlaps its neighbour (`tile_overlap_factor`).
    pub overlap_factor: f64,
}

impl Tiling {
    /// diffusers' defaults: `sample_size`, `sample_size / 2^(levels - 1)`, 0.25.
    pub fn from_config(cfg: &AutoencoderKLConfig) -> Self {
        Self {
            sample_tile: cfg.sample_size,
            latent_tile: cfg.sample_size / cfg.downsample_factor(),
            overlap_factor: 0.25,
        }
    }

    /// (stride between tiles in the input, blend extent in the output, output
    /// rows kept per tile), as `int()` of diffusers' float expressions.
    fn geometry(&self, in_tile: usize, out_tile: usize) -> Result<(usize, usize, usize)> {
        let f = self.overlap_factor;
        if !(0.0..1.0).contains(&f) {
            return Err(VaeError::Config(format!("tile overlap factor {f}")));
        }
        let stride = (in_tile as f64 * (1.0 - f)) as usize;
        let blend = (out_tile as f64 * f) as usize;
        if stride == 0 || out_tile == 0 {
            return Err(VaeError::Config(format!(
                "tiles of {in_tile} -> {out_tile} with overlap {f} do not advance"
            )));
        }
        Ok((stride, blend, out_tile - blend))
    }
}

/// The weighted sum `a * wa + b * wb` for f32 weights along `dim` with the
/// rounding of PyTorch (each product stored in the tensors' dtype).
fn weighted(a: &Tensor, b: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
    let dtype = b.dtype();
    let mut shape = vec![1usize; 4];
    shape[dim] = extent;
    let wb: Vec<f32> = (0..extent)
        .map(|y| (y as f64 / extent as f64) as f32)
        .collect();
    let wa: Vec<f32> = (0..extent)
        .map(|y| (1.0 - y as f64 / extent as f64) as f32)
        .collect();
    let wa = Tensor::from_vec(wa, shape.as_slice(), b.device())?;
    let wb = Tensor::from_vec(wb, shape.as_slice(), b.device())?;
    let pa = a
        .to_dtype(DType::F32)?
        .broadcast_mul(&wa)?
        .to_dtype(dtype)?;
    let pb = b
        .to_dtype(DType::F32)?
        .broadcast_mul(&wb)?
        .to_dtype(dtype)?;
    Ok((pa + pb)?)
}

fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (na, nb) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(na).min(nb);
    if e == 0 {
        return Ok(b.clone());
    }
    let mixed = weighted(&a.narrow(dim, na - e, e)?, &b.narrow(dim, 0, e)?, dim, e)?;
    if e == nb {
        return Ok(mixed);
    }
    Ok(Tensor::cat(&[mixed, b.narrow(dim, e, nb - e)?], dim)?)
}

/// diffusers' `blend_v`: the first `extent` rows of `b` fade in from the last
/// rows of `a` (the tile above). Returns the blended `b`.
pub fn blend_v(a: &Tensor, b: &Tensor, extent: usize) -> Result<Tensor> {
    blend(a, b, extent, 2)
}

/// diffusers' `blend_h`: the first `extent` columns of `b` fade in from the
/// last columns of `a` (the tile on the left). Returns the blended `b`.
pub fn blend_h(a: &Tensor, b: &Tensor, extent: usize) -> Result<Tensor> {
    blend(a, b, extent, 3)
}

/// Runs `f` on overlapping tiles of `x` [b, c, h, w] of `in_tile` size and
/// blends the outputs (tiles of `out_tile` size at most) as diffusers does.
pub(crate) fn tiled<F>(
    x: &Tensor,
    in_tile: usize,
    out_tile: usize,
    t: &Tiling,
    f: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    let (stride, blend_extent, row_limit) = t.geometry(in_tile, out_tile)?;
    let (_, _, h, w) = x.dims4()?;
    let mut above: Vec<Tensor> = Vec::new();
    let mut result_rows = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row: Vec<Tensor> = Vec::new();
        for (jj, j) in (0..w).step_by(stride).enumerate() {
            let tile = x.narrow(2, i, in_tile.min(h - i))?;
            let tile = tile.narrow(3, j, in_tile.min(w - j))?;
            let mut out = f(&tile)?;
            if let Some(a) = above.get(jj) {
                out = blend_v(a, &out, blend_extent)?;
            }
            if let Some(left) = row.last() {
                out = blend_h(left, &out, blend_extent)?;
            }
            row.push(out);
        }
        let cropped = row
            .iter()
            .map(|t| {
                let (_, _, th, tw) = t.dims4()?;
                Ok(t.narrow(2, 0, row_limit.min(th))?
                    .narrow(3, 0, row_limit.min(tw))?)
            })
            .collect::<Result<Vec<_>>>()?;
        result_rows.push(Tensor::cat(&cropped, 3)?);
        above = row;
    }
    Ok(Tensor::cat(&result_rows, 2)?)
}
