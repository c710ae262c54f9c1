//! Structure-aware mutations for the `.pth` targets: `pickle` (the state-dict
//! interpreter, fed opcode-level mutations: MARKs, tuples, memo PUT/GET,
//! REDUCE with wrong argument counts, deep nesting, huge lengths and
//! integers) and `pth_zip` (the archive, fed zip-structure mutations:
//! declared sizes against real ones, compression methods, local against
//! central headers, end records, truncation at structure boundaries).
//!
//! The byte mutator of [`super`] hands each target an input; the target runs
//! it, then a few variants derived from it here. The variants are seeded by
//! the input's hash, so a saved finding reproduces.

use std::path::Path;

use super::{Rng, INTERESTING};

/// Structural variants run per input.
const VARIANTS: usize = 6;

fn rng_for(bytes: &[u8]) -> Rng {
    // FNV-1a.
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    Rng(h | 1)
}

/// The `pickle` target: the interpreter on the input, then on variants.
pub fn pickle(path: &Path) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    check_state_dict(&bytes);
    let mut rng = rng_for(&bytes);
    for _ in 0..VARIANTS {
        let mut v = bytes.clone();
        for _ in 0..=rng.below(3) {
            v = mutate_pickle(&mut rng, &v);
        }
        check_state_dict(&v);
    }
}

/// Parses; what is accepted must be consistent (each view inside its
/// storage), or it is a finding.
fn check_state_dict(bytes: &[u8]) {
    if let Ok(sd) = lumina2_loader::pth::parse_state_dict(bytes) {
        for (name, t) in &sd.tensors {
            let end = t.storage_end();
            assert!(
                t.size.len() == t.stride.len()
                    && t.numel().is_some()
                    && end.is_some_and(|e| e <= t.storage_numel),
                "accepted tensor `{name}` outside its storage: {t:?}"
            );
        }
    }
}

/// The `pth_zip` target: the archive as given, then zip-structure variants.
pub fn pth_zip(path: &Path) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    super::pth(path);
    let variant = path.with_extension("variant.pth");
    let mut rng = rng_for(&bytes);
    for _ in 0..VARIANTS {
        let mut v = bytes.clone();
        for _ in 0..=rng.below(2) {
            v = mutate_zip(&mut rng, &v);
        }
        if std::fs::write(&variant, &v).is_ok() {
            super::pth(&variant);
        }
    }
}

// ---------------------------------------------------------------------------
// Pickles.

/// Length of the opcode at `i` with its arguments, for the opcodes
/// `torch.save` writes (and a few more); `None` when it cannot be lexed.
fn op_len(p: &[u8], i: usize) -> Option<usize> {
    let uint = |at: usize, n: usize| -> Option<usize> {
        let b = p.get(at..at + n)?;
        Some(
            b.iter()
                .rev()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x)),
        )
    };
    let n = match *p.get(i)? {
        0x80 | b'K' | b'q' | b'h' => 2,
        b'M' => 3,
        b'J' | b'r' | b'j' => 5,
        b'G' | 0x95 => 9,
        b'X' | 0x8b => 5usize.checked_add(uint(i + 1, 4)?)?,
        0x8c | 0x8a => 2 + uint(i + 1, 1)?,
        0x8d => 9usize.checked_add(uint(i + 1, 8)?)?,
        b'c' => {
            let a = p.get(i + 1..)?.iter().position(|&b| b == b'\n')?;
            let b = p.get(i + a + 2..)?.iter().position(|&b| b == b'\n')?;
            a + b + 3
        }
        _ => 1,
    };
    (i + n <= p.len()).then_some(n)
}

/// Opcode starts, as far as the stream lexes.
fn op_starts(p: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(n) = op_len(p, i) {
        out.push(i);
        i += n;
    }
    out
}

/// LONG1 of `v`: little-endian two's complement, as short as Python writes it.
fn long1(v: i128) -> Vec<u8> {
    let mut b = v.to_le_bytes().to_vec();
    while let [.., prev, last] = b[..] {
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            b.pop();
        } else {
            break;
        }
    }
    let mut out = vec![0x8a, b.len() as u8];
    out.extend(b);
    out
}

const SNIPPETS: &[&[u8]] = &[
    b"(",
    b"t",
    b"\x85",
    b"\x86",
    b"\x87",
    b")",
    b"R",
    b"b",
    b"s",
    b"u",
    b"a",
    b"e",
    b"0",
    b"N",
    b"}",
    b"]",
    b"\x94",
    b".",
    b"Q",
    b"q\x00",
    b"h\x00",
    b"h\x01",
    b"r\xff\xff\xff\xff",
    b"j\xff\xff\xff\xff",
    b"\x93",
    b"\x88",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ccollections\nOrderedDict\n",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nCharStorage\n",
    b"cos\nsystem\n",
    b"\x8c\x08builtins\x8c\x04eval\x93",
    b")R",
    b"ccollections\nOrderedDict\n)R",
];

fn mutate_pickle(rng: &mut Rng, p: &[u8]) -> Vec<u8> {
    let starts = op_starts(p);
    let mut v = p.to_vec();
    if starts.is_empty() {
        return v;
    }
    let pick = |rng: &mut Rng| starts[rng.below(starts.len())];
    let len_at = |i: usize| op_len(p, i).unwrap_or(1);
    match rng.below(10) {
        0 => {
            let at = pick(rng);
            let s = SNIPPETS[rng.below(SNIPPETS.len())];
            v.splice(at..at, s.iter().copied());
        }
        1 => {
            let at = pick(rng);
            v.drain(at..at + len_at(at));
        }
        2 => {
            // A run of opcodes repeated: repeated keys, deep MARK stacks.
            let a = rng.below(starts.len());
            let b = (a + 1 + rng.below(8)).min(starts.len());
            let from = starts[a];
            let to = starts.get(b).copied().unwrap_or(p.len());
            let most = [2, 16, 1000, 100_000][rng.below(4)];
            let times = 1 + rng.below(most);
            let chunk = &p[from..to];
            if chunk.len().saturating_mul(times) <= 4 << 20 {
                let rep: Vec<u8> = chunk.repeat(times);
                v.splice(to..to, rep);
            }
        }
        3 => {
            // Deep nesting: TUPLE1s, nested lists, or a memo doubling chain.
            let at = pick(rng);
            let most = [40, 1000, 2_000_000][rng.below(3)];
            let n = 1 + rng.below(most);
            let bomb: Vec<u8> = match rng.below(3) {
                0 => std::iter::once(b'N')
                    .chain(std::iter::repeat_n(0x85, n))
                    .collect(),
                1 => b"]"
                    .iter()
                    .copied()
                    .chain((0..n.min(100_000)).flat_map(|_| *b"]\x94h\x00a"))
                    .collect(),
                _ => {
                    let mut b = b"N".to_vec();
                    for i in 0..n.min(255) as u8 {
                        b.extend([b'q', i, b'0', b'h', i, b'h', i, 0x86]);
                    }
                    b
                }
            };
            v.splice(at..at, bomb);
        }
        4 => {
            // REDUCE with the wrong argument count: change the tuple built
            // just before a REDUCE.
            let reduces: Vec<usize> = starts
                .windows(2)
                .filter(|w| p[w[1]] == b'R')
                .map(|w| w[0])
                .collect();
            if let Some(&at) = reduces.get(rng.below(reduces.len().max(1))) {
                let s: &[u8] =
                    [&b")"[..], b"\x85", b"\x86", b"\x87", b"0)", b"N\x86"][rng.below(6)];
                v.splice(at..at + len_at(at), s.iter().copied());
            }
        }
        5 => {
            // Integers (offsets, sizes, strides, numel, memo indices).
            let ints: Vec<usize> = starts
                .iter()
                .copied()
                .filter(|&i| matches!(p[i], b'K' | b'M' | b'J' | 0x8a))
                .collect();
            if let Some(&at) = ints.get(rng.below(ints.len().max(1))) {
                let x = INTERESTING[rng.below(INTERESTING.len())] as i128;
                let val = [x, -x, 1 << 62, (1 << 63) - 1, 1 << 64, -1][rng.below(6)];
                v.splice(at..at + len_at(at), long1(val));
            }
        }
        6 => {
            // A length field: strings and LONG4 claim more than remains.
            let strs: Vec<usize> = starts
                .iter()
                .copied()
                .filter(|&i| matches!(p[i], b'X' | 0x8c | 0x8d | 0x8a | 0x8b))
                .collect();
            if let Some(&at) = strs.get(rng.below(strs.len().max(1))) {
                let w = match p[at] {
                    0x8c | 0x8a => 1,
                    0x8d => 8,
                    _ => 4,
                };
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                if at + 1 + w <= v.len() {
                    v[at + 1..at + 1 + w].copy_from_slice(&x[..w]);
                }
            }
        }
        7 => {
            // Two opcodes swapped.
            let (a, b) = (pick(rng), pick(rng));
            let (a, b) = (a.min(b), a.max(b));
            if a != b {
                let (la, lb) = (len_at(a), len_at(b));
                if a + la <= b {
                    let mut out = p[..a].to_vec();
                    out.extend(&p[b..b + lb]);
                    out.extend(&p[a + la..b]);
                    out.extend(&p[a..a + la]);
                    out.extend(&p[b + lb..]);
                    v = out;
                }
            }
        }
        8 => {
            // Memo indices: GET of an unwritten slot, PUT over a live one.
            let memo: Vec<usize> = starts
                .iter()
                .copied()
                .filter(|&i| matches!(p[i], b'q' | b'h'))
                .collect();
            if let Some(&at) = memo.get(rng.below(memo.len().max(1))) {
                v[at + 1] = rng.next() as u8;
            }
        }
        _ => {
            // Truncated at an opcode boundary, or STOP moved early.
            let at = pick(rng);
            v.truncate(at);
            if rng.below(2) == 0 {
                v.push(b'.');
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------
// Zip archives.

fn find_all(p: &[u8], sig: &[u8; 4]) -> Vec<usize> {
    p.windows(4)
        .enumerate()
        .filter(|(_, w)| w == sig)
        .map(|(i, _)| i)
        .collect()
}

fn put(v: &mut [u8], at: usize, width: usize, x: u64) {
    if at + width <= v.len() {
        v[at..at + width].copy_from_slice(&x.to_le_bytes()[..width]);
    }
}

fn get(v: &[u8], at: usize, width: usize) -> u64 {
    v.get(at..at + width).map_or(0, |b| {
        b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x))
    })
}

/// A size-like value: an interesting one, or the current one nudged.
fn size_value(rng: &mut Rng, current: u64) -> u64 {
    match rng.below(3) {
        0 => INTERESTING[rng.below(INTERESTING.len())],
        1 => current.wrapping_add(1 + rng.below(64) as u64),
        _ => current.wrapping_sub(1 + rng.below(64) as u64),
    }
}

fn mutate_zip(rng: &mut Rng, p: &[u8]) -> Vec<u8> {
    let mut v = p.to_vec();
    let central = find_all(p, b"PK\x01\x02");
    let local = find_all(p, b"PK\x03\x04");
    let eocd64 = find_all(p, b"PK\x06\x06");
    let locator = find_all(p, b"PK\x06\x07");
    let eocd = find_all(p, b"PK\x05\x06");
    let pick = |rng: &mut Rng, xs: &[usize]| xs.get(rng.below(xs.len().max(1))).copied();
    match rng.below(11) {
        0 => {
            // Central sizes (compressed, uncompressed or both) against the
            // real bytes.
            if let Some(h) = pick(rng, &central) {
                let x = size_value(rng, get(&v, h + 20, 4));
                match rng.below(3) {
                    0 => put(&mut v, h + 20, 4, x),
                    1 => put(&mut v, h + 24, 4, x),
                    _ => {
                        put(&mut v, h + 20, 4, x);
                        put(&mut v, h + 24, 4, x);
                    }
                }
            }
        }
        1 => {
            if let Some(h) = pick(rng, &local) {
                let x = size_value(rng, get(&v, h + 18, 4));
                put(&mut v, h + 18 + 4 * rng.below(2), 4, x);
            }
        }
        2 => {
            // Compression method: central, local or both.
            let m = [0u64, 8, 9, 12, 14, 93, 99, 0xffff][rng.below(8)];
            let (c, l) = (pick(rng, &central), pick(rng, &local));
            match rng.below(3) {
                0 => c.into_iter().for_each(|h| put(&mut v, h + 10, 2, m)),
                1 => l.into_iter().for_each(|h| put(&mut v, h + 8, 2, m)),
                _ => {
                    c.into_iter().for_each(|h| put(&mut v, h + 10, 2, m));
                    l.into_iter().for_each(|h| put(&mut v, h + 8, 2, m));
                }
            }
        }
        3 => {
            // Local header offset.
            if let Some(h) = pick(rng, &central) {
                let x = match rng.below(2) {
                    0 => pick(rng, &local).unwrap_or(0) as u64,
                    _ => size_value(rng, get(&v, h + 42, 4)),
                };
                put(&mut v, h + 42, 4, x);
            }
        }
        4 => {
            // Name and extra lengths.
            let (h, off) = match rng.below(2) {
                0 => (pick(rng, &central), [28usize, 30, 32][rng.below(3)]),
                _ => (pick(rng, &local), [26usize, 28][rng.below(2)]),
            };
            if let Some(h) = h {
                let x = size_value(rng, get(&v, h + off, 2));
                put(&mut v, h + off, 2, x);
            }
        }
        5 => {
            // Zip64 extra fields (id 1): the 64-bit sizes and offset.
            let extras = find_all(p, &[1, 0, 8, 0])
                .into_iter()
                .chain(find_all(p, &[1, 0, 16, 0]))
                .chain(find_all(p, &[1, 0, 24, 0]))
                .collect::<Vec<_>>();
            if let Some(x) = pick(rng, &extras) {
                let at = x + 4 + 8 * rng.below(3);
                let val = size_value(rng, get(&v, at, 8));
                put(&mut v, at, 8, val);
            }
        }
        6 => {
            // End records: entry counts, directory size and start.
            match rng.below(3) {
                0 => {
                    if let Some(e) = pick(rng, &eocd64) {
                        let at = e + [24usize, 32, 40, 48, 16][rng.below(5)];
                        let val = size_value(rng, get(&v, at, 8));
                        put(&mut v, at, 8, val);
                    }
                }
                1 => {
                    if let Some(l) = pick(rng, &locator) {
                        let val = size_value(rng, get(&v, l + 8, 8));
                        put(&mut v, l + 8, 8, val);
                    }
                }
                _ => {
                    if let Some(e) = pick(rng, &eocd) {
                        let (at, w) =
                            [(8usize, 2usize), (10, 2), (12, 4), (16, 4), (20, 2)][rng.below(5)];
                        let val = size_value(rng, get(&v, e + at, w));
                        put(&mut v, e + at, w, val);
                    }
                }
            }
        }
        7 => {
            // Truncated at, or just around, a structure boundary.
            let all: Vec<usize> = central
                .iter()
                .chain(&local)
                .chain(&eocd64)
                .chain(&locator)
                .chain(&eocd)
                .copied()
                .collect();
            if let Some(at) = pick(rng, &all) {
                let cut = (at + rng.below(48)).saturating_sub(8).min(v.len());
                v.truncate(cut);
            }
        }
        8 => {
            // A central entry duplicated (the same name twice, two entries
            // over one range).
            if let Some(h) = pick(rng, &central) {
                let n = 46
                    + get(&v, h + 28, 2) as usize
                    + get(&v, h + 30, 2) as usize
                    + get(&v, h + 32, 2) as usize;
                if h + n <= v.len() {
                    let copy = v[h..h + n].to_vec();
                    v.splice(h..h, copy);
                }
            }
        }
        9 => {
            // Flags: encryption, data descriptor, UTF-8 names.
            let bit = [1u64, 8, 0x800, 0x40][rng.below(4)];
            let (h, off) = match rng.below(2) {
                0 => (pick(rng, &central), 8),
                _ => (pick(rng, &local), 6),
            };
            if let Some(h) = h {
                let f = get(&v, h + off, 2) ^ bit;
                put(&mut v, h + off, 2, f);
            }
        }
        _ => {
            // Local and central names disagree.
            if let Some(h) = pick(rng, &local) {
                let n = get(&v, h + 26, 2) as usize;
                if n > 0 && h + 30 + n <= v.len() {
                    let i = h + 30 + rng.below(n);
                    v[i] ^= 1 << rng.below(7);
                }
            }
        }
    }
    v
}
