//! Component folders: which safetensors files a folder resolves to, and the
//! validation of shard indexes (`lumina2_weights::folder`, which the loader's
//! `ComponentFolder` wraps).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use lumina2_weights::folder::{ComponentFolder, FolderError, ShardIndex};
use lumina2_weights::SafetensorsSource;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lumina2-folder-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn write(&self, rel: &str, content: &[u8]) -> PathBuf {
        let p = self.0.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A safetensors file holding one f32 scalar per key.
fn safetensors(keys: &[&str]) -> Vec<u8> {
    let entries: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                r#""{k}":{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}}"#,
                4 * i,
                4 * i + 4
            )
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, 4 * keys.len()));
    out
}

fn index(entries: &[(&str, &str)]) -> Vec<u8> {
    let map: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{:?}: {:?}", k, v))
        .collect();
    format!(
        "{{\"metadata\": {{\"total_size\": 8}}, \"weight_map\": {{{}}}}}",
        map.join(", ")
    )
    .into_bytes()
}

fn names(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn open_err(dir: &Path) -> FolderError {
    match ComponentFolder::open(dir) {
        Ok(f) => panic!("expected an error, got {f:?}"),
        Err(e) => e,
    }
}

#[test]
fn the_standard_single_file_wins_over_variants() {
    let d = TempDir::new("single");
    d.write("config.json", b"{}");
    d.write("diffusion_pytorch_model.safetensors", &safetensors(&["a"]));
    d.write(
        "diffusion_pytorch_model.fp16.safetensors",
        &safetensors(&["a"]),
    );
    let f = ComponentFolder::open(&d.0).unwrap();
    assert_eq!(
        names(f.safetensors_files()),
        ["diffusion_pytorch_model.safetensors"]
    );
    assert_eq!(f.index_file(), None);
    assert_eq!(f.config_path(), d.0.join("config.json"));
}

#[test]
fn a_standard_index_lists_the_shards_in_name_order() {
    let d = TempDir::new("sharded");
    d.write(
        "model.safetensors.index.json",
        &index(&[
            ("b", "model-00002-of-00002.safetensors"),
            ("a", "model-00001-of-00002.safetensors"),
            ("c", "model-00002-of-00002.safetensors"),
        ]),
    );
    d.write("model-00001-of-00002.safetensors", &safetensors(&["a"]));
    d.write(
        "model-00002-of-00002.safetensors",
        &safetensors(&["b", "c"]),
    );
    // A stray file next to the shards is not a shard.
    d.write("other.safetensors", &safetensors(&["a"]));
    let f = ComponentFolder::open(&d.0).unwrap();
    assert_eq!(
        names(f.safetensors_files()),
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    assert_eq!(
        f.index_file(),
        Some(d.0.join("model.safetensors.index.json").as_path())
    );
    let src = SafetensorsSource::open(f.safetensors_files()).unwrap();
    assert_eq!(lumina2_weights::WeightSource::keys(&src), ["a", "b", "c"]);
}

#[test]
fn other_names_one_index_or_every_file() {
    let d = TempDir::new("other-index");
    d.write(
        "weights.safetensors.index.json",
        &index(&[("a", "part-1.safetensors")]),
    );
    d.write("part-1.safetensors", &safetensors(&["a"]));
    d.write("part-2.safetensors", &safetensors(&["b"]));
    let f = ComponentFolder::open(&d.0).unwrap();
    assert_eq!(names(f.safetensors_files()), ["part-1.safetensors"]);

    d.write(
        "more.safetensors.index.json",
        &index(&[("b", "part-2.safetensors")]),
    );
    assert!(matches!(
        open_err(&d.0),
        FolderError::AmbiguousIndex { indexes, .. } if indexes.len() == 2
    ));

    let e = TempDir::new("every-file");
    e.write("b.safetensors", &safetensors(&["b"]));
    e.write("a.safetensors", &safetensors(&["a"]));
    let f = ComponentFolder::open(&e.0).unwrap();
    assert_eq!(
        names(f.safetensors_files()),
        ["a.safetensors", "b.safetensors"]
    );
}

#[test]
fn a_file_is_taken_as_is_and_missing_paths_are_errors() {
    let d = TempDir::new("file");
    let file = d.write("anything.safetensors", &safetensors(&["a"]));
    let f = ComponentFolder::open(&file).unwrap();
    assert_eq!(f.safetensors_files(), std::slice::from_ref(&file));
    assert_eq!(f.dir(), d.0.as_path());

    assert!(
        matches!(open_err(&d.0.join("nope")), FolderError::NotFound(p) if p == d.0.join("nope"))
    );
    let empty = TempDir::new("empty");
    empty.write("config.json", b"{}");
    assert!(matches!(open_err(&empty.0), FolderError::NoWeights(p) if p == empty.0));
}

#[test]
fn shards_outside_the_folder_are_refused() {
    for shard in [
        "../evil.safetensors",
        "/etc/evil.safetensors",
        "sub/../../evil.safetensors",
        "",
    ] {
        let d = TempDir::new("outside");
        d.write("model.safetensors.index.json", &index(&[("a", shard)]));
        match open_err(&d.0) {
            FolderError::ShardOutsideFolder {
                key,
                shard: s,
                index,
            } => {
                assert_eq!((key.as_str(), s.as_str()), ("a", shard));
                assert_eq!(index, d.0.join("model.safetensors.index.json"));
            }
            other => panic!("{shard}: {other}"),
        }
    }
}

#[test]
fn missing_shards_are_named() {
    let d = TempDir::new("missing");
    d.write(
        "diffusion_pytorch_model.safetensors.index.json",
        &index(&[
            ("a", "diffusion_pytorch_model-00001-of-00002.safetensors"),
            ("b", "diffusion_pytorch_model-00002-of-00002.safetensors"),
        ]),
    );
    d.write(
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        &safetensors(&["a"]),
    );
    let e = open_err(&d.0);
    assert!(
        matches!(&e, FolderError::MissingShard { shard, .. }
            if *shard == d.0.join("diffusion_pytorch_model-00002-of-00002.safetensors")),
        "{e}"
    );
    assert!(e.to_string().contains("00002-of-00002"), "{e}");
}

#[test]
fn a_key_listed_twice_is_refused_with_both_shards() {
    // JSON objects may repeat a key; serde_json's Value would keep the last one.
    let text =
        br#"{"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "a": "s2.safetensors"}}"#;
    match ShardIndex::parse("model.safetensors.index.json", text) {
        Err(FolderError::DuplicateKey {
            key, first, second, ..
        }) => assert_eq!(
            (key.as_str(), first.as_str(), second.as_str()),
            ("a", "s1.safetensors", "s2.safetensors")
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_key_in_two_shards_is_refused_when_opened() {
    // The index may be right and the shards still overlap: the source refuses them.
    let d = TempDir::new("overlap");
    d.write(
        "model.safetensors.index.json",
        &index(&[("a", "s1.safetensors"), ("b", "s2.safetensors")]),
    );
    d.write("s1.safetensors", &safetensors(&["a"]));
    d.write("s2.safetensors", &safetensors(&["a", "b"]));
    let f = ComponentFolder::open(&d.0).unwrap();
    let e = SafetensorsSource::open(f.safetensors_files())
        .err()
        .expect("duplicate key");
    assert!(e.to_string().contains("`a`"), "{e}");
}

#[test]
fn malformed_indexes_are_typed_errors() {
    let cases: [(&[u8], &str); 6] = [
        (b"{not json", "json"),
        (br#"{"weight_map": 5}"#, "json"),
        (br#"{"weight_map": {"a": 5}}"#, "json"),
        (br#"{"metadata": {}}"#, "format"),
        (br#"{"weight_map": {}}"#, "format"),
        (br#"{"weight_map": {"a": "model.bin"}}"#, "format"),
    ];
    for (text, kind) in cases {
        let r = ShardIndex::parse("x.safetensors.index.json", text);
        let ok = matches!(
            (&r, kind),
            (Err(FolderError::IndexJson { .. }), "json")
                | (Err(FolderError::IndexFormat { .. }), "format")
        );
        assert!(ok, "{}: {r:?}", String::from_utf8_lossy(text));
    }
}

#[test]
fn shard_names_are_unique_and_sorted() {
    let text = index(&[
        ("z", "b.safetensors"),
        ("y", "a.safetensors"),
        ("x", "b.safetensors"),
    ]);
    let idx = ShardIndex::parse("i.json", &text).unwrap();
    assert_eq!(idx.shard_names(), ["a.safetensors", "b.safetensors"]);
    assert_eq!(idx.weight_map().len(), 3);
}

#[test]
fn the_loader_wrapper_gives_the_same_files_and_loader_errors() {
    let d = TempDir::new("wrapper");
    d.write("model.safetensors", &safetensors(&["a"]));
    let f = lumina2_loader::ComponentFolder::open(&d.0).unwrap();
    assert_eq!(
        f.safetensors_files(),
        ComponentFolder::open(&d.0).unwrap().safetensors_files()
    );
    assert_eq!(f.dir(), d.0.as_path());
    let e = lumina2_loader::ComponentFolder::open(d.0.join("nope")).unwrap_err();
    assert!(
        matches!(e, lumina2_loader::Error::Folder(FolderError::NotFound(_))),
        "{e}"
    );
}
