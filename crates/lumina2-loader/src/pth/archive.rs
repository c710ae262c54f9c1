//! The few zip structures a `torch.save` archive uses, read with every size
//! checked against the bytes really present.
//!
//! torch.save writes a zip64 archive of stored (uncompressed) entries;
//! `torch.load` also reads deflated ones (a re-zipped checkpoint). A zip
//! header's sizes are claims: here an entry's data range must lie inside the
//! file, before the central directory, and its local header must agree with
//! the central one, before anything trusts it. A deflated entry may claim at
//! most [`MAX_DEFLATE_RATIO`] times its compressed bytes, and is inflated
//! only as far as a reader asks, into a buffer that grows with the bytes
//! really produced.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

/// Largest central directory read (about 100 000 entries).
pub const MAX_DIRECTORY_BYTES: u64 = 16 << 20;

/// Deflate's largest possible expansion (a 258-byte match in under 2 bits).
pub const MAX_DEFLATE_RATIO: u64 = 1032;

const STORED: u16 = 0;
const DEFLATED: u16 = 8;

const EOCD: u32 = 0x0605_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;
const EOCD64: u32 = 0x0606_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;

/// One entry, located and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Where its bytes start in the file.
    pub data_start: u64,
    /// Its bytes in the file (inside the file, before the central directory).
    pub stored_len: u64,
    /// Its uncompressed length: `stored_len` for a stored entry; for a
    /// deflated one the header's claim, at most [`MAX_DEFLATE_RATIO`] times
    /// `stored_len`, proven only when read.
    pub len: u64,
    /// Whether its bytes are deflated.
    pub deflated: bool,
}

/// The central directory: entry names to their header facts.
#[derive(Debug)]
pub struct Directory {
    entries: HashMap<String, Central>,
    /// Where the central directory starts: every entry's data lies before it.
    cd_start: u64,
}

#[derive(Debug, Clone)]
struct Central {
    method: u16,
    flags: u16,
    compressed: u64,
    uncompressed: u64,
    local_offset: u64,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from(u32_at(b, i)) | (u64::from(u32_at(b, i + 4)) << 32)
}

fn read_at<R: Read + Seek>(r: &mut R, at: u64, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    r.seek(SeekFrom::Start(at))
        .and_then(|_| r.read_exact(&mut buf))
        .map_err(|e| format!("reading {n} bytes at {at}: {e}"))?;
    Ok(buf)
}

impl Directory {
    /// Reads the end records and the central directory of a file of `file_len`
    /// bytes.
    pub fn read<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Self, String> {
        // The end record is the last 22 bytes plus a comment of at most 64 KiB.
        let tail_len = file_len.min(22 + 0xffff);
        let tail_start = file_len - tail_len;
        let tail = read_at(r, tail_start, tail_len as usize)?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| {
                u32_at(&tail, i) == EOCD
                    && i + 22 + usize::from(u16_at(&tail, i + 20)) == tail.len()
            })
            .ok_or("not a zip archive (no end of central directory record)")?;
        let e = &tail[eocd..eocd + 22];
        let eocd_pos = tail_start + eocd as u64;
        let (disk, cd_disk) = (u16_at(e, 4), u16_at(e, 6));
        let mut count = u64::from(u16_at(e, 10));
        let mut cd_size = u64::from(u32_at(e, 12));
        let mut cd_start = u64::from(u32_at(e, 16));
        let mut end = eocd_pos;
        let locator = eocd_pos
            .checked_sub(20)
            .map(|at| read_at(r, at, 20))
            .transpose()?
            .filter(|l| u32_at(l, 0) == EOCD64_LOCATOR);
        if let Some(l) = locator {
            let at = u64_at(&l, 8);
            if u32_at(&l, 4) != 0 || u32_at(&l, 16) > 1 {
                return Err("a multi-disk zip archive".into());
            }
            if at.checked_add(56).is_none_or(|e| e > eocd_pos - 20) {
                return Err(format!(
                    "the zip64 end record at {at} lies outside the file"
                ));
            }
            let z = read_at(r, at, 56)?;
            if u32_at(&z, 0) != EOCD64 || u32_at(&z, 16) != 0 || u32_at(&z, 20) != 0 {
                return Err(format!("no valid zip64 end record at {at}"));
            }
            let (count64, size64, start64) = (u64_at(&z, 32), u64_at(&z, 40), u64_at(&z, 48));
            // The 32-bit fields are either saturated or the same value.
            let agree = |short: u64, sat: u64, long: u64| short == sat || short == long;
            if !agree(count, 0xffff, count64)
                || !agree(cd_size, 0xffff_ffff, size64)
                || !agree(cd_start, 0xffff_ffff, start64)
            {
                return Err("the zip and zip64 end records disagree".into());
            }
            (count, cd_size, cd_start, end) = (count64, size64, start64, at);
        } else if disk != 0 || cd_disk != 0 {
            return Err("a multi-disk zip archive".into());
        }
        if cd_start.checked_add(cd_size).is_none_or(|e| e > end) {
            return Err(format!(
                "the central directory ({cd_size} bytes at {cd_start}) lies outside the file"
            ));
        }
        if cd_size > MAX_DIRECTORY_BYTES {
            return Err(format!(
                "a central directory of {cd_size} bytes (at most {MAX_DIRECTORY_BYTES})"
            ));
        }
        if count > cd_size / 46 {
            return Err(format!(
                "{count} entries cannot fit a central directory of {cd_size} bytes"
            ));
        }
        let cd = read_at(r, cd_start, cd_size as usize)?;
        let mut entries = HashMap::new();
        let mut p = 0usize;
        for _ in 0..count {
            let h = cd
                .get(p..p + 46)
                .filter(|h| u32_at(h, 0) == CENTRAL)
                .ok_or_else(|| {
                    format!("a bad central directory header at {}", cd_start + p as u64)
                })?;
            let (name_len, extra_len, comment_len) = (
                usize::from(u16_at(h, 28)),
                usize::from(u16_at(h, 30)),
                usize::from(u16_at(h, 32)),
            );
            let mut c = Central {
                flags: u16_at(h, 8),
                method: u16_at(h, 10),
                compressed: u64::from(u32_at(h, 20)),
                uncompressed: u64::from(u32_at(h, 24)),
                local_offset: u64::from(u32_at(h, 42)),
            };
            let name_at = p + 46;
            let extra_at = name_at + name_len;
            let next = extra_at + extra_len + comment_len;
            let (Some(name), Some(extra)) = (
                cd.get(name_at..extra_at),
                cd.get(extra_at..extra_at + extra_len),
            ) else {
                return Err("a central directory entry runs past the directory".into());
            };
            if next > cd.len() {
                return Err("a central directory entry runs past the directory".into());
            }
            let name = std::str::from_utf8(name)
                .map_err(|_| "an entry name is not UTF-8".to_string())?
                .to_string();
            zip64_fields(extra, &mut c).map_err(|e| format!("entry `{name}`: {e}"))?;
            if entries.insert(name.clone(), c).is_some() {
                return Err(format!("entry `{name}` appears twice"));
            }
            p = next;
        }
        Ok(Self { entries, cd_start })
    }

    /// Entry names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Locates a stored entry's bytes, checking its local header against the
    /// central one and its range against the file.
    pub fn entry<R: Read + Seek>(&self, r: &mut R, name: &str) -> Result<Entry, String> {
        let c = self
            .entries
            .get(name)
            .ok_or_else(|| format!("no entry `{name}` in the archive"))?;
        if c.flags & 1 != 0 {
            return Err(format!("entry `{name}` is encrypted"));
        }
        match c.method {
            STORED if c.compressed != c.uncompressed => {
                return Err(format!(
                    "stored entry `{name}` declares {} bytes compressed and {} uncompressed",
                    c.compressed, c.uncompressed
                ))
            }
            DEFLATED if c.uncompressed > c.compressed.saturating_mul(MAX_DEFLATE_RATIO) => {
                return Err(format!(
                    "deflated entry `{name}` declares {} bytes from {} compressed, more than deflate's maximum ratio {MAX_DEFLATE_RATIO}",
                    c.uncompressed, c.compressed
                ))
            }
            STORED | DEFLATED => {}
            m => {
                return Err(format!(
                    "entry `{name}` uses zip compression method {m}; torch.save stores entries uncompressed, torch.load also reads deflated ones"
                ))
            }
        }
        if c.local_offset
            .checked_add(30)
            .is_none_or(|e| e > self.cd_start)
        {
            return Err(format!(
                "entry `{name}`'s local header at {} lies outside the entries",
                c.local_offset
            ));
        }
        let h = read_at(r, c.local_offset, 30)?;
        if u32_at(&h, 0) != LOCAL {
            return Err(format!(
                "entry `{name}` has no local header at {}",
                c.local_offset
            ));
        }
        let (flags, method) = (u16_at(&h, 6), u16_at(&h, 8));
        let (local_size, name_len, extra_len) = (
            u32_at(&h, 18),
            u64::from(u16_at(&h, 26)),
            u64::from(u16_at(&h, 28)),
        );
        let data_start = c.local_offset + 30 + name_len + extra_len;
        if data_start > self.cd_start {
            return Err(format!(
                "entry `{name}`'s local header runs into the central directory"
            ));
        }
        let local_name = read_at(r, c.local_offset + 30, name_len as usize)?;
        if local_name != name.as_bytes() || method != c.method || flags & 1 != 0 {
            return Err(format!(
                "entry `{name}`'s local header (name `{}`, method {method}) disagrees with the central directory",
                String::from_utf8_lossy(&local_name)
            ));
        }
        // Sizes in the local header are zero with a data descriptor (flag 8)
        // and saturated with zip64; otherwise they must agree.
        if flags & 8 == 0 && local_size != 0xffff_ffff && u64::from(local_size) != c.compressed {
            return Err(format!(
                "entry `{name}`: the local header declares {local_size} bytes, the central directory {}",
                c.compressed
            ));
        }
        if data_start
            .checked_add(c.compressed)
            .is_none_or(|e| e > self.cd_start)
        {
            return Err(format!(
                "entry `{name}` declares {} bytes at {data_start}, past the end of the entries at {}",
                c.compressed, self.cd_start
            ));
        }
        Ok(Entry {
            data_start,
            stored_len: c.compressed,
            len: c.uncompressed,
            deflated: c.method == DEFLATED,
        })
    }
}

impl Entry {
    /// `len` bytes of the entry's uncompressed content from `skip` on, which
    /// must lie within [`Entry::len`].
    pub fn read<R: Read + Seek>(&self, r: &mut R, skip: u64, len: u64) -> Result<Vec<u8>, String> {
        let end = skip
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| format!("bytes {skip}+{len} are outside the entry's {}", self.len))?;
        if !self.deflated {
            let n = usize::try_from(len).map_err(|_| format!("{len} bytes overflow"))?;
            return read_at(r, self.data_start + skip, n);
        }
        r.seek(SeekFrom::Start(self.data_start))
            .map_err(|e| e.to_string())?;
        inflate_range(&mut r.take(self.stored_len), skip, end)
    }
}

/// Inflates a raw deflate stream and keeps its bytes `skip..end`. The output
/// grows with what the stream really produces.
fn inflate_range<R: Read>(input: &mut R, skip: u64, end: u64) -> Result<Vec<u8>, String> {
    use miniz_oxide::inflate::stream::{inflate, InflateState};
    use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};
    const CHUNK: usize = 64 << 10;
    let mut state = InflateState::new_boxed(DataFormat::Raw);
    let mut inbuf = vec![0u8; CHUNK];
    let mut chunk = vec![0u8; CHUNK];
    let (mut lo, mut hi, mut eof) = (0usize, 0usize, false);
    let mut out = Vec::new();
    let mut produced = 0u64;
    while produced < end {
        if lo == hi && !eof {
            hi = input.read(&mut inbuf).map_err(|e| e.to_string())?;
            lo = 0;
            eof = hi == 0;
        }
        let r = inflate(&mut state, &inbuf[lo..hi], &mut chunk, MZFlush::None);
        lo += r.bytes_consumed;
        let written = r.bytes_written as u64;
        // Keep the part of this chunk that falls in skip..end.
        let (a, b) = (produced.max(skip), (produced + written).min(end));
        if a < b {
            out.extend_from_slice(&chunk[(a - produced) as usize..(b - produced) as usize]);
        }
        produced += written;
        let stuck = r.bytes_consumed == 0 && r.bytes_written == 0 && eof;
        match r.status {
            Ok(MZStatus::StreamEnd) if produced < end => {
                return Err(format!(
                    "the deflated entry holds {produced} bytes, {end} are needed"
                ))
            }
            Ok(_) | Err(MZError::Buf) if !stuck => {}
            Ok(_) | Err(MZError::Buf) => {
                return Err(format!(
                    "the deflate stream ends after {produced} bytes, {end} are needed"
                ))
            }
            Err(e) => return Err(format!("bad deflate data after {produced} bytes: {e:?}")),
        }
    }
    Ok(out)
}

/// Replaces the saturated 32-bit fields by their zip64 extra-field values
/// (APPNOTE 4.5.3: present in this order, only for the saturated ones).
fn zip64_fields(mut extra: &[u8], c: &mut Central) -> Result<(), String> {
    let need = [
        c.uncompressed == 0xffff_ffff,
        c.compressed == 0xffff_ffff,
        c.local_offset == 0xffff_ffff,
    ];
    while extra.len() >= 4 {
        let (id, len) = (u16_at(extra, 0), usize::from(u16_at(extra, 2)));
        let body = extra
            .get(4..4 + len)
            .ok_or("an extra field runs past its header")?;
        if id == 1 {
            let mut fields = body.chunks_exact(8).map(|f| u64_at(f, 0));
            let mut next = |want: bool, v: &mut u64| -> Result<(), String> {
                if want {
                    *v = fields.next().ok_or("a zip64 extra field lacks a size")?;
                }
                Ok(())
            };
            next(need[0], &mut c.uncompressed)?;
            next(need[1], &mut c.compressed)?;
            next(need[2], &mut c.local_offset)?;
            return Ok(());
        }
        extra = &extra[4 + len..];
    }
    if need.iter().any(|&n| n) {
        return Err("saturated sizes without a zip64 extra field".into());
    }
    Ok(())
}
