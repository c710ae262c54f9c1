//! `--image`, `--mask-image` and `--strength`: image-to-image and inpainting
//! from the command line (the library's `ImageToImage`), for both pipelines.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use lumina2_pipeline::{source_image, GenerateOptions, ImageToImage};

/// The init image options of `lumina2 generate`.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct InitImageArgs {
    /// Start from this PNG image (image-to-image). Width and height default to
    /// its size rounded down to a multiple of 16; it is resized (Lanczos, as
    /// diffusers) to the output size (Z-Image: to that rounded size, which a
    /// given width and height must equal, as diffusers' Z-Image pipelines).
    #[arg(long, conflicts_with = "from_file")]
    pub(crate) image: Option<PathBuf>,
    /// Inpainting mask, a PNG of any size (resized to the output size as the
    /// image, Lanczos): white is repainted, black kept (made grey as PIL's
    /// convert("L"), then cut at 50%).
    #[arg(long, requires = "image")]
    pub(crate) mask_image: Option<PathBuf>,
    /// How much of the schedule runs with --image, above 0 and at most 1
    /// (1: from pure noise). Default 0.6; 1 for Z-Image inpainting (the
    /// defaults of the diffusers pipelines).
    #[arg(long, requires = "image")]
    pub(crate) strength: Option<f64>,
}

/// The strength of Lumina2 runs (`FluxImg2ImgPipeline`'s and
/// `FluxInpaintPipeline`'s default) and of Z-Image image-to-image.
pub(crate) const DEFAULT_STRENGTH: f64 = 0.6;

impl InitImageArgs {
    /// `--strength`, or `default` when not given.
    pub(crate) fn strength_or(&self, default: f64) -> f64 {
        self.strength.unwrap_or(default)
    }
}

/// Reads `--image` and `--mask-image` (of any size) into the library's
/// request, with `--strength` or `default_strength`; `None` without `--image`.
pub(crate) fn read_request(
    args: &InitImageArgs,
    default_strength: f64,
) -> Result<Option<ImageToImage>> {
    let Some(path) = &args.image else {
        return Ok(None);
    };
    let image = read("--image", path)?;
    let mask = args
        .mask_image
        .as_deref()
        .map(|m| read("--mask-image", m))
        .transpose()?;
    Ok(Some(ImageToImage {
        image,
        mask,
        strength: args.strength_or(default_strength),
    }))
}

/// Reads the image and mask into `o` and sizes the output after the image
/// when width or height are not given (with a warning when rounding changes them).
pub(crate) fn apply(args: &InitImageArgs, o: &mut GenerateOptions) -> Result<()> {
    let Some(request) = read_request(args, DEFAULT_STRENGTH)? else {
        return Ok(());
    };
    let (w, h) = (
        request.image.width() as usize,
        request.image.height() as usize,
    );
    let round = |v: usize| v - v % lumina2_pipeline::options::SIZE_MULTIPLE;
    if o.width.is_none() {
        o.width = Some(round(w));
    }
    if o.height.is_none() {
        o.height = Some(round(h));
    }
    if (o.width, o.height) != (Some(w), Some(h)) {
        tracing::warn!(
            "--image {} is {w}x{h}: resized to {}x{} (Lanczos)",
            args.image.as_deref().unwrap_or(Path::new("")).display(),
            o.width.unwrap_or(w),
            o.height.unwrap_or(h)
        );
    }
    o.image_to_image = Some(request);
    Ok(())
}

fn read(flag: &str, path: &Path) -> Result<image::RgbImage> {
    source_image::read_rgb(path).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

/// PNG metadata of an image-to-image run: the source file names and the
/// strength (`default_strength` when not given).
pub(crate) fn metadata(args: &InitImageArgs, default_strength: f64) -> Vec<(String, String)> {
    let Some(image) = &args.image else {
        return Vec::new();
    };
    let name = |p: &Path| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let mut m = vec![
        ("source_image".to_string(), name(image)),
        (
            "strength".to_string(),
            args.strength_or(default_strength).to_string(),
        ),
    ];
    if let Some(mask) = &args.mask_image {
        m.push(("mask_image".to_string(), name(mask)));
    }
    m
}
