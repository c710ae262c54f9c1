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
