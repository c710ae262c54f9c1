//! The Hub cache, offline: settings and file resolution compared with what
//! Python's huggingface_hub answers (`fixtures/hub/hub_cases.json`, see
//! `fixtures/hub/README.md`), and whole pipelines fetched from a cache laid out
//! here as Python lays it out. Nothing here touches the network.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use lumina2_loader::hub::{is_commit_hash, repo_folder_name, DEFAULT_REPO_ID};
use lumina2_loader::{Component, Error, HubEnv, HubRepo};
use serde_json::Value;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lumina2-hub-{tag}-{}-{}",
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

fn fixture(path: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
}

fn offline_env(cache: &Path) -> HubEnv {
    HubEnv {
        home: cache.join("home"),
        cache_dir: cache.to_path_buf(),
        offline: true,
        token_path: cache.join("token"),
        token: None,
    }
}

#[test]
fn settings_are_read_from_the_environment_as_python_does() {
    let cases = fixture("hub/hub_cases.json");
    for case in cases["env_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let root = TempDir::new("env");
        let r = root.0.to_str().unwrap();
        for (rel, content) in case["files"].as_object().unwrap() {
            let p = root.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content.as_str().unwrap()).unwrap();
        }
        let vars: HashMap<String, String> = case["env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().replace("{root}", r)))
            .collect();
        let got = HubEnv::from_vars(|k| vars.get(k).cloned());
        let exp = &case["expected"];
        let path = |k: &str| PathBuf::from(exp[k].as_str().unwrap().replace("{root}", r));
        assert_eq!(got.home, path("home"), "{name}");
        assert_eq!(got.cache_dir, path("cache_dir"), "{name}");
        assert_eq!(got.token_path, path("token_path"), "{name}");
        assert_eq!(got.offline, exp["offline"].as_bool().unwrap(), "{name}");
        assert_eq!(got.token.as_deref(), exp["token"].as_str(), "{name}");
    }
}

/// Lays out the cache Python wrote (files and relative symlinks, as recorded).
fn python_cache() -> (TempDir, Value) {
    let cases = fixture("hub/hub_cases.json");
    let cache = cases["cache"].clone();
    let d = TempDir::new("python-cache");
    for entry in cache["layout"].as_array().unwrap() {
        let p = d.0.join(entry["path"].as_str().unwrap());
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        match (entry.get("symlink"), entry.get("content")) {
            (Some(target), _) => std::os::unix::fs::symlink(target.as_str().unwrap(), &p).unwrap(),
            (None, Some(c)) => fs::write(&p, c.as_str().unwrap()).unwrap(),
            _ => panic!("bad layout entry {entry}"),
        }
    }
    (d, cache)
}

#[test]
fn files_resolve_as_python_resolves_them_offline() {
    let (d, cache) = python_cache();
    let repo_id = cache["repo_id"].as_str().unwrap();
    let env = offline_env(&d.0);
    for q in cache["queries"].as_array().unwrap() {
        let revision = q["revision"].as_str().unwrap();
        let file = q["file"].as_str().unwrap();
        let repo = HubRepo::with_env(repo_id, &env).revision(revision);
        let got = repo.cached_file(file);
        match (&got, q["expected"].get("ok"), q["expected"].get("error")) {
            (Ok(p), Some(ok), _) => assert_eq!(*p, d.0.join(ok.as_str().unwrap()), "{q}"),
            (Err(Error::NotCached { .. } | Error::RevisionNotCached { .. }), None, Some(e)) => {
                assert_eq!(e, "LocalEntryNotFoundError", "{q}")
            }
            _ => panic!("{q}: got {got:?}"),
        }
        // The snapshot path is a symlink into blobs/, as Python returns it.
        if let Ok(p) = &got {
            assert!(fs::symlink_metadata(p).unwrap().file_type().is_symlink());
        }
    }
}

#[test]
fn a_missing_file_names_repo_revision_file_and_path() {
    let (d, cache) = python_cache();
    let repo_id = cache["repo_id"].as_str().unwrap();
    let repo = HubRepo::with_env(repo_id, &offline_env(&d.0));
    let e = repo.cached_file("transformer/missing.json").unwrap_err();
    let Error::NotCached { searched, .. } = &e else {
        panic!("{e:?}")
    };
    let commit = fs::read_to_string(repo.repo_cache_dir().join("refs/main")).unwrap();
    assert_eq!(
        *searched,
        repo.repo_cache_dir()
            .join("snapshots")
            .join(&commit)
            .join("transformer/missing.json")
    );
    let msg = e.to_string();
    for part in [
        repo_id,
        "`main`",
        "transformer/missing.json",
        searched.to_str().unwrap(),
    ] {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
}

#[test]
fn a_missing_revision_names_the_ref_looked_for() {
    let (d, cache) = python_cache();
    let repo_id = cache["repo_id"].as_str().unwrap();
    let repo = HubRepo::with_env(repo_id, &offline_env(&d.0)).revision("v9");
    let e = repo.cached_file("model_index.json").unwrap_err();
    match &e {
        Error::RevisionNotCached {
            searched, revision, ..
        } => {
            assert_eq!(*searched, repo.repo_cache_dir().join("refs/v9"));
            assert_eq!(revision, "v9");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("offline"), "{e}");
    // A commit hash never downloaded: its snapshot folder is what was looked for.
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let e = HubRepo::with_env(repo_id, &offline_env(&d.0))
        .revision(hash)
        .cached_file("model_index.json")
        .unwrap_err();
    assert!(e.to_string().contains(&format!("snapshots/{hash}")), "{e}");
}

#[test]
fn names_that_would_leave_the_cache_are_refused() {
    let d = TempDir::new("names");
    let env = offline_env(&d.0);
    for id in ["a/b/c", "bad--id", "a..b", "-x", "x.git", "", "a/"] {
        let e = HubRepo::with_env(id, &env).cached_file("f").unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidHubName {
                    what: "repo id",
                    ..
                }
            ),
            "{id}: {e}"
        );
    }
    for rev in ["../x", "/abs", "a/../../b", ""] {
        let e = HubRepo::with_env("org/name", &env)
            .revision(rev)
            .cached_file("f")
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidHubName {
                    what: "revision",
                    ..
                }
            ),
            "{rev}: {e}"
        );
    }
    for file in ["../../etc/passwd", "/etc/passwd", "a\\..\\b"] {
        let e = HubRepo::with_env("org/name", &env)
            .cached_file(file)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidHubName {
                    what: "file name",
                    ..
                }
            ),
            "{file}: {e}"
        );
    }
    assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
    assert!(!is_commit_hash("0123456789ABCDEF0123456789abcdef01234567"));
    assert_eq!(
        repo_folder_name(DEFAULT_REPO_ID),
        "models--Alpha-VLLM--Lumina-Image-2.0"
    );
}

#[test]
fn the_environment_wins_over_online() {
    let d = TempDir::new("offline");
    let repo = HubRepo::with_env("org/name", &offline_env(&d.0)).offline(false);
    assert!(repo.is_offline());
    let mut env = offline_env(&d.0);
    env.offline = false;
    assert!(!HubRepo::with_env("org/name", &env).is_offline());
    assert!(HubRepo::with_env("org/name", &env)
        .offline(true)
        .is_offline());
}

const COMMIT: &str = "5d1c4a0c3e1a9b7f2e6d8c0b4a2f1e3d5c7b9a11";

/// A Hub cache holding the sharded pipeline of `fixtures/pipeline/layout.json`
/// at `COMMIT`, with `refs/main` pointing at it, laid out as Python's
/// `hf_hub_download` does: content in `blobs/<etag>`, relative symlinks in
/// `snapshots/<commit>/`.
fn pipeline_cache() -> (TempDir, BTreeSet<String>) {
    let layout = fixture("pipeline/layout.json");
    let d = TempDir::new("pipeline-cache");
    let repo = d.0.join(repo_folder_name(DEFAULT_REPO_ID));
    let mut files = BTreeSet::new();
    for (i, (rel, content)) in layout["sharded"].as_object().unwrap().iter().enumerate() {
        let bytes = content
            .as_str()
            .map_or(rel.clone().into_bytes(), |s| s.as_bytes().to_vec());
        let etag = format!("{i:040x}");
        fs::create_dir_all(repo.join("blobs")).unwrap();
        fs::write(repo.join("blobs").join(&etag), bytes).unwrap();
        let pointer = repo.join("snapshots").join(COMMIT).join(rel);
        fs::create_dir_all(pointer.parent().unwrap()).unwrap();
        let depth = Path::new(rel).components().count();
        let target = format!("{}blobs/{etag}", "../".repeat(depth + 1));
        std::os::unix::fs::symlink(target, &pointer).unwrap();
        files.insert(rel.clone());
    }
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), COMMIT).unwrap();
    (d, files)
}

#[test]
fn a_pipeline_comes_from_the_cache_offline() {
    let (d, files) = pipeline_cache();
    for revision in ["main", COMMIT] {
        let repo = HubRepo::with_env(DEFAULT_REPO_ID, &offline_env(&d.0)).revision(revision);
        let p = repo.download_pipeline(false).unwrap();
        let snapshot = repo.repo_cache_dir().join("snapshots").join(COMMIT);
        assert_eq!(p.root(), snapshot.as_path());
        assert_eq!(
            p.tokenizer_file(),
            snapshot.join("tokenizer/tokenizer.json")
        );
        for c in [
            Component::Transformer,
            Component::TextEncoder,
            Component::Vae,
        ] {
            let f = p.component_folder(c).unwrap();
            let expected: Vec<PathBuf> = files
                .iter()
                .filter(|f| f.starts_with(&format!("{}/", c.name())) && f.ends_with(".safetensors"))
                .map(|f| snapshot.join(f))
                .collect();
            assert_eq!(f.safetensors_files(), expected.as_slice(), "{c:?}");
        }
    }
}

#[test]
fn a_missing_shard_or_revision_in_the_cache_is_named() {
    let (d, _) = pipeline_cache();
    let repo = HubRepo::with_env(DEFAULT_REPO_ID, &offline_env(&d.0));
    let shard = "text_encoder/model-00002-of-00002.safetensors";
    let pointer = repo
        .repo_cache_dir()
        .join("snapshots")
        .join(COMMIT)
        .join(shard);
    fs::remove_file(&pointer).unwrap();
    match repo.download_pipeline(false) {
        Err(Error::NotCached {
            file,
            searched,
            revision,
            ..
        }) => {
            assert_eq!((file.as_str(), revision.as_str()), (shard, "main"));
            assert_eq!(searched, pointer);
        }
        other => panic!("{other:?}"),
    }
    let e = repo
        .clone()
        .revision("v2")
        .download_pipeline(false)
        .unwrap_err();
    assert!(matches!(e, Error::RevisionNotCached { .. }), "{e}");
}

/// Replaces `rel` in the cached snapshot (a symlink into `blobs/`) with
/// `make(path)`: a FIFO, or a link to a device.
fn replace_in_snapshot(d: &TempDir, rel: &str, make: impl Fn(&Path)) -> PathBuf {
    let repo = HubRepo::with_env(DEFAULT_REPO_ID, &offline_env(&d.0));
    let pointer = repo
        .repo_cache_dir()
        .join("snapshots")
        .join(COMMIT)
        .join(rel);
    let _ = fs::remove_file(&pointer);
    make(&pointer);
    pointer
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mkfifo {}", path.display());
}

/// A cache whose files are not files: a FIFO shard index (a reader would
/// block on it forever), `refs/main` and `model_index.json` linked to
/// `/dev/zero` (endless). Each is refused at once, naming the file; the
/// test finishing at all shows nothing blocked.
#[test]
fn files_in_the_cache_that_are_not_files_are_refused_without_blocking() {
    // A FIFO index: not a cached file, so the shards it would name are not
    // looked for, and the component's files are reported missing.
    let (d, files) = pipeline_cache();
    let index = files
        .iter()
        .find(|f| f.starts_with("transformer/") && f.ends_with(".index.json"))
        .expect("the sharded layout has a transformer index")
        .clone();
    replace_in_snapshot(&d, &index, mkfifo);
    let repo = HubRepo::with_env(DEFAULT_REPO_ID, &offline_env(&d.0));
    let e = repo.download_pipeline(false).unwrap_err();
    assert!(matches!(e, Error::NotCached { .. }), "{e}");

    // model_index.json -> /dev/zero.
    let (d, _) = pipeline_cache();
    replace_in_snapshot(&d, "model_index.json", |p| {
        std::os::unix::fs::symlink("/dev/zero", p).unwrap()
    });
    let repo = HubRepo::with_env(DEFAULT_REPO_ID, &offline_env(&d.0));
    let e = repo.download_pipeline(false).unwrap_err();
    assert!(e.to_string().contains("model_index.json"), "{e}");

    // refs/main -> /dev/zero: the revision cannot be resolved.
    let (d, _) = pipeline_cache();
    let repo = HubRepo::with_env(DEFAULT_REPO_ID, &offline_env(&d.0));
    let refs = repo.repo_cache_dir().join("refs/main");
    fs::remove_file(&refs).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &refs).unwrap();
    let e = repo.download_pipeline(false).unwrap_err();
    assert!(matches!(e, Error::RevisionNotCached { .. }), "{e}");
    // A FIFO ref likewise.
    fs::remove_file(&refs).unwrap();
    mkfifo(&refs);
    let e = repo.download_pipeline(false).unwrap_err();
    assert!(matches!(e, Error::RevisionNotCached { .. }), "{e}");
}
