//! Opening and reading files that come from outside the program.
//!
//! Every file the project reads on a user's behalf goes through here, so that
//! the same two rules hold everywhere:
//!
//! - only regular files are read, after symbolic links are resolved: a FIFO
//!   would block the reader forever, `/dev/zero` or `/proc/self/...` would
//!   never end or lie about its size. The check is made on the opened handle
//!   (`fstat`), and the open itself does not block (`O_NONBLOCK`), so a FIFO
//!   swapped in between a check and an open cannot hang us either;
//! - whole-file reads are bounded by a limit suited to the kind of file (a
//!   `config.json` is a few kB; nothing is allocated because a file claims a
//!   size): a file over its limit is refused, naming the limit.
//!
//! The errors are [`std::io::Error`]s (kind `InvalidInput` or `InvalidData`)
//! so that the callers' `Io { path, source }` error variants carry them
//! unchanged, with the file's path.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Limit for JSON configuration files (`config.json`, `scheduler_config.json`,
/// `model_index.json`, `adapter_config.json`): real ones are under 10 kB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Limit for shard indexes (`*.safetensors.index.json`): the real
/// transformer's is about 100 kB.
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Limit for tokenizer files (`tokenizer.json`, `tokenizer.model`): Gemma's
/// `tokenizer.json` is 34 MB.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// Limit for the Hub cache's small text files (`refs/main`, a token file).
pub const MAX_REF_BYTES: u64 = 4 << 10;

/// Opens `path` for reading if it is a regular file (symbolic links
/// followed). A FIFO, socket, device or directory is refused with
/// `InvalidInput`; the open never blocks.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // A FIFO opened for reading blocks until a writer appears; with
        // O_NONBLOCK the open returns and the type check below refuses it.
        // On a regular file the flag changes nothing.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", kind_of(&meta.file_type())),
        ));
    }
    Ok(file)
}

/// Whether `path` is a regular file (symbolic links followed): the check for
/// code that only asks whether a file is there before opening it later.
pub fn is_regular_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Reads a whole regular file of at most `max` bytes. A larger file is
/// refused with `InvalidData` naming the limit; nothing more than `max + 1`
/// bytes is ever read, whatever the file system reports as its size.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > max {
        return Err(too_large(len, max));
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_large(buf.len() as u64, max));
    }
    Ok(buf)
}

/// [`read_bounded`] for UTF-8 text.
pub fn read_to_string_bounded(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text: {}", e.utf8_error()),
        )
    })
}

fn too_large(len: u64, max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{len} bytes or more, over the limit of {max} bytes for this kind of file"),
    )
}

/// What a file is, in words, for error messages ("a FIFO", "a folder", ...).
pub fn kind_of(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    if t.is_dir() {
        "a folder"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_within_their_limit() {
        let dir = std::env::temp_dir().join(format!("lumina2-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("config.json");
        std::fs::write(&f, b"{\"a\": 1}").unwrap();
        assert_eq!(read_bounded(&f, 8).unwrap(), b"{\"a\": 1}");
        let e = read_bounded(&f, 7).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("limit of 7 bytes"), "{e}");
        let e = read_bounded(&dir, 100).unwrap_err();
        assert!(e.to_string().contains("folder"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn devices_and_fifos_are_refused_without_blocking() {
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let dir = std::env::temp_dir().join(format!("lumina2-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("config.json");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status();
        if status.is_ok_and(|s| s.success()) {
            let e = read_bounded(&fifo, 100).unwrap_err();
            assert!(e.to_string().contains("FIFO"), "{e}");
            assert!(!is_regular_file(&fifo));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
