//! Output files: names from a pattern, PNG with the generation parameters as
//! text chunks, written atomically (temporary file in the same folder, then
//! rename), so an interrupted or failed run never leaves a partial image.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Expands `{seed}` and `{index}` in `pattern`. With several images and no
/// placeholder, `_{index}` goes before the extension so names differ.
pub fn output_path(pattern: &str, seed: Option<u64>, index: usize, count: usize) -> PathBuf {
    let has_placeholder = pattern.contains("{seed}") || pattern.contains("{index}");
    let seed_text = seed.map_or_else(|| "latents".to_string(), |s| s.to_string());
    let mut p = pattern
        .replace("{seed}", &seed_text)
        .replace("{index}", &index.to_string());
    if count > 1 && !has_placeholder {
        let path = PathBuf::from(&p);
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match path.extension() {
            Some(ext) => format!("{stem}_{index}.{}", ext.to_string_lossy()),
            None => format!("{stem}_{index}"),
        };
        p = path.with_file_name(name).to_string_lossy().into_owned();
    }
    PathBuf::from(p)
}

/// Checks, before any model is loaded, that files can be created where `path`
/// points: the folder exists, is a folder, and is writable.
pub fn check_writable(path: &Path) -> Result<()> {
    let dir = parent_dir(path);
    let meta = std::fs::metadata(&dir)
        .with_context(|| format!("output folder {} does not exist", dir.display()))?;
    if !meta.is_dir() {
        bail!("output folder {} is not a folder", dir.display());
    }
    if path.is_dir() {
        bail!(
            "output {} is a folder, expected a file name",
            path.display()
        );
    }
    let probe = temp_path(path);
    File::create(&probe).with_context(|| format!("cannot create files in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    parent_dir(path).join(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `write` into a temporary file next to `path`, then renames it over
/// `path`; the temporary file is removed on any failure.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(f);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes an RGB image as PNG with `text` as UTF-8 text chunks (iTXt).
pub fn write_png(path: &Path, img: &image::RgbImage, text: &[(String, String)]) -> Result<()> {
    write_atomically(path, |w| {
        let mut enc = png::Encoder::new(&mut *w, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_itxt_chunk(k.clone(), v.clone())
                .with_context(|| format!("PNG text chunk `{k}`"))?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(img.as_raw())?;
        writer.finish()?;
        Ok(())
    })?;
    Ok(())
}

/// Lets `write` create a temporary file next to `path`, then renames it over
/// `path`; the temporary file is removed on any failure.
pub fn write_via_temp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
