//! Post-processing as diffusers' `VaeImageProcessor.postprocess` does.

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::error::{input_err, Result};

fn check(images: &Tensor) -> Result<(usize, usize, usize)> {
    if images.rank() != 4 {
        return Err(input_err(
            "images",
            format!("rank {}, expected 4 [b, 3, h, w]", images.rank()),
        ));
    }
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(input_err("images", format!("{c} channels, expected 3")));
    }
    if !images.dtype().is_float() {
        return Err(input_err("images", format!("dtype {:?}", images.dtype())));
    }
    Ok((b, h, w))
}

/// Decoder output [b, 3, h, w] to [b, h, w, 3] f32 in [0, 1]:
/// `(x * 0.5 + 0.5).clamp(0, 1)` in the tensor's dtype, then f32 (diffusers'
/// `output_type="np"`).
pub fn denormalize(images: &Tensor) -> Result<Tensor> {
    check(images)?;
    let x = images.affine(0.5, 0.5)?.clamp(0f32, 1f32)?;
    Ok(x.permute((0, 2, 3, 1))?
        .to_dtype(DType::F32)?
        .contiguous()?)
}

/// 8-bit value of a denormalized f32: `(x * 255).round()` with numpy's
/// round-half-to-even, then `astype(uint8)` (NaN gives 0).
pub fn to_u8(x: f32) -> u8 {
    (x * 255f32).round_ties_even() as u8
}

/// Decoder output [b, 3, h, w] to 8-bit RGB images, exactly as diffusers'
/// `postprocess(output_type="pil")`.
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, h, w) = check(images)?;
    let data = denormalize(images)?.flatten_all()?.to_vec1::<f32>()?;
    let per = h * w * 3;
    let mut out = Vec::with_capacity(b);
    for chunk in data.chunks_exact(per.max(1)).take(b) {
        let bytes: Vec<u8> = chunk.iter().copied().map(to_u8).collect();
        let img = RgbImage::from_raw(w as u32, h as u32, bytes)
            .ok_or_else(|| input_err("images", format!("{w}x{h} does not fit an image buffer")))?;
        out.push(img);
    }
    Ok(out)
}
