//! Output files: names from a pattern, PNG with the generation parameters as
//! text chunks, written atomically (temporary file in the same folder, then
//! rename), so an interrupted or failed run never leaves a partial image.
//!
//! What may be replaced: an output path must be new or name a regular file.
//! Anything else that exists there (a device such as `/dev/full`, a FIFO, a
//! socket, a folder, or a symbolic link of any kind, `/dev/stdout` included)
//! is refused before any model is loaded, and checked again right before the
//! rename, since renaming over it would replace the node itself. Symbolic
//! links are refused rather than followed: replacing the link would surprise
//! whoever expected the file it names to change, and writing through it lets
//! whoever controls the link choose where the image goes.
//!
//! Temporary files are named `.NAME.lumina2-PID-NONCE.tmp` (NAME the output's
//! file name, NONCE 16 hex digits), so a run can recognise the ones an earlier
//! run for the same output left when it was killed, and remove those whose
//! process is gone.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{bail, Context, Result};

use crate::signals;

/// Temporary files of this process that exist on disk. The lock is held
/// while one is created, and while the interrupt flag is checked and one is
/// renamed into place; [`abandon`] takes it and never gives it back, so no
/// file appears after a second signal has removed these.
static TEMP_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn temp_files() -> MutexGuard<'static, Vec<PathBuf>> {
    TEMP_FILES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes this process's temporary files and exits with `status` (for a
/// second signal: quit now, leave nothing).
pub fn abandon(status: u8) -> ! {
    let held = temp_files();
    for p in held.iter() {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(i32::from(status))
}

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

/// Checks, before any model is loaded, that `path` can be written: its
/// folder exists, is a folder and takes new files, and `path` is new or a
/// regular file.
pub fn check_writable(path: &Path) -> Result<()> {
    let dir = parent_dir(path);
    let meta = std::fs::metadata(&dir)
        .with_context(|| format!("output folder {} does not exist", dir.display()))?;
    if !meta.is_dir() {
        bail!("output folder {} is not a folder", dir.display());
    }
    check_target(path)?;
    let (probe, _file) =
        create_temp(path).with_context(|| format!("cannot create files in {}", dir.display()))?;
    discard(&probe);
    Ok(())
}

/// Refuses an existing `path` that is not a regular file (symbolic links
/// are not followed: a link is refused whatever it points to).
fn check_target(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot examine {}", path.display())),
    };
    if meta.is_file() {
        return Ok(());
    }
    let kind = if meta.file_type().is_symlink() {
        match std::fs::metadata(path) {
            Ok(target) => format!(
                "a symbolic link to {}",
                lumina2_weights::fs::kind_of(&target.file_type())
            ),
            Err(_) => "a symbolic link to nothing".to_string(),
        }
    } else {
        lumina2_weights::fs::kind_of(&meta.file_type()).to_string()
    };
    bail!(
        "output {} is {kind}; an output must be a new path or a regular file (which is replaced)",
        path.display()
    )
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn output_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into())
}

const TEMP_MARK: &str = ".lumina2-";
const TEMP_SUFFIX: &str = ".tmp";
const NONCE_DIGITS: usize = 16;

/// `.NAME.lumina2-PID-NONCE.tmp` next to `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = output_name(path);
    parent_dir(path).join(format!(
        ".{name}{TEMP_MARK}{}-{:0width$x}{TEMP_SUFFIX}",
        std::process::id(),
        nonce(),
        width = NONCE_DIGITS
    ))
}

/// A number unlikely to repeat between processes or calls (std's hasher keys
/// are random per process; a counter separates the calls of one process).
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// The process id in `file_name` when it is one of our temporary files for
/// the output named `output`.
fn temp_owner(file_name: &str, output: &str) -> Option<u32> {
    let rest = file_name
        .strip_prefix('.')?
        .strip_prefix(output)?
        .strip_prefix(TEMP_MARK)?
        .strip_suffix(TEMP_SUFFIX)?;
    let (pid, nonce) = rest.split_once('-')?;
    let digits = |s: &str, hex: bool| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (hex && (b'a'..=b'f').contains(&b)))
    };
    if pid.len() > 10 || !digits(pid, false) || nonce.len() != NONCE_DIGITS || !digits(nonce, true)
    {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` may still be running. Only Linux's `/proc` answers
/// this without `unsafe`; elsewhere every process is taken to be alive, so
/// nothing is removed.
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") && Path::new("/proc/self").exists() {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Removes the temporary files that runs for `path` left behind when they
/// were killed (SIGKILL, a power cut): regular files named by our pattern for
/// this output name, whose process no longer exists. Returns those removed.
pub fn remove_stale_temps(path: &Path) -> Vec<PathBuf> {
    let output = output_name(path);
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir(parent_dir(path)) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| temp_owner(n, &output)) else {
            continue;
        };
        // `file_type` does not follow links: only a file we could have made.
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if pid == own || !regular || process_alive(pid) {
            continue;
        }
        let p = entry.path();
        if std::fs::remove_file(&p).is_ok() {
            removed.push(p);
        }
    }
    removed
}

/// Creates a new temporary file next to `path` (never opening an existing
/// one), after checking that no signal asked the run to stop.
fn create_temp(path: &Path) -> Result<(PathBuf, File)> {
    signals::check(|| format!(" before writing {}", path.display()))?;
    let mut held = temp_files();
    let tmp = temp_path(path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    held.push(tmp.clone());
    Ok((tmp, file))
}

/// Removes a temporary file (after a failure).
fn discard(tmp: &Path) {
    let mut held = temp_files();
    let _ = std::fs::remove_file(tmp);
    held.retain(|p| p != tmp);
}

/// Renames the finished `tmp` over `path`, unless a signal arrived or
/// `path` became something that may not be replaced while the run worked.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    let mut held = temp_files();
    signals::check(|| format!(" before writing {}", path.display()))?;
    check_target(path)?;
    std::fs::rename(tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    held.retain(|p| p != tmp);
    Ok(())
}

/// Runs `write` on `w` and flushes it; a failure (a full disk, say) names
/// `path`, the file being made, rather than its temporary name.
fn write_named<W: Write>(
    path: &Path,
    w: &mut W,
    write: impl FnOnce(&mut W) -> Result<()>,
) -> Result<()> {
    write(w)
        .and_then(|()| w.flush().map_err(Into::into))
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `write` into a temporary file next to `path`, then renames it over
/// `path`; the temporary file is removed on any failure.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let (tmp, file) = create_temp(path)?;
    let result = (|| -> Result<()> {
        let mut w = BufWriter::new(file);
        write_named(path, &mut w, write)?;
        let f = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", path.display()))?;
        f.sync_all()
            .with_context(|| format!("writing {}", path.display()))?;
        drop(f);
        commit(&tmp, path)
    })();
    if result.is_err() {
        discard(&tmp);
    }
    result
}

/// The PNG of an RGB image with `text` as UTF-8 text chunks (iTXt).
pub fn encode_png<W: Write>(
    w: &mut W,
    img: &image::RgbImage,
    text: &[(String, String)],
) -> Result<()> {
    let mut enc = png::Encoder::new(w, img.width(), img.height());
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
}

/// Writes an RGB image as PNG with `text` as UTF-8 text chunks (iTXt).
pub fn write_png(path: &Path, img: &image::RgbImage, text: &[(String, String)]) -> Result<()> {
    write_atomically(path, |w| encode_png(w, img, text))
}

/// Lets `write` fill a new temporary file next to `path` (by its path), then
/// renames it over `path`; the temporary file is removed on any failure.
pub fn write_via_temp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (tmp, file) = create_temp(path)?;
    drop(file);
    let result = write(&tmp)
        .with_context(|| format!("writing {}", path.display()))
        .and_then(|()| commit(&tmp, path));
    if result.is_err() {
        discard(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lumina2-out-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A disk that is full: every write fails with ENOSPC.
    struct FullDisk;

    impl Write for FullDisk {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
        }
    }

    #[test]
    fn a_full_disk_names_the_file_being_written() {
        let img = image::RgbImage::new(16, 16);
        let path = Path::new("/some/where/fox_42.png");
        let e = write_named(path, &mut FullDisk, |w| encode_png(w, &img, &[])).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("writing /some/where/fox_42.png"), "{msg}");
        assert!(msg.contains("no storage space"), "{msg}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_real_full_device_names_the_file_being_written() {
        // /dev/full: every write fails with ENOSPC, as on a full disk.
        let mut full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let img = image::RgbImage::new(64, 64);
        let path = Path::new("out/fox.png");
        let e = write_named(path, &mut full, |w| encode_png(w, &img, &[])).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("writing out/fox.png"), "{msg}");
        assert!(msg.contains("No space left on device"), "{msg}");
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_keeps_the_old_file() {
        let dir = tmp_dir("failed");
        let out = dir.join("x.png");
        std::fs::write(&out, b"old").unwrap();
        let e = write_atomically(&out, |w| {
            w.write_all(b"partial")?;
            bail!("the encoder failed")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains(&format!("writing {}", out.display())));
        assert_eq!(files_in(&dir), vec!["x.png".to_string()]);
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        write_atomically(&out, |w| Ok(w.write_all(b"new")?)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert_eq!(files_in(&dir), vec!["x.png".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The target turned into something else while the image was made: the
    /// rename is refused and the new node stays as it is.
    #[test]
    fn the_target_is_checked_again_before_the_rename() {
        let dir = tmp_dir("recheck");
        let out = dir.join("x.png");
        check_writable(&out).unwrap();
        let e = write_atomically(&out, |w| {
            std::fs::create_dir(&out)?;
            Ok(w.write_all(b"img")?)
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("is a folder"), "{e:#}");
        assert!(out.is_dir());
        assert_eq!(files_in(&dir), vec!["x.png".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn only_new_paths_and_regular_files_are_accepted() {
        let dir = tmp_dir("kinds");
        let file = dir.join("file.png");
        std::fs::write(&file, b"x").unwrap();
        check_writable(&dir.join("new.png")).unwrap();
        check_writable(&file).unwrap();
        let link = dir.join("link.png");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let dangling = dir.join("dangling.png");
        std::os::unix::fs::symlink(dir.join("nothing"), &dangling).unwrap();
        let cases: Vec<(PathBuf, &str)> = vec![
            (PathBuf::from("/dev/null"), "a character device"),
            (PathBuf::from("/dev/full"), "a character device"),
            (PathBuf::from("/dev/stdout"), "a symbolic link"),
            (dir.clone(), "a folder"),
            (link, "a symbolic link to a regular file"),
            (dangling, "a symbolic link to nothing"),
        ];
        for (p, kind) in cases {
            if std::fs::symlink_metadata(&p).is_err() {
                continue; // a system without that node
            }
            let e = check_writable(&p).unwrap_err();
            let msg = format!("{e:#}");
            assert!(
                msg.contains(kind) && msg.contains("new path or a regular file"),
                "{msg}"
            );
        }
        assert_eq!(files_in(&dir), vec!["dangling.png", "file.png", "link.png"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporary_names_are_recognised_exactly() {
        let out = Path::new("/d/fox.png");
        let tmp = temp_path(out);
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_owner(name, "fox.png"), Some(std::process::id()));
        assert_eq!(temp_owner(name, "fox"), None);
        assert_eq!(temp_owner(name, "ox.png"), None);
        for other in [
            ".fox.png.lumina2-12-0123456789abcdef.tmp.bak",
            ".fox.png.lumina2-12-0123456789abcde.tmp",
            ".fox.png.lumina2-12-0123456789ABCDEF.tmp",
            ".fox.png.lumina2--0123456789abcdef.tmp",
            ".fox.png.lumina2-+12-0123456789abcdef.tmp",
            ".fox.png.lumina2-12345678901-0123456789abcdef.tmp",
            "fox.png.lumina2-12-0123456789abcdef.tmp",
            ".fox.png.12.tmp",
        ] {
            assert_eq!(temp_owner(other, "fox.png"), None, "{other}");
        }
        assert_eq!(
            temp_owner(".fox.png.lumina2-12-0123456789abcdef.tmp", "fox.png"),
            Some(12)
        );
    }
}
