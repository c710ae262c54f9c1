//! The tokenizer built from a SentencePiece `tokenizer.model`, on the committed
//! tiny BPE model (`tests/fixtures/sentencepiece/`), against the ids
//! transformers 5.24's `GemmaTokenizer` gives for the same file.

use lumina2_text_encoder::GemmaTokenizer;

const TINY: &[u8] = include_bytes!("fixtures/sentencepiece/tiny_bpe.model");

fn ids(tok: &GemmaTokenizer, text: &str) -> Vec<u32> {
    tok.inner().encode(text, true).unwrap().get_ids().to_vec()
}

#[test]
fn tiny_model_matches_transformers() {
    let tok = GemmaTokenizer::from_sentencepiece(TINY, "tiny_bpe.model").unwrap();
    assert_eq!(
        ids(&tok, "a cat  on\ta mat<mask> x<b>"),
        [2, 361, 350, 360, 335, 381, 361, 354, 4, 360, 388, 6]
    );
    assert_eq!(tok.pad_id(), 0);
}

/// A protobuf `tokenizer.model` with the given pieces (all NORMAL except the
/// listed control ones) and a BPE trainer spec.
fn spm_bytes(pieces: &[String], control: &[&str]) -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::new();
    for p in pieces {
        let mut sp = vec![0x0a];
        varint(p.len() as u64, &mut sp);
        sp.extend_from_slice(p.as_bytes());
        sp.push(0x18); // type
        sp.push(if control.contains(&p.as_str()) { 3 } else { 1 });
        out.push(0x0a);
        varint(sp.len() as u64, &mut out);
        out.extend_from_slice(&sp);
    }
    out.extend_from_slice(&[0x12, 0x02, 0x18, 0x02]); // trainer_spec { model_type: BPE }
    out
}

#[test]
fn named_specials_and_hostile_models() {
    let mut pieces: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
        .map(String::from)
        .to_vec();
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    pieces.extend(["a", "b", "ab", "▁", "▁ab"].map(String::from));
    let tok = GemmaTokenizer::from_sentencepiece(
        &spm_bytes(&pieces, &["<pad>", "<eos>", "<bos>", "<mask>"]),
        "synthetic",
    )
    .unwrap();
    // "▁ab" = ▁ + ab (merge of the pieces), "c" through byte fallback.
    assert_eq!(ids(&tok, "ab abc<eos>"), [2, 263, 265, 5 + 0x63, 1]);
    let err = |b: &[u8]| {
        GemmaTokenizer::from_sentencepiece(b, "x.safetensors: spiece_model")
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[]).contains("x.safetensors: spiece_model"));
    // A duplicate piece.
    let mut dup = pieces.clone();
    dup.push("ab".into());
    assert!(err(&spm_bytes(&dup, &[])).contains("repeats piece"));
    // An empty piece.
    assert!(err(&spm_bytes(&["".into()], &[])).contains("empty"));
    // One piece of 100000 characters: too much merge work.
    assert!(err(&spm_bytes(&["x".repeat(100_000)], &[])).contains("limit"));
}

/// Gemma's vocabulary size: generating the merges must stay fast.
#[test]
fn a_256000_piece_model_builds_quickly() {
    let mut pieces: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
        .map(String::from)
        .to_vec();
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let alphabet: Vec<char> = "▁abcdefghijklmnopqrstuvwxyzé日本".chars().collect();
    pieces.extend(alphabet.iter().map(|c| c.to_string()));
    let mut i = 0usize;
    let mut seen: std::collections::HashSet<String> = pieces.iter().cloned().collect();
    while pieces.len() < 256_000 {
        let n = 2 + i % 14;
        let w: String = (0..n)
            .map(|k| alphabet[(i.wrapping_mul(2654435761) >> (k * 3)) % alphabet.len()])
            .collect();
        if seen.insert(w.clone()) {
            pieces.push(w);
        }
        i += 1;
    }
    let bytes = spm_bytes(&pieces, &["<pad>", "<eos>", "<bos>", "<mask>"]);
    let t0 = std::time::Instant::now();
    let tok = GemmaTokenizer::from_sentencepiece(&bytes, "synthetic").unwrap();
    eprintln!(
        "256000 pieces ({} bytes): tokenizer built in {:?}",
        bytes.len(),
        t0.elapsed()
    );
    assert_eq!(tok.inner().get_vocab_size(true), 256_000);
    assert_eq!(ids(&tok, "")[0], 2);
}
