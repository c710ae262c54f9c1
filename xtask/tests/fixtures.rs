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

/// A case laid out differently from ours, as another tool might write it: nested
/// deeper, the model in a sub-folder under another name and re-sharded with an
/// index, unknown keys in case.json, extra files; and a single-file variant with
/// `model_config`.
#[test]
fn a_case_written_by_another_tool_runs() {
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;

    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/lumina2-transformer/tests/fixtures/transformer/tiny_f32");
    let tmp = std::env::temp_dir().join(format!("lumina2-foreign-{}", std::process::id()));
    let case_dir = tmp.join("suite").join("deep").join("case-1");
    let model_dir = case_dir.join("weights").join("dit");
    std::fs::create_dir_all(&model_dir).unwrap();
    for f in ["inputs.safetensors", "expected.safetensors"] {
        std::fs::copy(src.join(f), case_dir.join(f)).unwrap();
    }
    std::fs::copy(src.join("model/config.json"), model_dir.join("config.json")).unwrap();
    // Re-shard the weights into two files with an index.
    let all: HashMap<String, Tensor> = candle_core::safetensors::load(
        src.join("model/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (k, v)) in all.iter().enumerate() {
        let (shard, name) = if i % 2 == 0 {
            (&mut a, "part-1.safetensors")
        } else {
            (&mut b, "part-2.safetensors")
        };
        shard.insert(k.clone(), v.clone());
        weight_map.insert(k.clone(), name.into());
    }
    candle_core::safetensors::save(&a, model_dir.join("part-1.safetensors")).unwrap();
    candle_core::safetensors::save(&b, model_dir.join("part-2.safetensors")).unwrap();
    std::fs::write(
        model_dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let tol = r#""tolerance": {"atol": 1e-5, "rtol": 1e-4}"#;
    std::fs::write(
        case_dir.join("case.json"),
        format!(
            r#"{{"component": "transformer", "model": "weights/dit", "author": "elsewhere", {tol}}}"#
        ),
    )
    .unwrap();
    std::fs::write(case_dir.join("notes.txt"), "extra files are ignored").unwrap();

    // The same model as one file, config elsewhere.
    let single = tmp.join("suite").join("single");
    std::fs::create_dir_all(single.join("cfg")).unwrap();
    for f in ["inputs.safetensors", "expected.safetensors"] {
        std::fs::copy(src.join(f), single.join(f)).unwrap();
    }
    std::fs::copy(
        src.join("model/config.json"),
        single.join("cfg/config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(&all, single.join("dit.safetensors")).unwrap();
    std::fs::write(
        single.join("case.json"),
        format!(
            r#"{{"component": "transformer", "model": "dit.safetensors", "model_config": "cfg", "dtype": "f32", {tol}}}"#
        ),
    )
    .unwrap();

    let (passed, failed) = xtask::parity::run_dir(&tmp, &RunOptions::default()).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_eq!((passed, failed), (2, 0));
}

/// The loader's LoRA fixtures (`args.lora` on `transformer` cases: PEFT with
/// alpha, two LoRAs, ComfyUI fused qkv, kohya, a Q4_0 GGUF base) pass through
/// the runner, and a `lora` entry naming no file fails with a reason.
#[test]
fn lora_cases_run_and_a_missing_lora_file_is_reported() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/lumina2-loader/tests/fixtures/lora");
    let cases = find_cases(&dir).unwrap();
    assert!(cases.len() >= 6, "only {} LoRA cases", cases.len());
    for case in &cases {
        let rel = case.display().to_string();
        let r = run_case(&Case::load(case).unwrap(), &rel, &RunOptions::default());
        for row in &r.rows {
            assert!(row.pass, "{rel}: worst {} {}", row.worst, row.note);
        }
    }

    let tmp = std::env::temp_dir().join(format!("lumina2-lora-{}", std::process::id()));
    let src = dir.join("peft_alpha_f32");
    std::fs::create_dir_all(tmp.join("model")).unwrap();
    for f in [
        "inputs.safetensors",
        "expected.safetensors",
        "model/config.json",
        "model/diffusion_pytorch_model.safetensors",
    ] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    std::fs::write(
        tmp.join("case.json"),
        r#"{"component": "transformer", "model": "model", "tolerance": {"atol": 1e-5, "rtol": 1e-4},
            "args": {"lora": [{"path": "absent.safetensors", "scale": 1.0}]}}"#,
    )
    .unwrap();
    let r = run_case(&Case::load(&tmp).unwrap(), "absent", &RunOptions::default());
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(!r.rows[0].pass);
    assert!(
        r.rows[0].note.contains("absent.safetensors"),
        "{}",
        r.rows[0].note
    );
}
