//! Pipeline folders as diffusers' `save_pretrained` writes them
//! (`fixtures/pipeline/layout.json`, see `fixtures/pipeline/README.md`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use lumina2_loader::{Component, Error, PipelineFolder};
use serde_json::{json, Value};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lumina2-pipeline-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn layout(name: &str) -> serde_json::Map<String, Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/layout.json");
    let v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    v[name].as_object().unwrap().clone()
}

/// Writes the recorded files (weights as placeholders) under a new folder.
fn lay_out(name: &str) -> TempDir {
    let d = TempDir::new(name);
    for (rel, content) in layout(name) {
        let p = d.0.join(&rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let bytes = content
            .as_str()
            .map_or(rel.clone().into_bytes(), |s| s.as_bytes().to_vec());
        fs::write(p, bytes).unwrap();
    }
    d
}

fn edit_index(d: &TempDir, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = d.0.join("model_index.json");
    let mut v: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    fs::write(p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The shards a recorded index lists, by file name.
fn shards_of(name: &str, index: &str) -> Vec<String> {
    let l = layout(name);
    let v: Value = serde_json::from_str(l[index].as_str().unwrap()).unwrap();
    let set: BTreeSet<String> = v["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    set.into_iter().collect()
}

fn file_names(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_saved_pipeline_opens() {
    let d = lay_out("single");
    let p = PipelineFolder::open(&d.0).unwrap();
    assert_eq!(p.class_name(), "Lumina2Pipeline");
    let index: Value =
        serde_json::from_str(layout("single")["model_index.json"].as_str().unwrap()).unwrap();
    assert_eq!(p.diffusers_version(), index["_diffusers_version"].as_str());
    for c in Component::ALL {
        assert_eq!(p.component_class(c), index[c.name()][1].as_str().unwrap());
    }
    assert_eq!(p.root(), d.0.as_path());
    assert_eq!(p.transformer_dir(), d.0.join("transformer"));
    assert_eq!(p.text_encoder_dir(), d.0.join("text_encoder"));
    assert_eq!(p.vae_dir(), d.0.join("vae"));
    assert_eq!(p.tokenizer_file(), d.0.join("tokenizer/tokenizer.json"));
    assert_eq!(
        p.scheduler_config(),
        d.0.join("scheduler/scheduler_config.json")
    );
    assert!(p.tokenizer_file().is_file() && p.scheduler_config().is_file());

    let t = p.component_folder(Component::Transformer).unwrap();
    assert_eq!(
        file_names(t.safetensors_files()),
        ["diffusion_pytorch_model.safetensors"]
    );
    let te = p.component_folder(Component::TextEncoder).unwrap();
    assert_eq!(file_names(te.safetensors_files()), ["model.safetensors"]);
    assert!(matches!(
        p.component_folder(Component::Scheduler),
        Err(Error::Folder(_))
    ));
}

#[test]
fn a_sharded_pipeline_resolves_every_shard() {
    let d = lay_out("sharded");
    let p = PipelineFolder::open(&d.0).unwrap();
    for (c, index) in [
        (
            Component::Transformer,
            "transformer/diffusion_pytorch_model.safetensors.index.json",
        ),
        (
            Component::Vae,
            "vae/diffusion_pytorch_model.safetensors.index.json",
        ),
        (
            Component::TextEncoder,
            "text_encoder/model.safetensors.index.json",
        ),
    ] {
        let f = p.component_folder(c).unwrap();
        let expected = shards_of("sharded", index);
        assert!(expected.len() > 1, "{index} is not sharded");
        assert_eq!(file_names(f.safetensors_files()), expected);
        assert_eq!(f.index_file(), Some(d.0.join(index).as_path()));
    }
}

#[test]
fn accepted_class_names_and_ignored_entries() {
    let d = lay_out("single");
    edit_index(&d, |m| {
        m.insert("_class_name".into(), json!("Lumina2Text2ImgPipeline"));
        m.insert(
            "text_encoder".into(),
            json!(["transformers", "Gemma2ForCausalLM"]),
        );
        m.insert(
            "tokenizer".into(),
            json!(["transformers", "GemmaTokenizerFast"]),
        );
        // Absent optional components and pipeline config values are not components.
        m.insert("safety_checker".into(), json!([null, null]));
        m.insert("feature_extractor".into(), Value::Null);
        m.insert("requires_safety_checker".into(), json!(true));
        m.insert("_name_or_path".into(), json!("somewhere"));
        m.remove("_diffusers_version");
    });
    let p = PipelineFolder::open(&d.0).unwrap();
    assert_eq!(p.class_name(), "Lumina2Text2ImgPipeline");
    assert_eq!(
        p.component_class(Component::TextEncoder),
        "Gemma2ForCausalLM"
    );
    assert_eq!(p.diffusers_version(), None);
}

fn open_edited(f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Error {
    let d = lay_out("single");
    edit_index(&d, f);
    let e = PipelineFolder::open(&d.0).expect_err("an error");
    // Every message names the index file.
    assert!(e.to_string().contains("model_index.json"), "{e}");
    e
}

#[test]
fn missing_and_null_components() {
    let e = open_edited(|m| {
        m.remove("vae");
    });
    assert!(
        matches!(&e, Error::MissingComponent { component, null: false, .. } if component == "vae"),
        "{e}"
    );
    for null in [json!([null, null]), Value::Null] {
        let e = open_edited(|m| {
            m.insert("transformer".into(), null);
        });
        assert!(
            matches!(&e, Error::MissingComponent { component, null: true, .. } if component == "transformer"),
            "{e}"
        );
        assert!(e.to_string().contains("`transformer` is null"), "{e}");
    }
}

#[test]
fn unexpected_components_and_classes() {
    let e = open_edited(|m| {
        m.insert(
            "safety_checker".into(),
            json!(["stable_diffusion", "StableDiffusionSafetyChecker"]),
        );
    });
    assert!(
        matches!(&e, Error::UnexpectedComponent { component, class, .. }
            if component == "safety_checker" && class == "StableDiffusionSafetyChecker"),
        "{e}"
    );
    let e = open_edited(|m| {
        m.insert(
            "text_encoder".into(),
            json!(["transformers", "T5EncoderModel"]),
        );
    });
    assert!(
        matches!(&e, Error::ComponentClass { component, found, expected, .. }
            if component == "text_encoder" && found == "transformers.T5EncoderModel"
                && expected.iter().any(|x| x == "transformers.Gemma2Model")),
        "{e}"
    );
    let e = open_edited(|m| {
        m.insert("vae".into(), json!(["transformers", "AutoencoderKL"]));
    });
    assert!(
        matches!(&e, Error::ComponentClass { component, .. } if component == "vae"),
        "{e}"
    );
    let e = open_edited(|m| {
        m.insert("_class_name".into(), json!("StableDiffusionPipeline"));
    });
    assert!(
        matches!(&e, Error::PipelineClass { found, .. } if found == "StableDiffusionPipeline"),
        "{e}"
    );
    let e = open_edited(|m| {
        m.insert("scheduler".into(), json!(["diffusers", 3]));
    });
    assert!(matches!(&e, Error::ModelIndex { .. }), "{e}");
    let e = open_edited(|m| {
        m.remove("_class_name");
    });
    assert!(matches!(&e, Error::ModelIndex { .. }), "{e}");
}

#[test]
fn missing_component_files() {
    let d = lay_out("single");
    fs::remove_file(d.0.join("tokenizer/tokenizer.json")).unwrap();
    match PipelineFolder::open(&d.0) {
        Err(Error::ComponentFile { component, path }) => {
            assert_eq!(component, "tokenizer");
            assert_eq!(path, d.0.join("tokenizer/tokenizer.json"));
        }
        other => panic!("{other:?}"),
    }
    let d = lay_out("single");
    fs::remove_dir_all(d.0.join("vae")).unwrap();
    assert!(matches!(
        PipelineFolder::open(&d.0),
        Err(Error::ComponentFile { component, .. }) if component == "vae"
    ));
    let d = lay_out("single");
    fs::remove_file(d.0.join("scheduler/scheduler_config.json")).unwrap();
    assert!(matches!(
        PipelineFolder::open(&d.0),
        Err(Error::ComponentFile { component, .. }) if component == "scheduler"
    ));

    let d = TempDir::new("no-index");
    assert!(matches!(PipelineFolder::open(&d.0), Err(Error::Io { .. })));
    fs::write(d.0.join("model_index.json"), "[1, 2]").unwrap();
    assert!(matches!(
        PipelineFolder::open(&d.0),
        Err(Error::ModelIndex { .. })
    ));
}
