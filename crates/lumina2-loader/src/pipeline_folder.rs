//! Whole diffusers pipeline folders: `model_index.json` and one folder per component.
//!
//! diffusers' `save_pretrained` writes `model_index.json` as
//! `{"_class_name": ..., "_diffusers_version": ..., "<component>": [library, class], ...}`.
//! Keys starting with `_` are metadata; a `[library, class]` pair is a
//! component; `null` or `[null, null]` is a component that is not there;
//! other values are pipeline config (diffusers passes them to the
//! constructor), which Lumina2 and Z-Image have none of, so they are ignored.
//!
//! Lumina2 and Z-Image (diffusers' `ZImagePipeline`) share the layout and
//! this reader; [`PipelineKind`] says which classes each component may have.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::folder::{ComponentFolder, Error};

/// The `_class_name`s of a Lumina2 pipeline (`Lumina2Text2ImgPipeline` is an
/// earlier name of diffusers' class, deprecated there, still in older exports).
pub const PIPELINE_CLASSES: [&str; 2] = ["Lumina2Pipeline", "Lumina2Text2ImgPipeline"];

/// The `_class_name` of a Z-Image pipeline.
pub const ZIMAGE_PIPELINE_CLASSES: [&str; 1] = ["ZImagePipeline"];

/// Which pipeline a folder holds, from `model_index.json`'s `_class_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PipelineKind {
    /// diffusers' `Lumina2Pipeline`: Gemma-2 text encoder.
    Lumina2,
    /// diffusers' `ZImagePipeline`: Qwen3 text encoder with a chat template.
    ZImage,
}

impl PipelineKind {
    /// Every kind this project loads.
    pub const ALL: [PipelineKind; 2] = [Self::Lumina2, Self::ZImage];

    /// The `_class_name`s of the kind.
    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            Self::Lumina2 => &PIPELINE_CLASSES,
            Self::ZImage => &ZIMAGE_PIPELINE_CLASSES,
        }
    }

    /// The kind a `_class_name` names.
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.class_names().contains(&name))
    }

    /// A short name (`"lumina2"`, `"z-image"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Lumina2 => "lumina2",
            Self::ZImage => "z-image",
        }
    }
}

/// A component of a Lumina2 or Z-Image pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// `transformer/`: the diffusion transformer.
    Transformer,
    /// `text_encoder/`: the Gemma-2 text encoder.
    TextEncoder,
    /// `tokenizer/`: the Gemma tokenizer (`tokenizer.json`).
    Tokenizer,
    /// `vae/`: the autoencoder.
    Vae,
    /// `scheduler/`: the flow-matching scheduler (`scheduler_config.json`).
    Scheduler,
}

impl Component {
    /// Every component, in the order diffusers lists them.
    pub const ALL: [Component; 5] = [
        Self::Scheduler,
        Self::TextEncoder,
        Self::Tokenizer,
        Self::Transformer,
        Self::Vae,
    ];

    /// The component's key in `model_index.json`, which is also its folder name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Transformer => "transformer",
            Self::TextEncoder => "text_encoder",
            Self::Tokenizer => "tokenizer",
            Self::Vae => "vae",
            Self::Scheduler => "scheduler",
        }
    }

    /// The library the component is saved by.
    pub fn library(self) -> &'static str {
        match self {
            Self::TextEncoder | Self::Tokenizer => "transformers",
            _ => "diffusers",
        }
    }

    /// The classes this project can load for the component of a Lumina2 pipeline.
    pub fn classes(self) -> &'static [&'static str] {
        self.classes_in(PipelineKind::Lumina2)
    }

    /// The classes this project can load for the component of a `kind` pipeline.
    pub fn classes_in(self, kind: PipelineKind) -> &'static [&'static str] {
        if kind == PipelineKind::ZImage {
            return match self {
                Self::Transformer => &["ZImageTransformer2DModel"],
                Self::TextEncoder => &["Qwen3Model", "Qwen3ForCausalLM"],
                Self::Tokenizer => &["Qwen2Tokenizer", "Qwen2TokenizerFast"],
                Self::Vae => &["AutoencoderKL"],
                Self::Scheduler => &["FlowMatchEulerDiscreteScheduler"],
            };
        }
        match self {
            Self::Transformer => &["Lumina2Transformer2DModel"],
            // The pipeline takes any `Gemma2PreTrainedModel`; both keep the
            // decoder weights (the causal LM under a `model.` prefix).
            Self::TextEncoder => &["Gemma2Model", "Gemma2ForCausalLM"],
            Self::Tokenizer => &["GemmaTokenizer", "GemmaTokenizerFast"],
            Self::Vae => &["AutoencoderKL"],
            Self::Scheduler => &["FlowMatchEulerDiscreteScheduler"],
        }
    }

    /// The files the component needs, relative to its folder; the weights
    /// (see [`Component::weights_stem`]) are not listed.
    pub fn required_files(self) -> &'static [&'static str] {
        self.required_files_in(PipelineKind::Lumina2)
    }

    /// [`Component::required_files`] in a `kind` pipeline (Z-Image's
    /// tokenizer needs its config too: the padding token and the chat template).
    pub fn required_files_in(self, kind: PipelineKind) -> &'static [&'static str] {
        if (kind, self) == (PipelineKind::ZImage, Self::Tokenizer) {
            return &["tokenizer.json", "tokenizer_config.json"];
        }
        match self {
            Self::Transformer | Self::TextEncoder | Self::Vae => &["config.json"],
            Self::Tokenizer => &["tokenizer.json"],
            Self::Scheduler => &["scheduler_config.json"],
        }
    }

    /// Files read when present (the tokenizer's padding token), relative to its folder.
    pub fn optional_files(self) -> &'static [&'static str] {
        match self {
            Self::Tokenizer => &["tokenizer_config.json", "special_tokens_map.json"],
            _ => &[],
        }
    }

    /// The stem of the weight files (`<stem>.safetensors`, or shards listed
    /// by `<stem>.safetensors.index.json`), for components that have weights.
    pub fn weights_stem(self) -> Option<&'static str> {
        match self {
            Self::Transformer | Self::Vae => Some("diffusion_pytorch_model"),
            Self::TextEncoder => Some("model"),
            Self::Tokenizer | Self::Scheduler => None,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// `model_index.json`, parsed and checked against what its pipeline needs.
#[derive(Debug, Clone)]
pub(crate) struct ModelIndex {
    class_name: String,
    kind: PipelineKind,
    diffusers_version: Option<String>,
    /// `(component, library, class)`, in [`Component::ALL`] order.
    classes: Vec<(Component, String, String)>,
}

impl ModelIndex {
    /// Reads `path` and checks the pipeline class (one of `kinds`) and every
    /// component's library and class (no other file is looked at).
    pub(crate) fn read(path: &Path, kinds: &[PipelineKind]) -> Result<Self, Error> {
        let text = lumina2_weights::fs::read_bounded(path, lumina2_weights::fs::MAX_CONFIG_BYTES)
            .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let path = path.to_path_buf();
        let invalid = |reason: String| Error::ModelIndex {
            path: path.clone(),
            reason,
        };
        let json: Value = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        let map = json
            .as_object()
            .ok_or_else(|| invalid("not a JSON object".into()))?;
        let class_name = match map.get("_class_name") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(invalid("no `_class_name` string".into())),
        };
        let Some(kind) = PipelineKind::from_class_name(&class_name).filter(|k| kinds.contains(k))
        else {
            return Err(Error::PipelineClass {
                path,
                found: class_name,
                expected: kinds
                    .iter()
                    .flat_map(|k| k.class_names())
                    .map(|s| s.to_string())
                    .collect(),
            });
        };
        let diffusers_version = map
            .get("_diffusers_version")
            .and_then(Value::as_str)
            .map(str::to_string);

        let mut found: Vec<(Component, String, String)> = Vec::new();
        let mut nulls: Vec<Component> = Vec::new();
        for (key, value) in map {
            if key.starts_with('_') {
                continue;
            }
            let pair = match value {
                Value::Null => None,
                Value::Array(a) => match a.as_slice() {
                    [Value::Null, Value::Null] => None,
                    [Value::String(l), Value::String(c)] => Some((l.clone(), c.clone())),
                    [_, _] => {
                        return Err(invalid(format!(
                            "component `{key}` is not a [library, class] pair of strings"
                        )))
                    }
                    // Pipeline config values, not components.
                    _ => continue,
                },
                _ => continue,
            };
            match (Component::from_name(key), pair) {
                (Some(c), Some((library, class))) => found.push((c, library, class)),
                (Some(c), None) => nulls.push(c),
                (None, Some((library, class))) => {
                    return Err(Error::UnexpectedComponent {
                        path,
                        component: key.clone(),
                        library,
                        class,
                    })
                }
                (None, None) => {}
            }
        }

        let mut classes = Vec::new();
        for c in Component::ALL {
            let Some((_, library, class)) = found.iter().find(|(f, ..)| *f == c) else {
                return Err(Error::MissingComponent {
                    path,
                    component: c.name().into(),
                    null: nulls.contains(&c),
                });
            };
            if library != c.library() || !c.classes_in(kind).contains(&class.as_str()) {
                return Err(Error::ComponentClass {
                    path,
                    component: c.name().into(),
                    found: format!("{library}.{class}"),
                    expected: c
                        .classes_in(kind)
                        .iter()
                        .map(|k| format!("{}.{k}", c.library()))
                        .collect(),
                });
            }
            classes.push((c, library.clone(), class.clone()));
        }
        Ok(Self {
            class_name,
            kind,
            diffusers_version,
            classes,
        })
    }
}

/// A Lumina2 diffusers pipeline folder, checked: `model_index.json` names a
/// Lumina2 pipeline whose five components have classes this project loads,
/// and each component's folder and files are there.
#[derive(Debug, Clone)]
pub struct PipelineFolder {
    root: PathBuf,
    index: ModelIndex,
}

impl PipelineFolder {
    /// Opens the pipeline folder `root`: checks its `model_index.json` and
    /// that every component folder holds its files (`config.json`,
    /// `tokenizer.json`, `scheduler_config.json`); weights are resolved later,
    /// by [`PipelineFolder::component_folder`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_as(root, PipelineKind::Lumina2)
    }

    /// [`PipelineFolder::open`] for a pipeline of `kind`.
    pub fn open_as(root: impl AsRef<Path>, kind: PipelineKind) -> Result<Self, Error> {
        Self::open_kinds(root.as_ref(), &[kind])
    }

    /// [`PipelineFolder::open`] for a pipeline of any kind this project
    /// loads; [`PipelineFolder::kind`] says which it is.
    pub fn open_any(root: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_kinds(root.as_ref(), &PipelineKind::ALL)
    }

    fn open_kinds(root: &Path, kinds: &[PipelineKind]) -> Result<Self, Error> {
        let root = root.to_path_buf();
        let index = ModelIndex::read(&root.join("model_index.json"), kinds)?;
        for c in Component::ALL {
            let dir = root.join(c.name());
            if !dir.is_dir() {
                return Err(Error::ComponentFile {
                    component: c.name().into(),
                    path: dir,
                });
            }
            for f in c.required_files_in(index.kind) {
                let file = dir.join(f);
                if !file.is_file() {
                    return Err(Error::ComponentFile {
                        component: c.name().into(),
                        path: file,
                    });
                }
            }
        }
        Ok(Self { root, index })
    }

    /// The pipeline folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `_class_name` of `model_index.json`.
    pub fn class_name(&self) -> &str {
        &self.index.class_name
    }

    /// Which pipeline the folder holds.
    pub fn kind(&self) -> PipelineKind {
        self.index.kind
    }

    /// `_diffusers_version` of `model_index.json`, when present.
    pub fn diffusers_version(&self) -> Option<&str> {
        self.index.diffusers_version.as_deref()
    }

    /// The class `model_index.json` gives the component (e.g. `Gemma2Model`).
    pub fn component_class(&self, c: Component) -> &str {
        self.index
            .classes
            .iter()
            .find(|(f, ..)| *f == c)
            .map_or("", |(_, _, class)| class.as_str())
    }

    /// The folder of a component.
    pub fn component_dir(&self, c: Component) -> PathBuf {
        self.root.join(c.name())
    }

    /// The folder of a component that has weights, resolved (single file or
    /// shards, index validated); [`Error::Folder`] for the tokenizer and the
    /// scheduler, which have none.
    pub fn component_folder(&self, c: Component) -> Result<ComponentFolder, Error> {
        ComponentFolder::open(self.component_dir(c))
    }

    /// `transformer/`.
    pub fn transformer_dir(&self) -> PathBuf {
        self.component_dir(Component::Transformer)
    }

    /// `text_encoder/`.
    pub fn text_encoder_dir(&self) -> PathBuf {
        self.component_dir(Component::TextEncoder)
    }

    /// `tokenizer/`.
    pub fn tokenizer_dir(&self) -> PathBuf {
        self.component_dir(Component::Tokenizer)
    }

    /// `tokenizer/tokenizer.json`.
    pub fn tokenizer_file(&self) -> PathBuf {
        self.tokenizer_dir().join("tokenizer.json")
    }

    /// `vae/`.
    pub fn vae_dir(&self) -> PathBuf {
        self.component_dir(Component::Vae)
    }

    /// `scheduler/`.
    pub fn scheduler_dir(&self) -> PathBuf {
        self.component_dir(Component::Scheduler)
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> PathBuf {
        self.scheduler_dir().join("scheduler_config.json")
    }
}
