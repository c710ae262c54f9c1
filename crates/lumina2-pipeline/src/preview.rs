//! Live previews: the current prediction of the clean image projected to RGB
//! with a fixed latent-to-RGB matrix, as ComfyUI's `Latent2RGBPreviewer` does
//! with its Flux latent format (Lumina-Image 2.0 uses the Flux VAE).
//!
//! The prediction is `x0 = latents - sigma * velocity` at the step's first
//! model evaluation; the velocity is the negated model output, so
//! `x0 = sample + sigma * output`. ComfyUI's sampler works on the scaled
//! latents (`(z - shift) * scale`, its `process_in`), and its previewer
//! applies the factors to those, as here: our latents are the same scaled
//! latents diffusers' pipeline works on.

use candle_core::{DType, Device, Tensor};

use crate::error::{invalid, Result};

/// ComfyUI `comfy/latent_formats.py`, class `Flux`: `latent_rgb_factors`
/// (one row per latent channel: R, G, B).
pub const FLUX_LATENT_RGB_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];

/// ComfyUI's Flux `latent_rgb_factors_bias`.
pub const FLUX_LATENT_RGB_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// The clean-image prediction `sample + sigma * output` (see the module docs).
pub fn predicted_x0(sample: &Tensor, model_output: &Tensor, sigma: f32) -> Result<Tensor> {
    let output = model_output.to_dtype(sample.dtype())?;
    Ok((sample + (output * f64::from(sigma))?)?)
}

/// Projects latents `[B, 16, h, w]` to one `w x h` RGB image each, as
/// ComfyUI's `preview_to_image`: `rgb = factors^T x + bias`, then
/// `((rgb + 1) / 2).clamp(0, 1) * 255` truncated to `u8`.
pub fn latents_to_rgb(latents: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = latents.dims4()?;
    if c != FLUX_LATENT_RGB_FACTORS.len() {
        return Err(invalid(
            "preview",
            format!(
                "the latent-to-RGB matrix is for {} channels, the latents have {c}",
                FLUX_LATENT_RGB_FACTORS.len()
            ),
        ));
    }
    let data = latents
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    let mut out = Vec::with_capacity(b);
    for item in data.chunks_exact((c * plane).max(1)).take(b) {
        let mut bytes = vec![0u8; plane * 3];
        for (p, px) in bytes.chunks_exact_mut(3).enumerate() {
            for (k, byte) in px.iter_mut().enumerate() {
                let mut v = FLUX_LATENT_RGB_BIAS[k];
                for (ch, row) in FLUX_LATENT_RGB_FACTORS.iter().enumerate() {
                    v += row[k] * item[ch * plane + p];
                }
                // `as u8` truncates like torch's `.to(torch.uint8)`.
                *byte = (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8;
            }
        }
        let img = image::RgbImage::from_raw(w as u32, h as u32, bytes)
            .ok_or_else(|| invalid("preview", format!("{w}x{h} does not fit an image")))?;
        out.push(img);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_latents_give_the_bias_colour() -> Result<()> {
        let z = Tensor::zeros((1, 16, 2, 3), DType::F32, &Device::Cpu)?;
        let imgs = latents_to_rgb(&z)?;
        assert_eq!(imgs[0].dimensions(), (3, 2));
        // ((-0.0329 + 1) / 2) * 255 = 123.3 -> 123, and so on.
        assert_eq!(imgs[0].get_pixel(2, 1).0, [123, 118, 116]);
        Ok(())
    }

    #[test]
    fn one_channel_maps_through_its_row() -> Result<()> {
        let mut v = vec![0f32; 16];
        v[12] = 5.0;
        let t = Tensor::from_vec(v, (1, 16, 1, 1), &Device::Cpu)?;
        let px = latents_to_rgb(&t)?[0].get_pixel(0, 0).0;
        let expect = |k: usize| {
            (((FLUX_LATENT_RGB_BIAS[k] + 5.0 * FLUX_LATENT_RGB_FACTORS[12][k] + 1.0) / 2.0) * 255.0)
                as u8
        };
        assert_eq!(px, [expect(0), expect(1), expect(2)]);
        Ok(())
    }

    #[test]
    fn x0_is_sample_plus_sigma_times_output() -> Result<()> {
        let dev = Device::Cpu;
        let s = Tensor::new(&[1f32, 2.], &dev)?;
        let o = Tensor::new(&[0.5f32, -1.], &dev)?;
        let x0 = predicted_x0(&s, &o, 0.5)?.to_vec1::<f32>()?;
        assert_eq!(x0, vec![1.25, 1.5]);
        Ok(())
    }

    /// A 1024x1024 image's preview (128x128 latents): the prediction, the
    /// projection and the PNG, written and read back at latent resolution.
    /// The time is printed (`--nocapture`) for the READMEs, not asserted: a
    /// shared machine's timings are no test.
    #[test]
    fn a_1024_px_preview_is_a_latent_sized_png() -> Result<()> {
        let dev = Device::Cpu;
        let sample = Tensor::randn(0f32, 1., (1, 16, 128, 128), &dev)?;
        let output = Tensor::randn(0f32, 1., (1, 16, 128, 128), &dev)?;
        let path = std::env::temp_dir().join(format!("lumina2-preview-{}.png", std::process::id()));
        let start = std::time::Instant::now();
        let x0 = predicted_x0(&sample, &output, 0.5)?;
        let img = latents_to_rgb(&x0)?.remove(0);
        img.save(&path)
            .map_err(|e| invalid("preview", e.to_string()))?;
        let took = start.elapsed();
        eprintln!("1024 px preview (prediction, projection, PNG): {took:?}");
        let back = image::open(&path)
            .map_err(|e| invalid("preview", e.to_string()))?
            .to_rgb8();
        std::fs::remove_file(&path).ok();
        assert_eq!((back.width(), back.height()), (128, 128));
        assert_eq!(back.as_raw(), img.as_raw());
        Ok(())
    }

    #[test]
    fn other_channel_counts_are_refused() {
        let z = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(latents_to_rgb(&z).is_err());
    }
}
