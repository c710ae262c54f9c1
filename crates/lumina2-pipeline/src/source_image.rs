//! Reading an init image or mask as diffusers' `load_image` does
//! (`PIL.Image.open(path).convert("RGB")`), for PNG files: every PNG colour
//! type and bit depth becomes 8-bit RGB with PIL's rules, and the pixel count
//! is bounded from the header before anything is decoded.

use std::io::{BufReader, Cursor};
use std::path::Path;

use image::RgbImage;

use crate::error::{Error, Result};

/// The most pixels an input image may have: PIL's `Image.MAX_IMAGE_PIXELS`
/// (about 9459 x 9459), past which PIL warns of a decompression bomb. A
/// 16-bit RGBA image of this size decodes to 716 MB.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// The largest image file read (a PNG of [`MAX_IMAGE_PIXELS`] compresses far below it).
pub const MAX_IMAGE_FILE_BYTES: u64 = 1 << 30;

/// Reads a PNG file as 8-bit RGB ([`decode_rgb`]); errors name the file.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let file_err = |reason: String| Error::File {
        path: path.to_path_buf(),
        reason,
    };
    // A regular file only (a FIFO or a device is refused, not waited on or
    // read without end), and no more of it than the limit.
    let bytes = lumina2_weights::fs::read_bounded(path, MAX_IMAGE_FILE_BYTES)
        .map_err(|e| file_err(format!("cannot read: {e}")))?;
    decode_rgb(&bytes).map_err(file_err)
}

/// Decodes a PNG into 8-bit RGB as PIL's `Image.open(...).convert("RGB")`:
/// palette images through their palette, alpha dropped (not composited),
/// grey replicated, 1/2/4-bit grey scaled to 8 bits, 16-bit colour and
/// grey-with-alpha samples cut to their high byte (PIL's `;16B` raw modes),
/// and 16-bit grey (PIL's mode `I;16`) clipped to 255. The error says why
/// the file was refused.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let mut decoder = png::Decoder::new(BufReader::new(Cursor::new(bytes)));
    // The header alone decides the size; the decoder may allocate no more
    // than a decoded image of the largest accepted size needs.
    decoder.set_limits(png::Limits {
        bytes: (MAX_IMAGE_PIXELS * 8 + (16 << 20)) as usize,
    });
    let header = decoder
        .read_header_info()
        .map_err(|e| format!("not a readable PNG image: {e}"))?;
    let (w, h) = (header.width as u64, header.height as u64);
    if w == 0 || h == 0 {
        return Err(format!("empty image ({w}x{h})"));
    }
    if w * h > MAX_IMAGE_PIXELS {
        return Err(format!(
            "{w}x{h} is more than {MAX_IMAGE_PIXELS} pixels (a decompression bomb?)"
        ));
    }
    let source = (header.color_type, header.bit_depth);
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder
        .read_info()
        .map_err(|e| format!("not a readable PNG image: {e}"))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| format!("{w}x{h} is too large to decode"))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("corrupt PNG image: {e}"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let sixteen = info.bit_depth == png::BitDepth::Sixteen;
    let bps = if sixteen { 2 } else { 1 };
    let channels = info.color_type.samples();
    let line = info.line_size;
    // 16-bit grey is PIL's `I;16`, whose conversion to RGB clips at 255
    // (even when a tRNS chunk made the decoder add alpha).
    let grey16 = source == (png::ColorType::Grayscale, png::BitDepth::Sixteen);
    let sample = |row: &[u8], i: usize| -> u8 {
        if !sixteen {
            row[i]
        } else if grey16 {
            u16::from_be_bytes([row[2 * i], row[2 * i + 1]]).min(255) as u8
        } else {
            row[2 * i]
        }
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = buf
            .get(y * line..y * line + w * channels * bps)
            .ok_or_else(|| "truncated PNG image".to_string())?;
        for x in 0..w {
            let p = x * channels;
            match channels {
                1 | 2 => {
                    let v = sample(row, p);
                    rgb.extend_from_slice(&[v, v, v]);
                }
                _ => {
                    rgb.extend_from_slice(&[sample(row, p), sample(row, p + 1), sample(row, p + 2)])
                }
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| format!("{w}x{h} does not fit"))
}
