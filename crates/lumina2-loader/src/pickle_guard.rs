//! A scan of a pickle's opcodes that refuses any global outside an allow-list,
//! before anything else reads it.
//!
//! Nothing here executes the pickle (candle's reader does not either); the scan
//! exists so that a checkpoint naming `os.system` or any other callable beyond
//! the tensor rebuild functions and storage types is refused outright instead
//! of being silently half-read.

/// The globals a `torch.save` state dict needs.
const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// Checks every global the pickle names. `Err` says which global or which
/// malformed opcode stopped the scan.
pub fn check_globals(data: &[u8]) -> Result<(), String> {
    let mut pos = 0usize;
    // The last strings pushed, for STACK_GLOBAL (protocol 4+).
    let mut strings: Vec<String> = Vec::new();
    let take = |pos: &mut usize, n: usize| -> Result<std::ops::Range<usize>, String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| format!("truncated pickle at byte {pos}"))?;
        let r = *pos..end;
        *pos = end;
        Ok(r)
    };
    let uint = |r: std::ops::Range<usize>| -> u64 {
        data[r]
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    };
    let line = |pos: &mut usize| -> Result<String, String> {
        let rest = &data[*pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("unterminated line at byte {pos}"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        *pos += n + 1;
        Ok(s)
    };
    let check = |module: &str, name: &str| -> Result<(), String> {
        if ALLOWED.iter().any(|&(m, n)| m == module && n == name) {
            Ok(())
        } else {
            Err(format!("the pickle names the global `{module}.{name}`, which a state dict does not need; refusing to load it"))
        }
    };
    loop {
        let op_at = pos;
        let op = *data
            .get(pos)
            .ok_or_else(|| "pickle ends without STOP".to_string())?;
        pos += 1;
        match op {
            b'.' => return Ok(()),
            // Globals.
            b'c' | b'i' => {
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                check(&module, &name)?;
            }
            0x93 => {
                let n = strings.len();
                if n < 2 {
                    return Err(format!("STACK_GLOBAL without its names at byte {op_at}"));
                }
                check(&strings[n - 2], &strings[n - 1])?;
            }
            0x82..=0x84 => {
                return Err("the pickle uses the extension registry (EXT opcodes)".into())
            }
            // Strings (remembered for STACK_GLOBAL).
            b'X' | 0x8c | 0x8d => {
                let len_bytes = match op {
                    0x8c => 1,
                    b'X' => 4,
                    _ => 8,
                };
                let n = uint(take(&mut pos, len_bytes)?);
                let n = usize::try_from(n).map_err(|_| "string length overflows".to_string())?;
                let r = take(&mut pos, n)?;
                strings.push(String::from_utf8_lossy(&data[r]).into_owned());
                if strings.len() > 2 {
                    strings.remove(0);
                }
            }
            // Length-prefixed byte payloads.
            b'B' | b'T' | 0x8b => {
                let n = uint(take(&mut pos, 4)?) as usize;
                take(&mut pos, n)?;
            }
            b'C' | b'U' | 0x8a => {
                let n = uint(take(&mut pos, 1)?) as usize;
                take(&mut pos, n)?;
            }
            0x8e | 0x96 => {
                let n = usize::try_from(uint(take(&mut pos, 8)?))
                    .map_err(|_| "payload length overflows".to_string())?;
                take(&mut pos, n)?;
            }
            // Fixed-size arguments.
            b'K' | b'q' | b'h' | 0x80 => {
                take(&mut pos, 1)?;
            }
            b'M' => {
                take(&mut pos, 2)?;
            }
            b'J' | b'r' | b'j' => {
                take(&mut pos, 4)?;
            }
            b'G' | 0x95 => {
                take(&mut pos, 8)?;
            }
            // Newline-terminated arguments.
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'p' | b'g' => {
                line(&mut pos)?;
            }
            // No argument.
            b'(' | b'0' | b'1' | b'2' | b'N' | b'R' | b']' | b'a' | b'b' | b'd' | b'}' | b'e'
            | b'l' | b'o' | b's' | b't' | b')' | b'u' | 0x81 | 0x85 | 0x86 | 0x87 | 0x88 | 0x89
            | b'Q' | 0x90 | 0x8f | 0x91 | 0x92 | 0x94 | 0x97 | 0x98 => {}
            other => {
                return Err(format!(
                    "unknown pickle opcode 0x{other:02x} at byte {op_at}"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_globals;

    #[test]
    fn refuses_os_system_by_global() {
        // pickle.dumps of a REDUCE on os.system, protocol 2.
        let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let e = check_globals(p).unwrap_err();
        assert!(e.contains("os.system"), "{e}");
    }

    #[test]
    fn refuses_stack_global_and_ext() {
        // Protocol 4: SHORT_BINUNICODE "builtins", SHORT_BINUNICODE "eval", STACK_GLOBAL.
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(check_globals(p).unwrap_err().contains("builtins.eval"));
        assert!(check_globals(b"\x80\x02\x82\x01.").is_err());
    }

    #[test]
    fn accepts_the_rebuild_globals_and_rejects_garbage() {
        let ok = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00ccollections\nOrderedDict\n)R.";
        assert!(check_globals(ok).is_ok());
        assert!(check_globals(b"\x80\x02").is_err(), "no STOP");
        assert!(
            check_globals(b"X\xff\xff\xff\xff").is_err(),
            "string past the end"
        );
        assert!(check_globals(b"\xff.").is_err(), "unknown opcode");
    }
}
