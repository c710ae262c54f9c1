//! The committed fixtures of every crate, run through the same runner as
//! `cargo xtask parity --cases DIR` (so the `--cases` path is tested without Python).

use std::path::Path;

use xtask::parity::{find_cases, run_case, Case, RunOptions};

#[test]
fn committed_fixtures_pass_through_the_runner() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("crates");
    let mut n = 0;
    for krate in std::fs::read_dir(&root).unwrap() {
        let fixtures = krate.unwrap().path().join("tests").join("fixtures");
        if !fixtures.is_dir() {
            continue;
        }
        for dir in find_cases(&fixtures).unwrap() {
            let case = Case::load(&dir).unwrap();
            let rel = dir.display().to_string();
            let result = run_case(&case, &rel, &RunOptions::default());
            for row in &result.rows {
                assert!(
                    row.pass,
                    "{rel} {}: worst {} {}",
                    row.tensor, row.worst, row.note
                );
            }
            n += 1;
        }
    }
    assert!(n >= 6, "only {n} fixture cases found");
}

#[test]
fn unknown_and_unimplemented_components_fail_with_a_reason() {
    let tmp = std::env::temp_dir().join(format!("lumina2-xtask-{}", std::process::id()));
    let case_dir = tmp.join("a").join("b");
    std::fs::create_dir_all(&case_dir).unwrap();
    std::fs::write(
        case_dir.join("case.json"),
        r#"{"component": "frobnicate", "tolerance": {"atol": 0, "rtol": 0}}"#,
    )
    .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "x".to_string(),
            candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        )]),
        case_dir.join("expected.safetensors"),
    )
    .unwrap();
    let cases = find_cases(&tmp).unwrap();
    assert_eq!(cases, vec![case_dir.clone()]);
    let r = run_case(
        &Case::load(&case_dir).unwrap(),
        "a/b",
        &RunOptions::default(),
    );
    assert_eq!(r.rows.len(), 1);
    assert!(!r.rows[0].pass);
    assert!(
        r.rows[0].note.contains("unknown component"),
        "{}",
        r.rows[0].note
    );
    let (passed, failed) = xtask::parity::run_dir(&tmp, &RunOptions::default()).unwrap();
    assert_eq!((passed, failed), (0, 1));
    std::fs::remove_dir_all(&tmp).unwrap();
}
