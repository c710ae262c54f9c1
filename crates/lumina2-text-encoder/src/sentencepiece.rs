//! SentencePiece's `ModelProto` (the `tokenizer.model` file), read as far as
//! a BPE tokenizer needs it: the pieces (text, score, type), the trainer's
//! model type, byte fallback and special ids, and the normaliser's whitespace
//! flags.
//!
//! The reader is a small protobuf decoder of our own: three message levels
//! known in advance (`ModelProto` → `SentencePiece` / `TrainerSpec` /
//! `NormalizerSpec`), everything else skipped without being decoded, so it
//! never recurses. Every length is checked against the bytes present before it
//! is used and every allocation grows with the input read, so no input makes it
//! panic, loop or allocate beyond a small multiple of its own size.
//! Field numbers are those of `sentencepiece_model.proto` (sentencepiece 0.2).

/// The largest `tokenizer.model` accepted (Gemma's is 4.2 MB).
pub const MAX_SENTENCEPIECE_BYTES: usize = 64 << 20;

/// What is wrong with a `tokenizer.model`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SentencePieceError {
    /// No bytes at all.
    #[error("empty file (no SentencePiece model)")]
    Empty,
    /// More bytes than any real model has.
    #[error("{len} bytes, more than the {max} a SentencePiece model may have here")]
    TooLarge {
        /// The size given.
        len: usize,
        /// [`MAX_SENTENCEPIECE_BYTES`].
        max: usize,
    },
    /// The protobuf encoding is broken (truncated, bad varint, bad length,
    /// unsupported wire type).
    #[error("malformed protobuf at byte {offset} in {message}: {reason}")]
    Malformed {
        /// Where in the file.
        offset: usize,
        /// The message being read (`ModelProto`, `SentencePiece`, ...).
        message: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A known field has the wrong wire type or an invalid value.
    #[error("field `{field}` at byte {offset}: {reason}")]
    InvalidField {
        /// Where in the file.
        offset: usize,
        /// The field (`SentencePiece.piece`, `TrainerSpec.model_type`, ...).
        field: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The model is not a BPE model (Unigram, word or char).
    #[error("model type {0} is not BPE; only SentencePiece BPE models (as Gemma's) can be used")]
    NotBpe(&'static str),
    /// The model has no pieces.
    #[error("no pieces")]
    NoPieces,
    /// Two pieces have the same text (SentencePiece itself refuses such a model).
    #[error("piece {id} `{piece}` repeats piece {first}")]
    DuplicatePiece {
        /// The later id.
        id: usize,
        /// The earlier id.
        first: usize,
        /// The piece.
        piece: String,
    },
    /// A piece is empty (SentencePiece itself refuses such a model).
    #[error("piece {0} is empty")]
    EmptyPiece(usize),
    /// The pieces are so long that generating the merges would take too long.
    #[error("the pieces add up to {work} split positions x bytes, over the limit of {max}; not a real tokenizer")]
    TooLong {
        /// Sum over pieces of (characters - 1) x bytes.
        work: u64,
        /// The limit.
        max: u64,
    },
}

type Result<T> = std::result::Result<T, SentencePieceError>;

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece (the default).
    Normal,
    /// The unknown piece.
    Unknown,
    /// A control piece (`<bos>`, `<eos>`, ...): a special token.
    Control,
    /// A user-defined piece: matched in the text as a whole, not special.
    UserDefined,
    /// A piece never produced.
    Unused,
    /// A byte-fallback piece (`<0x41>`).
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry, its id being its position in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece's text (`▁` for spaces).
    pub piece: String,
    /// Its score (BPE: minus its merge rank).
    pub score: f32,
    /// Its kind.
    pub kind: PieceType,
}

/// The parts of a SentencePiece model a BPE tokenizer is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    /// The vocabulary in file order.
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.byte_fallback` (default false).
    pub byte_fallback: bool,
    /// `TrainerSpec.unk_id` (default 0).
    pub unk_id: i64,
    /// `TrainerSpec.bos_id` (default 1).
    pub bos_id: i64,
    /// `TrainerSpec.eos_id` (default 2).
    pub eos_id: i64,
    /// `TrainerSpec.pad_id` (default -1: none).
    pub pad_id: i64,
    /// `NormalizerSpec.add_dummy_prefix` (default true).
    pub add_dummy_prefix: bool,
    /// `NormalizerSpec.escape_whitespaces` (default true).
    pub escape_whitespaces: bool,
}

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A cursor over one message's bytes; `base` is the message's offset in the
/// file, for error messages.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize, message: &'static str) -> Self {
        Self {
            buf,
            pos: 0,
            base,
            message,
        }
    }

    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn malformed(&self, reason: impl Into<String>) -> SentencePieceError {
        SentencePieceError::Malformed {
            offset: self.offset(),
            message: self.message,
            reason: reason.into(),
        }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        // A varint has at most 10 bytes (64 bits in 7-bit groups).
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(self.malformed("truncated varint"));
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.malformed("varint longer than 10 bytes"))
    }

    /// The next field's number and wire type.
    fn key(&mut self) -> Result<(u64, u8)> {
        let k = self.varint()?;
        let wire = (k & 7) as u8;
        let field = k >> 3;
        if field == 0 {
            return Err(self.malformed("field number 0"));
        }
        Ok((field, wire))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.malformed(format!(
                    "{n} bytes claimed, {} left",
                    self.buf.len() - self.pos
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// A length-delimited payload and its offset in the file.
    fn bytes(&mut self) -> Result<(&'a [u8], usize)> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| self.malformed(format!("length {n}")))?;
        let start = self.offset();
        Ok((self.take(n)?, start))
    }

    fn fixed32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Skips a field of an unneeded number.
    fn skip(&mut self, wire: u8) -> Result<()> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => self.take(4).map(drop),
            // Groups (3, 4) are deprecated and absent from sentencepiece's proto.
            w => Err(self.malformed(format!("unsupported wire type {w}"))),
        }
    }

    fn expect_wire(&self, field: &'static str, wire: u8, want: u8) -> Result<()> {
        if wire == want {
            Ok(())
        } else {
            Err(SentencePieceError::InvalidField {
                offset: self.offset(),
                field,
                reason: format!("wire type {wire}, expected {want}"),
            })
        }
    }

    fn int32(&mut self, field: &'static str, wire: u8) -> Result<i64> {
        self.expect_wire(field, wire, VARINT)?;
        // int32 is sign-extended to 64 bits on the wire.
        Ok(i64::from(self.varint()? as u32 as i32))
    }

    fn boolean(&mut self, field: &'static str, wire: u8) -> Result<bool> {
        self.expect_wire(field, wire, VARINT)?;
        Ok(self.varint()? != 0)
    }

    fn string(&mut self, field: &'static str, wire: u8) -> Result<String> {
        self.expect_wire(field, wire, LEN)?;
        let (b, at) = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|e| SentencePieceError::InvalidField {
            offset: at,
            field,
            reason: format!("not UTF-8: {e}"),
        })
    }

    /// A nested message's reader.
    fn message(&mut self, field: &'static str, wire: u8, name: &'static str) -> Result<Self> {
        self.expect_wire(field, wire, LEN)?;
        let (b, at) = self.bytes()?;
        Ok(Reader::new(b, at, name))
    }
}

fn parse_piece(mut r: Reader<'_>) -> Result<Piece> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            1 => piece.piece = r.string("SentencePiece.piece", wire)?,
            2 => {
                r.expect_wire("SentencePiece.score", wire, FIXED32)?;
                piece.score = f32::from_bits(r.fixed32()?);
            }
            3 => {
                r.expect_wire("SentencePiece.type", wire, VARINT)?;
                let at = r.offset();
                let v = r.varint()?;
                piece.kind =
                    PieceType::from_proto(v).ok_or_else(|| SentencePieceError::InvalidField {
                        offset: at,
                        field: "SentencePiece.type",
                        reason: format!("unknown piece type {v}"),
                    })?;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(piece)
}

/// `TrainerSpec.ModelType` by number.
fn model_type_name(v: u64) -> &'static str {
    match v {
        1 => "UNIGRAM",
        2 => "BPE",
        3 => "WORD",
        4 => "CHAR",
        _ => "unknown",
    }
}

/// Parses a `tokenizer.model` and checks it is a usable BPE model.
pub fn parse(bytes: &[u8]) -> Result<SentencePieceModel> {
    if bytes.is_empty() {
        return Err(SentencePieceError::Empty);
    }
    if bytes.len() > MAX_SENTENCEPIECE_BYTES {
        return Err(SentencePieceError::TooLarge {
            len: bytes.len(),
            max: MAX_SENTENCEPIECE_BYTES,
        });
    }
    let mut m = SentencePieceModel {
        pieces: Vec::new(),
        byte_fallback: false,
        unk_id: 0,
        bos_id: 1,
        eos_id: 2,
        pad_id: -1,
        add_dummy_prefix: true,
        escape_whitespaces: true,
    };
    // The proto's default model type is UNIGRAM, also when `trainer_spec` is absent.
    let mut model_type: u64 = 1;
    let mut r = Reader::new(bytes, 0, "ModelProto");
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                let sub = r.message("ModelProto.pieces", wire, "SentencePiece")?;
                m.pieces.push(parse_piece(sub)?);
            }
            2 => {
                let mut t = r.message("ModelProto.trainer_spec", wire, "TrainerSpec")?;
                while !t.at_end() {
                    let (field, wire) = t.key()?;
                    match field {
                        3 => {
                            t.expect_wire("TrainerSpec.model_type", wire, VARINT)?;
                            model_type = t.varint()?;
                        }
                        35 => m.byte_fallback = t.boolean("TrainerSpec.byte_fallback", wire)?,
                        40 => m.unk_id = t.int32("TrainerSpec.unk_id", wire)?,
                        41 => m.bos_id = t.int32("TrainerSpec.bos_id", wire)?,
                        42 => m.eos_id = t.int32("TrainerSpec.eos_id", wire)?,
                        43 => m.pad_id = t.int32("TrainerSpec.pad_id", wire)?,
                        _ => t.skip(wire)?,
                    }
                }
            }
            3 => {
                let mut n = r.message("ModelProto.normalizer_spec", wire, "NormalizerSpec")?;
                while !n.at_end() {
                    let (field, wire) = n.key()?;
                    match field {
                        3 => {
                            m.add_dummy_prefix =
                                n.boolean("NormalizerSpec.add_dummy_prefix", wire)?
                        }
                        5 => {
                            m.escape_whitespaces =
                                n.boolean("NormalizerSpec.escape_whitespaces", wire)?
                        }
                        _ => n.skip(wire)?,
                    }
                }
            }
            _ => r.skip(wire)?,
        }
    }
    if model_type != 2 {
        return Err(SentencePieceError::NotBpe(model_type_name(model_type)));
    }
    if m.pieces.is_empty() {
        return Err(SentencePieceError::NoPieces);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field_bytes(field: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    fn bpe_model(pieces: &[(&str, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (p, t) in pieces {
            let mut sp = Vec::new();
            field_bytes(1, p.as_bytes(), &mut sp);
            sp.push(2 << 3 | 5);
            sp.extend_from_slice(&(-1.5f32).to_le_bytes());
            varint(3 << 3, &mut sp);
            varint(*t, &mut sp);
            field_bytes(1, &sp, &mut out);
        }
        let mut ts = Vec::new();
        varint(3 << 3, &mut ts);
        varint(2, &mut ts);
        varint(35 << 3, &mut ts);
        varint(1, &mut ts);
        varint(43 << 3, &mut ts);
        varint(u64::MAX, &mut ts); // -1 as int32 on the wire
        field_bytes(2, &ts, &mut out);
        out
    }

    #[test]
    fn reads_pieces_and_specs() {
        let b = bpe_model(&[("<unk>", 2), ("a", 1), ("<bos>", 3)]);
        let m = parse(&b).unwrap();
        assert_eq!(m.pieces.len(), 3);
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.pieces[1].piece, "a");
        assert_eq!(m.pieces[1].score, -1.5);
        assert_eq!(m.pieces[2].kind, PieceType::Control);
        assert!(m.byte_fallback);
        assert_eq!(m.pad_id, -1);
        assert!(m.add_dummy_prefix);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = bpe_model(&[("<unk>", 2), ("ab", 1), ("<bos>", 3)]);
        for n in 0..b.len() {
            // Some prefixes end on a field boundary and parse (with fewer
            // pieces or no trainer spec: then not BPE); none may panic.
            let _ = parse(&b[..n]);
        }
        assert_eq!(parse(&[]), Err(SentencePieceError::Empty));
        assert!(matches!(
            parse(&b[..b.len() - 1]),
            Err(SentencePieceError::Malformed { .. })
        ));
    }

    #[test]
    fn hostile_inputs_are_errors() {
        // A length of 10^9 with nothing behind it.
        let mut b = Vec::new();
        varint(1 << 3 | 2, &mut b);
        varint(1_000_000_000, &mut b);
        assert!(matches!(
            parse(&b),
            Err(SentencePieceError::Malformed { .. })
        ));
        // A varint that never ends.
        assert!(matches!(
            parse(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(SentencePieceError::Malformed { .. })
        ));
        // `pieces` as a varint.
        assert!(matches!(
            parse(&[1 << 3, 5]),
            Err(SentencePieceError::InvalidField { .. })
        ));
        // A piece with an unknown type.
        assert!(matches!(
            parse(&bpe_model(&[("a", 9)])),
            Err(SentencePieceError::InvalidField { .. })
        ));
        // Not UTF-8.
        let mut b = Vec::new();
        let mut sp = Vec::new();
        field_bytes(1, &[0xff, 0xfe], &mut sp);
        field_bytes(1, &sp, &mut b);
        let e = parse(&b);
        assert!(
            matches!(e, Err(SentencePieceError::InvalidField { .. })),
            "{e:?}"
        );
        // A group wire type.
        assert!(matches!(
            parse(&[9 << 3 | 3]),
            Err(SentencePieceError::Malformed { .. })
        ));
        // Pieces but no trainer spec: Unigram by the proto's default.
        let mut b = Vec::new();
        field_bytes(1, &[0x0a, 0x01, b'a'], &mut b);
        assert_eq!(parse(&b), Err(SentencePieceError::NotBpe("UNIGRAM")));
    }

    #[test]
    fn refuses_unigram() {
        let mut b = Vec::new();
        field_bytes(1, &[0x0a, 0x01, b'a'], &mut b);
        field_bytes(2, &[3 << 3, 1], &mut b);
        assert_eq!(parse(&b), Err(SentencePieceError::NotBpe("UNIGRAM")));
    }
}
