//! The tokenizer transformers 5.24 builds for `GemmaTokenizer` from a
//! SentencePiece `tokenizer.model` (no `tokenizer.json`):
//! `TokenizersBackend._convert_from_sentencepiece` →
//! `SentencePieceExtractor.extract(BPE)` (`convert_slow_tokenizer.py`) →
//! `GemmaTokenizer.__init__` (`models/gemma/tokenization_gemma.py`).
//!
//! - vocabulary: the pieces in file order, id = position;
//! - merges: `generate_merges(vocab)` (`tokenization_utils_base.py`), see
//!   [`generate_merges`];
//! - model: `BPE(fuse_unk=True, unk_token="<unk>", byte_fallback=True)`
//!   whatever the file's own `byte_fallback` says, as transformers does;
//! - normaliser `Replace(" ", "▁")`, pre-tokeniser `Split(" ",
//!   merged_with_previous)` (after the normaliser no space is left, so it
//!   splits nothing; kept to be the same object), decoder `Replace("▁", " "),
//!   ByteFallback, Fuse`;
//! - added tokens: control pieces as special tokens, user-defined pieces as
//!   plain added tokens (both matched on the raw text), then Gemma's named
//!   special tokens `<pad> <eos> <bos> <unk> <mask>`;
//! - post-processor `<bos> $A` (`<bos> $A <bos>:1 $B:1` for pairs): what
//!   transformers sets with Gemma's `add_bos_token=True`.
//!
//! The file's `add_dummy_prefix` and `escape_whitespaces` flags are not used:
//! transformers' `GemmaTokenizer` ignores them too (Gemma's file has
//! `add_dummy_prefix: false`).

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::sentencepiece::{PieceType, SentencePieceError, SentencePieceModel};

/// The most merge-generation work accepted: the sum over pieces of
/// (characters - 1) x bytes, i.e. the bytes hashed while looking up every
/// split. Gemma's 256000 pieces need about 7 million; the limit only stops
/// hostile files with huge pieces from taking minutes.
pub const MAX_MERGE_WORK: u64 = 1 << 30;

/// Gemma's named special tokens (`GemmaTokenizer.__init__` defaults), in the
/// order transformers registers them.
const NAMED_SPECIAL_TOKENS: [&str; 5] = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"];

/// `GemmaTokenizer`'s unknown and beginning-of-sequence tokens.
pub const UNK_TOKEN: &str = "<unk>";
/// See [`UNK_TOKEN`].
pub const BOS_TOKEN: &str = "<bos>";

/// Checks the pieces (non-empty, distinct, not absurdly long) and returns the
/// vocabulary: piece → id.
fn vocabulary(model: &SentencePieceModel) -> Result<HashMap<&str, u32>, SentencePieceError> {
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(model.pieces.len());
    let mut work: u64 = 0;
    for (id, p) in model.pieces.iter().enumerate() {
        if p.piece.is_empty() {
            return Err(SentencePieceError::EmptyPiece(id));
        }
        let chars = p.piece.chars().count() as u64;
        work = work.saturating_add((chars - 1).saturating_mul(p.piece.len() as u64));
        // Ids are u32 in tokenizers; the file size bounds the count far below.
        let id32 = u32::try_from(id).map_err(|_| SentencePieceError::TooLong {
            work: u64::MAX,
            max: MAX_MERGE_WORK,
        })?;
        if let Some(&first) = vocab.get(p.piece.as_str()) {
            return Err(SentencePieceError::DuplicatePiece {
                id,
                first: first as usize,
                piece: p.piece.clone(),
            });
        }
        vocab.insert(&p.piece, id32);
    }
    if work > MAX_MERGE_WORK {
        return Err(SentencePieceError::TooLong {
            work,
            max: MAX_MERGE_WORK,
        });
    }
    Ok(vocab)
}

/// transformers' `generate_merges(vocab)` without scores: for every piece in
/// id order, every split `piece[:i], piece[i:]` (at character boundaries)
/// whose two halves are in the vocabulary, then a stable sort by (id of the
/// piece, length of the left half, length of the right half). The iteration
/// already yields that order (ids ascending, then `i` ascending), so the
/// sort is the identity and is not performed; the merge rank is the position.
pub fn generate_merges(pieces: &[&str], vocab: &HashMap<&str, u32>) -> Merges {
    let mut merges = Merges::new();
    for piece in pieces {
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((l.to_string(), r.to_string()));
            }
        }
    }
    merges
}

fn build_err(e: impl std::fmt::Display) -> SentencePieceError {
    SentencePieceError::InvalidField {
        offset: 0,
        field: "pieces",
        reason: format!("the tokenizer cannot be built: {e}"),
    }
}

/// Builds the tokenizer from a parsed model.
pub fn build(model: &SentencePieceModel) -> Result<Tokenizer, SentencePieceError> {
    let vocab = vocabulary(model)?;
    let pieces: Vec<&str> = model.pieces.iter().map(|p| p.piece.as_str()).collect();
    let merges = generate_merges(&pieces, &vocab);
    let bpe_vocab: Vocab = vocab.iter().map(|(k, &v)| ((*k).to_string(), v)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .unk_token(UNK_TOKEN.to_string())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(build_err)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(Replace::new(" ", "▁").map_err(build_err)?))
        .map_err(build_err)?;
    tok.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::String(" ".into()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(build_err)?,
    ));
    tok.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(build_err)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ])));
    // Control and user-defined pieces, in id order, matched on the raw text.
    for p in &model.pieces {
        match p.kind {
            PieceType::Control => {
                tok.add_special_tokens([AddedToken::from(p.piece.clone(), true).normalized(false)])
                    .map_err(build_err)?;
            }
            PieceType::UserDefined => {
                tok.add_tokens([AddedToken::from(p.piece.clone(), false).normalized(false)])
                    .map_err(build_err)?;
            }
            _ => {}
        }
    }
    tok.add_special_tokens(
        NAMED_SPECIAL_TOKENS.map(|t| AddedToken::from(t.to_string(), true).normalized(false)),
    )
    .map_err(build_err)?;
    let bos_id = tok
        .token_to_id(BOS_TOKEN)
        .ok_or_else(|| build_err("no <bos> token"))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS_TOKEN} $A"))
        .map_err(build_err)?
        .try_pair(format!("{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1"))
        .map_err(build_err)?
        .special_tokens(vec![(BOS_TOKEN.to_string(), bos_id)])
        .build()
        .map_err(build_err)?;
    tok.with_post_processor(Some(post));
    Ok(tok)
}
