//! The committed `gguf_quantize` parity case (written by gguf-py, see
//! tests/fixtures/README.md), checked without Python: our quantisers must
//! give gguf-py's `gguf.quants.quantize` bytes exactly.

use std::path::Path;

use lumina2_loader::gguf::{quantize, QUANTIZE_TYPES};
use lumina2_parity::Case;

#[test]
fn quantised_bytes_equal_gguf_py() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_quantize/tiny");
    let case = Case::load(&dir).unwrap();
    assert_eq!(case.component, "gguf_quantize");
    let types = case.args["types"].as_array().unwrap();
    assert_eq!(types.len(), 5);
    let inputs = case.inputs().unwrap();
    let expected = case.expected().unwrap();
    assert_eq!(expected.len(), inputs.len() * types.len());
    for (name, x) in &inputs {
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for t in types {
            let t = t.as_str().unwrap();
            let ty = QUANTIZE_TYPES
                .into_iter()
                .find(|q| q.to_string() == t)
                .unwrap();
            let ours = quantize(ty, &x).unwrap();
            let theirs: Vec<u8> = expected[&format!("{name}.{t}")]
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|b| u8::try_from(b).unwrap())
                .collect();
            assert_eq!(ours, theirs, "{name} as {t}");
        }
    }
}
