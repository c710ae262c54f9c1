//! The Hugging Face Hub, and its local cache shared with Python.
//!
//! Files are looked up in exactly the cache Python's `huggingface_hub` (2.4)
//! writes, so that models it downloaded are reused:
//!
//! ```text
//! $HF_HUB_CACHE/models--Alpha-VLLM--Lumina-Image-2.0/
//!     refs/main                      the commit hash `main` pointed at
//!     snapshots/<commit>/<file>      symlink -> ../../blobs/<etag> (deeper for files in folders)
//!     blobs/<etag>                   the content
//! ```
//!
//! The settings come from the same environment variables, read as Python does
//! ([`HubEnv`]): `HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, else
//! `~/.cache/huggingface`), `HF_HUB_CACHE` (else the legacy
//! `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`), both with `~` and `$VAR`
//! expanded; `HF_HUB_OFFLINE` (else `TRANSFORMERS_OFFLINE`; `1`, `ON`, `YES`,
//! `TRUE` in any case mean offline); `HF_TOKEN` (else `HUGGING_FACE_HUB_TOKEN`,
//! else the file `HF_TOKEN_PATH`, default `$HF_HOME/token`), not sent when
//! `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set.
//!
//! The cache resolution is ours, not `hf-hub`'s: hf-hub 1.0 reads `HF_HOME`
//! and `HF_HUB_CACHE` without Python's `~`/`$VAR` expansion and has no offline
//! switch. `hf-hub` (the `download` feature) only downloads, into the cache
//! directory resolved here, in the same layout (it writes the blob, the
//! relative symlink and the ref as Python does).

use std::path::{Component as PathComponent, Path, PathBuf};

use crate::folder::{Error, ShardIndex};
use crate::pipeline_folder::{Component, ModelIndex, PipelineFolder, PipelineKind};

/// The Lumina-Image 2.0 repo on the Hub.
pub const DEFAULT_REPO_ID: &str = "Alpha-VLLM/Lumina-Image-2.0";
/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// The Hub settings of the environment, resolved as Python's
/// `huggingface_hub.constants` and `get_token` do.
#[derive(Clone, PartialEq, Eq)]
pub struct HubEnv {
    /// `HF_HOME`.
    pub home: PathBuf,
    /// `HF_HUB_CACHE`: the folder holding `models--<org>--<name>` folders.
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`): never ask the Hub.
    pub offline: bool,
    /// `HF_TOKEN_PATH`: the token file.
    pub token_path: PathBuf,
    /// The token to send: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN` or the token
    /// file; `None` when `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set.
    pub token: Option<String>,
}

impl std::fmt::Debug for HubEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("HubEnv")
            .field("home", &self.home)
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token_path", &self.token_path)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl HubEnv {
    /// The settings of this process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings given the environment variable lookup `var` (tests use
    /// this instead of changing the process environment). Variables that are
    /// not valid UTF-8 count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let expand = |s: &str| PathBuf::from(expand_vars(&expand_user(s, &var), &var));
        let user_home = PathBuf::from(expand_user("~", &var));
        let home = expand(&var("HF_HOME").unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| user_home.join(".cache"));
            base.join("huggingface").to_string_lossy().into_owned()
        }));
        // The legacy variable is not expanded on its own, only once chosen.
        let legacy_cache = var("HUGGINGFACE_HUB_CACHE")
            .unwrap_or_else(|| home.join("hub").to_string_lossy().into_owned());
        let cache_dir = expand(&var("HF_HUB_CACHE").unwrap_or(legacy_cache));
        // `os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")`:
        // an empty value falls through to the second variable.
        let offline = non_empty(var("HF_HUB_OFFLINE"))
            .or_else(|| non_empty(var("TRANSFORMERS_OFFLINE")))
            .is_some_and(|v| is_true(&v));
        let token_path = expand(
            &var("HF_TOKEN_PATH")
                .unwrap_or_else(|| home.join("token").to_string_lossy().into_owned()),
        );
        let token = if var("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_some_and(|v| is_true(&v)) {
            None
        } else {
            non_empty(var("HF_TOKEN"))
                .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
                .and_then(|t| clean_token(&t))
                .or_else(|| {
                    lumina2_weights::fs::read_to_string_bounded(
                        &token_path,
                        lumina2_weights::fs::MAX_REF_BYTES,
                    )
                    .ok()
                    .and_then(|t| clean_token(&t))
                })
        };
        Self {
            home,
            cache_dir,
            offline,
            token_path,
            token,
        }
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

/// `huggingface_hub.constants._is_true`.
fn is_true(v: &str) -> bool {
    matches!(v.to_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

/// `huggingface_hub.utils._auth._clean_token`: no CR/LF, trimmed, empty is none.
fn clean_token(t: &str) -> Option<String> {
    let t: String = t.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

#[allow(deprecated)] // Fixed in Rust 1.85: $HOME, then the password database.
fn home_from_system() -> Option<String> {
    std::env::home_dir().map(|p| p.to_string_lossy().into_owned())
}

/// `os.path.expanduser` (POSIX) for `~` and `~/...`: `$HOME` (even empty),
/// else the password database; `~user` and a home that cannot be found leave
/// the path as written.
fn expand_user(s: &str, var: &impl Fn(&str) -> Option<String>) -> String {
    let Some(rest) = s.strip_prefix('~') else {
        return s.to_string();
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return s.to_string();
    }
    let Some(home) = var("HOME").or_else(home_from_system) else {
        return s.to_string();
    };
    let joined = format!("{}{rest}", home.trim_end_matches('/'));
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

/// `os.path.expandvars` (POSIX): `$name` (ASCII word characters) and
/// `${anything}`; unset variables are left as written, values are not rescanned.
fn expand_vars(s: &str, var: &impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        // (the name, the length of what follows `$` that the match covers)
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        if len == 0 {
            // No variable here: a lone `$`.
            out.push('$');
            rest = after;
            continue;
        }
        match var(name) {
            Some(value) => out.push_str(&value),
            None => {
                out.push('$');
                out.push_str(&after[..len]);
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// `huggingface_hub`'s `REGEX_COMMIT_HASH`: 40 lowercase hex digits.
pub fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40
        && revision
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The cache folder name of a model repo: `models--<org>--<name>`.
pub fn repo_folder_name(repo_id: &str) -> String {
    std::iter::once("models")
        .chain(repo_id.split('/'))
        .collect::<Vec<_>>()
        .join("--")
}

/// `huggingface_hub.utils.validate_repo_id`.
fn check_repo_id(id: &str) -> Result<(), Error> {
    let bad = |reason: &str| {
        Err(Error::InvalidHubName {
            what: "repo id",
            value: id.to_string(),
            reason: reason.to_string(),
        })
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return bad("use `name` or `namespace/name`");
    }
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for p in &parts {
        let ok_chars = p.chars().all(|c| word(c) || c == '-' || c == '.');
        let ends = p.starts_with(word) && p.ends_with(word);
        if p.is_empty() || p.len() > 96 || !ok_chars || !ends {
            return bad(
                "use letters, digits, `-`, `_`, `.`, at most 96, starting and ending with a letter, digit or `_`",
            );
        }
    }
    if id.contains("--") || id.contains("..") {
        return bad("`--` and `..` are not allowed");
    }
    if id.ends_with(".git") {
        return bad("cannot end in `.git`");
    }
    Ok(())
}

/// A revision or file name used as a path inside the cache: relative, plain
/// components only (so that it cannot leave the cache folder).
fn check_relative(what: &'static str, value: &str) -> Result<(), Error> {
    let plain = Path::new(value)
        .components()
        .all(|c| matches!(c, PathComponent::Normal(_)));
    if value.is_empty() || !plain || value.contains('\\') {
        return Err(Error::InvalidHubName {
            what,
            value: value.to_string(),
            reason: "must be a relative path without `.`, `..` or `\\`".into(),
        });
    }
    Ok(())
}

/// A model repo on the Hub at a revision, with the cache and the settings to
/// fetch it.
///
/// ```no_run
/// use lumina2_loader::hub::HubRepo;
///
/// let pipeline = HubRepo::new("Alpha-VLLM/Lumina-Image-2.0")
///     .revision("main")
///     .download_pipeline(true)?;
/// println!("{}", pipeline.transformer_dir().display());
/// # Ok::<(), lumina2_loader::Error>(())
/// ```
#[derive(Clone)]
pub struct HubRepo {
    id: String,
    revision: String,
    cache_dir: PathBuf,
    env_offline: bool,
    offline: bool,
    token: Option<String>,
}

impl std::fmt::Debug for HubRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubRepo")
            .field("id", &self.id)
            .field("revision", &self.revision)
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .finish_non_exhaustive()
    }
}

impl Default for HubRepo {
    /// [`DEFAULT_REPO_ID`] at [`DEFAULT_REVISION`], settings from the environment.
    fn default() -> Self {
        Self::new(DEFAULT_REPO_ID)
    }
}

impl HubRepo {
    /// The repo `id` (`org/name`) at [`DEFAULT_REVISION`], with the settings
    /// of the environment ([`HubEnv::from_env`]).
    pub fn new(id: impl Into<String>) -> Self {
        Self::with_env(id, &HubEnv::from_env())
    }

    /// The repo `id` at [`DEFAULT_REVISION`] with the given settings.
    pub fn with_env(id: impl Into<String>, env: &HubEnv) -> Self {
        Self {
            id: id.into(),
            revision: DEFAULT_REVISION.into(),
            cache_dir: env.cache_dir.clone(),
            env_offline: env.offline,
            offline: env.offline,
            token: env.token.clone(),
        }
    }

    /// A branch, tag or commit hash.
    pub fn revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    /// Offline: files come from the cache only. `HF_HUB_OFFLINE` in the
    /// environment wins over `false`, as in Python.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline || self.env_offline;
        self
    }

    /// Another cache folder than `HF_HUB_CACHE`.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// The token to send instead of the environment's.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The repo id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The revision asked for.
    pub fn revision_name(&self) -> &str {
        &self.revision
    }

    /// Whether the Hub is never asked.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The cache folder of this repo: `<cache>/models--<org>--<name>`.
    pub fn repo_cache_dir(&self) -> PathBuf {
        self.cache_dir.join(repo_folder_name(&self.id))
    }

    fn check_names(&self) -> Result<(), Error> {
        check_repo_id(&self.id)?;
        check_relative("revision", &self.revision)
    }

    /// The commit the revision points at in the cache (`refs/<revision>`, or
    /// the revision itself when it is a commit hash), with its snapshot folder.
    pub fn cached_snapshot(&self) -> Result<(String, PathBuf), Error> {
        self.check_names()?;
        let repo = self.repo_cache_dir();
        let commit = if is_commit_hash(&self.revision) {
            self.revision.clone()
        } else {
            let ref_path = repo.join("refs").join(&self.revision);
            match lumina2_weights::fs::read_to_string_bounded(
                &ref_path,
                lumina2_weights::fs::MAX_REF_BYTES,
            ) {
                // Python writes the hash alone; a stray newline is tolerated.
                Ok(s) => s.trim().to_string(),
                Err(_) => return Err(self.revision_not_cached(ref_path)),
            }
        };
        check_relative("commit in refs", &commit)?;
        let snapshot = repo.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(self.revision_not_cached(snapshot));
        }
        Ok((commit, snapshot))
    }

    fn revision_not_cached(&self, searched: PathBuf) -> Error {
        Error::RevisionNotCached {
            repo: self.id.clone(),
            revision: self.revision.clone(),
            searched,
        }
    }

    /// A file of the repo from the cache alone, as Python's offline
    /// `hf_hub_download` finds it: the snapshot path (a symlink into `blobs/`).
    pub fn cached_file(&self, file: &str) -> Result<PathBuf, Error> {
        check_relative("file name", file)?;
        let (_, snapshot) = self.cached_snapshot()?;
        let path = snapshot.join(file);
        // The check follows the symlink: a dangling one (blob removed) is not
        // cached, and anything but a regular file (a FIFO would hang the
        // reader) is not a cached file either.
        if lumina2_weights::fs::is_regular_file(&path) {
            Ok(path)
        } else {
            Err(Error::NotCached {
                repo: self.id.clone(),
                revision: self.revision.clone(),
                file: file.to_string(),
                searched: path,
            })
        }
    }

    /// A file of the repo: from the cache when offline, else downloaded into
    /// the cache (or found there up to date). `progress` prints a progress
    /// line on stderr.
    pub fn file(&self, file: &str, progress: bool) -> Result<PathBuf, Error> {
        if self.offline {
            return self.cached_file(file);
        }
        self.check_names()?;
        check_relative("file name", file)?;
        download::Client::new(self)?.get(&self.revision, file, progress)
    }

    /// Fetches what a Lumina2 pipeline needs (`model_index.json`, then each
    /// component's config, tokenizer files and weights: the shard index
    /// first, then the shards it lists, or the single weight file), all at one
    /// commit, and opens the snapshot as a [`PipelineFolder`]. Offline, the
    /// same files must all be in the cache.
    pub fn download_pipeline(&self, progress: bool) -> Result<PipelineFolder, Error> {
        self.check_names()?;
        let mut fetch = if self.offline {
            let (_, snapshot) = self.cached_snapshot()?;
            Fetch::Cache {
                repo: self,
                snapshot,
            }
        } else {
            Fetch::Online {
                client: download::Client::new(self)?,
                revision: self.revision.clone(),
                progress,
            }
        };
        let index_path = fetch.get("model_index.json")?;
        let root = index_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        // Every other file is fetched at the commit whose snapshot folder
        // `model_index.json` landed in, even if the branch moves meanwhile.
        if let Fetch::Online { revision, .. } = &mut fetch {
            let commit = root.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !is_commit_hash(commit) {
                return Err(Error::Download {
                    repo: self.id.clone(),
                    revision: self.revision.clone(),
                    file: "model_index.json".into(),
                    source: format!(
                        "downloaded to {}, not into a snapshot folder",
                        index_path.display()
                    )
                    .into(),
                });
            }
            *revision = commit.to_string();
        }
        // The classes are checked before gigabytes are downloaded.
        ModelIndex::read(&index_path, &[PipelineKind::Lumina2])?;
        for c in Component::ALL {
            let dir = c.name();
            for f in c.required_files() {
                fetch.get(&format!("{dir}/{f}"))?;
            }
            for f in c.optional_files() {
                fetch.get_optional(&format!("{dir}/{f}"))?;
            }
            if let Some(stem) = c.weights_stem() {
                let index_name = format!("{dir}/{stem}.safetensors.index.json");
                match fetch.get_optional(&index_name)? {
                    Some(index) => {
                        for shard in ShardIndex::read(&index)?.shard_names() {
                            fetch.get(&format!("{dir}/{shard}"))?;
                        }
                    }
                    None => {
                        fetch.get(&format!("{dir}/{stem}.safetensors"))?;
                    }
                }
            }
        }
        PipelineFolder::open(root)
    }
}

/// Where the files of [`HubRepo::download_pipeline`] come from.
enum Fetch<'a> {
    /// Offline: the snapshot folder of one commit in the cache.
    Cache {
        repo: &'a HubRepo,
        snapshot: PathBuf,
    },
    /// The Hub, at a revision (the commit, once known).
    Online {
        client: download::Client<'a>,
        revision: String,
        progress: bool,
    },
}

impl Fetch<'_> {
    /// A file that must exist.
    fn get(&self, file: &str) -> Result<PathBuf, Error> {
        match self {
            Self::Cache { repo, snapshot } => {
                self.get_optional(file)?.ok_or_else(|| Error::NotCached {
                    repo: repo.id.clone(),
                    revision: repo.revision.clone(),
                    file: file.to_string(),
                    searched: snapshot.join(file),
                })
            }
            Self::Online {
                client,
                revision,
                progress,
            } => client.get(revision, file, *progress),
        }
    }

    /// A file that may be absent from the repo.
    fn get_optional(&self, file: &str) -> Result<Option<PathBuf>, Error> {
        check_relative("file name", file)?;
        match self {
            Self::Cache { snapshot, .. } => {
                let path = snapshot.join(file);
                Ok(lumina2_weights::fs::is_regular_file(&path).then_some(path))
            }
            Self::Online {
                client,
                revision,
                progress,
            } => client.try_get(revision, file, *progress),
        }
    }
}

#[cfg(feature = "download")]
mod download {
    //! Downloads through `hf-hub`'s blocking (ureq, rustls) client, into our
    //! cache folder, in the layout Python writes (blobs, snapshot symlinks, refs).

    use std::io::{IsTerminal, Write};
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
    use hf_hub::api::Progress;
    use hf_hub::{Repo, RepoType};

    use super::HubRepo;
    use crate::folder::Error;

    pub(super) struct Client<'a> {
        repo: &'a HubRepo,
        api: Api,
    }

    impl<'a> Client<'a> {
        pub(super) fn new(repo: &'a HubRepo) -> Result<Self, Error> {
            let api = ApiBuilder::new()
                .with_cache_dir(repo.cache_dir.clone())
                .with_token(repo.token.clone())
                .with_progress(false)
                .build()
                .map_err(|e| download_error(repo, &repo.revision, "", e))?;
            Ok(Self { repo, api })
        }

        /// The file at `revision`, `None` when the repo has no such file.
        pub(super) fn try_get(
            &self,
            revision: &str,
            file: &str,
            progress: bool,
        ) -> Result<Option<PathBuf>, Error> {
            let api_repo = self.api.repo(Repo::with_revision(
                self.repo.id.clone(),
                RepoType::Model,
                revision.to_string(),
            ));
            let result = if progress {
                api_repo.download_with_progress(file, Printer::new(file))
            } else {
                api_repo.download(file)
            };
            match result {
                Ok(p) => Ok(Some(p)),
                Err(ApiError::RequestError(e)) if is_not_found(&e) => Ok(None),
                Err(e) => Err(download_error(self.repo, revision, file, e)),
            }
        }

        pub(super) fn get(
            &self,
            revision: &str,
            file: &str,
            progress: bool,
        ) -> Result<PathBuf, Error> {
            self.try_get(revision, file, progress)?.ok_or_else(|| {
                download_error(self.repo, revision, file, "the repo has no such file")
            })
        }
    }

    /// A 404 from the Hub: the file is not in the repo at that revision.
    fn is_not_found(e: &impl std::fmt::Display) -> bool {
        let text = e.to_string();
        text.contains("status code 404") || text.contains(": 404")
    }

    fn download_error(
        repo: &HubRepo,
        revision: &str,
        file: &str,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Download {
            repo: repo.id.clone(),
            revision: revision.to_string(),
            file: file.to_string(),
            source: e.into(),
        }
    }

    /// A progress line on stderr: rewritten in place on a terminal, else
    /// printed when the file starts and ends.
    struct Printer {
        file: String,
        tty: bool,
        total: usize,
        done: usize,
        last: Option<Instant>,
    }

    impl Printer {
        fn new(file: &str) -> Self {
            Self {
                file: file.to_string(),
                tty: std::io::stderr().is_terminal(),
                total: 0,
                done: 0,
                last: None,
            }
        }
    }

    fn human(bytes: usize) -> String {
        let b = bytes as f64;
        match bytes {
            0..=999_999 => format!("{:.1} kB", b / 1e3),
            1_000_000..=999_999_999 => format!("{:.1} MB", b / 1e6),
            _ => format!("{:.2} GB", b / 1e9),
        }
    }

    impl Progress for Printer {
        fn init(&mut self, size: usize, _filename: &str) {
            self.total = size;
            if !self.tty {
                eprintln!("downloading {} ({})", self.file, human(size));
            }
        }

        fn update(&mut self, size: usize) {
            self.done = self.done.saturating_add(size);
            if !self.tty {
                return;
            }
            let now = Instant::now();
            if self
                .last
                .is_some_and(|t| now - t < Duration::from_millis(200))
            {
                return;
            }
            self.last = Some(now);
            let pct = if self.total > 0 {
                (self.done as f64 / self.total as f64 * 100.0).min(100.0)
            } else {
                0.0
            };
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}: {pct:5.1}% of {}", self.file, human(self.total));
            let _ = err.flush();
        }

        fn finish(&mut self) {
            if self.tty {
                eprintln!("\r{}: done, {}       ", self.file, human(self.total));
            } else {
                eprintln!("downloaded {}", self.file);
            }
        }
    }
}

#[cfg(not(feature = "download"))]
mod download {
    //! Built without the `download` feature: the Hub cache is read, never the network.

    use std::path::PathBuf;

    use super::HubRepo;
    use crate::folder::Error;

    fn disabled(repo: &HubRepo, file: &str) -> Error {
        Error::Download {
            repo: repo.id.clone(),
            revision: repo.revision.clone(),
            file: file.to_string(),
            source: "lumina2-loader was built without its `download` feature; \
                     use the cache (offline) or rebuild with it"
                .into(),
        }
    }

    pub(super) struct Client<'a>(&'a HubRepo);

    impl<'a> Client<'a> {
        pub(super) fn new(repo: &'a HubRepo) -> Result<Self, Error> {
            Ok(Self(repo))
        }
        pub(super) fn get(&self, _: &str, file: &str, _: bool) -> Result<PathBuf, Error> {
            Err(disabled(self.0, file))
        }
        pub(super) fn try_get(
            &self,
            _: &str,
            file: &str,
            _: bool,
        ) -> Result<Option<PathBuf>, Error> {
            Err(disabled(self.0, file))
        }
    }
}
