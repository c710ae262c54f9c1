//! `lumina2 serve`: the HTTP server (crate `lumina2-server`) on one
//! resident pipeline.
//!
//! A request body is checked as a line of `lumina2 generate --from-file`
//! (the same field names, with `serve`'s generation options as defaults)
//! and rendered as `lumina2 generate` renders it, so each image is the PNG,
//! metadata included, that `generate` writes for the same options and seed.
//! A job's `preview_every` (a field of jobs only) makes the previews
//! `generate --preview` writes, kept in memory for the job's event stream.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use lumina2_pipeline::{
    Control, Error as PipelineError, Event, GenerateOptions, MemoryCheck, Stage,
};
use lumina2_server::{Backend, Config, InvalidRequest, Model as ServedModel, Progress};
use lumina2_server::{RenderError, Renderer};
use serde_json::{Map, Value};

use crate::batch::{apply_field, count, field_name};
use crate::generate::{
    self, named_option, options_named, parse_loras, random_seed, set_threads, test_decode_delay,
    usage, GenerateArgs, Model,
};
use crate::output;

/// Arguments of `lumina2 serve`: `generate`'s model options, and its
/// generation options as the defaults of every request.
#[derive(Args)]
#[command(mut_arg("prompt", |a| a.required_unless_present(clap::builder::Resettable::<clap::Id>::Reset).hide(true)))]
pub struct ServeArgs {
    #[command(flatten)]
    generate: GenerateArgs,
    /// Address to listen on (0.0.0.0: every interface, as in a container).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed as `listening on http://ADDR`).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Bearer token the /v1 endpoints require (default: env LUMINA2_API_KEY; none: no key).
    #[arg(long)]
    api_key: Option<String>,
    /// Requests that may wait while one renders; more are answered 429.
    #[arg(long, default_value_t = 16)]
    max_queue: usize,
    /// Load the models before listening (else /ready says 503 until they are loaded).
    #[arg(long)]
    preload: bool,
    /// Seconds the running job may go on after SIGTERM/SIGINT before it is cancelled.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    shutdown_grace: u64,
}

/// The API key from the environment when `--api-key` is absent.
const API_KEY_ENV: &str = "LUMINA2_API_KEY";

/// A checked request: `generate`'s arguments and the options they make.
pub struct Request {
    args: GenerateArgs,
    opts: GenerateOptions,
}

/// Checks request bodies against `serve`'s defaults, and, once the model
/// is loaded, against its memory estimate.
struct CliBackend {
    defaults: GenerateArgs,
    memory: Arc<OnceLock<MemoryCheck>>,
}

/// The request field behind an option of the library (None: a `serve`
/// option no request can set).
fn param_of(option: &str) -> Option<&'static str> {
    Some(match option {
        "width" | "height" => "size",
        "num_images_per_prompt" => "n",
        "num_inference_steps" => "num_inference_steps",
        "guidance_scale" => "guidance_scale",
        "cfg_trunc_ratio" => "cfg_trunc_ratio",
        "system_prompt" => "system_prompt",
        "negative_prompt" => "negative_prompt",
        "prompt" => "prompt",
        "seed" => "seed",
        "cache_threshold" => "cache_threshold",
        "preview_every" => "preview_every",
        _ => return None,
    })
}

impl Backend for CliBackend {
    type Request = Request;
    type Renderer = CliRenderer;

    fn parse(&self, body: Map<String, Value>) -> Result<Request, InvalidRequest> {
        let mut args = self.defaults.clone();
        let mut prompt = false;
        for (key, v) in body.iter().filter(|(_, v)| !v.is_null()) {
            // The server lets it through for jobs only; its value is checked
            // with the other options, as --preview-every is.
            if key == "preview_every" {
                args.preview_every =
                    count(key, v).map_err(|e| InvalidRequest::new(e.to_string(), Some(key)))?;
                args.preview_in_memory = true;
                continue;
            }
            match apply_field(&mut args, key, v) {
                Ok(true) => prompt |= key == "prompt",
                Ok(false) => {
                    return Err(InvalidRequest::new(
                        format!("unknown field `{key}`"),
                        Some(key),
                    ))
                }
                Err(e) => return Err(InvalidRequest::new(e.to_string(), Some(key))),
            }
        }
        if !prompt {
            return Err(InvalidRequest::new(
                "`prompt` is required (a string)",
                Some("prompt"),
            ));
        }
        let seed = args.seed.unwrap_or_else(random_seed);
        args.seed = Some(seed);
        let param = RefCell::new(None);
        let opts = options_named(&args, seed, |option| {
            *param.borrow_mut() = param_of(option);
            field_name(option)
        })
        .map_err(|e| {
            let param = param.borrow().or_else(|| {
                // The seed list of the images: seed + i.
                e.to_string().starts_with("--seed").then_some("seed")
            });
            InvalidRequest::new(crate::error_chain(&e), param)
        })?;
        if !args.no_memory_check {
            if let Some(memory) = self.memory.get() {
                memory.check(&opts).map_err(refused)?;
            }
        }
        Ok(Request { args, opts })
    }
}

/// A request the library refuses, named as the request spells it.
fn refused(e: PipelineError) -> InvalidRequest {
    let param = match &e {
        PipelineError::InvalidOption { option, .. } => param_of(option),
        // What makes an estimate too large: the size, times the images.
        PipelineError::OutOfMemory { .. } => Some("size"),
        _ => None,
    };
    InvalidRequest::new(named_option(e, field_name).to_string(), param)
}

/// Renders requests on the resident pipeline.
struct CliRenderer {
    model: Model,
}

impl Renderer<Request> for CliRenderer {
    fn render(
        &mut self,
        request: &Request,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Vec<Vec<u8>>, RenderError> {
        let (args, opts) = (&request.args, &request.opts);
        let pipe = &mut self.model.pipe;
        let invalid = |e: PipelineError| RenderError::Invalid(refused(e));
        let (width, height) = pipe.resolve_size(opts).map_err(invalid)?;
        // Checked again here: a request that came while the model was
        // loading was not checked against it, and the memory free changes.
        if !args.no_memory_check {
            pipe.check_memory(opts).map_err(invalid)?;
        }
        let decode_delay = test_decode_delay();
        let mut observer = |e: Event<'_>| -> Control {
            match e {
                Event::Step(s) => {
                    // A preview that cannot be made is logged; the job goes on.
                    let preview = s.denoised.and_then(|x0| match generate::preview_png(x0) {
                        Ok(png) => png,
                        Err(e) => {
                            tracing::warn!("preview: {e:#}");
                            None
                        }
                    });
                    let go_on = progress(Progress {
                        step: s.step,
                        num_steps: s.num_steps,
                        elapsed: s.elapsed,
                        preview,
                    });
                    if !go_on {
                        return Control::Stop;
                    }
                }
                Event::StageStarted(Stage::Decode) => {
                    if let Some(d) = decode_delay {
                        std::thread::sleep(d);
                    }
                }
                _ => {}
            }
            Control::Continue
        };
        let out = match pipe.generate(opts, &mut observer) {
            Ok(out) => out,
            Err(PipelineError::Stopped { .. }) => return Err(RenderError::Stopped),
            Err(e @ PipelineError::InvalidOption { .. }) => return Err(invalid(e)),
            Err(e) => return Err(RenderError::Failed(e.to_string())),
        };
        for w in &out.warnings {
            tracing::warn!("{w}");
        }
        let failed = |e: anyhow::Error| RenderError::Failed(crate::error_chain(&e));
        let images = out
            .rgb_images()
            .map_err(|e| RenderError::Failed(e.to_string()))?;
        let texts = generate::png_texts(&self.model, args, opts, width, height);
        images
            .iter()
            .zip(&texts)
            .map(|(img, text)| {
                let mut png = Vec::new();
                output::encode_png(&mut png, img, text).map_err(failed)?;
                Ok(png)
            })
            .collect()
    }
}

/// The `generate` options that make no sense for a server (each request
/// brings its prompt and gets its images back).
fn refuse_generate_only(a: &GenerateArgs) -> Result<()> {
    let given = [
        ("--prompt", !a.prompt.is_empty()),
        ("--output-latents / --latents-only", a.writes_latents()),
        ("--from-file", a.batch.from_file.is_some()),
        ("--shard", a.batch.shard.is_some()),
        ("--manifest", a.batch.manifest.is_some()),
        ("--skip-existing", a.batch.skip_existing),
        // The API is text-to-image only.
        ("--image / --mask-image", a.init.image.is_some()),
    ];
    if a.preview.is_some() {
        bail!("--preview is an option of `lumina2 generate`, not of `serve` (a job asks for previews with `preview_every` and gets them on its event stream)");
    }
    if let Some((name, _)) = given.iter().find(|(_, on)| *on) {
        bail!("{name} is an option of `lumina2 generate`, not of `serve` (requests bring their prompts)");
    }
    Ok(())
}

pub fn run(args: ServeArgs, quiet: bool) -> Result<()> {
    let ServeArgs {
        generate: defaults,
        host,
        port,
        api_key,
        max_queue,
        preload,
        shutdown_grace,
    } = args;
    usage(refuse_generate_only(&defaults))?;
    // The server's requests and jobs are Lumina2's (system prompts,
    // samplers, TeaCache, image-to-image); a Z-Image folder is not served.
    if crate::zimage::is_zimage(&defaults)? {
        return Err(crate::generate::Usage(anyhow::anyhow!(
            "--model {}: a Z-Image pipeline; `lumina2 serve` serves Lumina2 models only              (generate Z-Image images with `lumina2 generate`, or many with `--from-file`)",
            defaults.model.as_deref().unwrap_or_default()
        ))
        .into());
    }
    // The defaults of every request are checked before anything is loaded,
    // as `generate` checks its options.
    let mut probe = defaults.clone();
    probe.prompt = vec![String::new()];
    usage(generate::options(&probe, defaults.seed.unwrap_or(0)))?;
    let loras = usage(parse_loras(&defaults))?;
    usage(set_threads(defaults.threads))?;
    let api_key = api_key
        .or_else(|| std::env::var(API_KEY_ENV).ok())
        .filter(|k| !k.is_empty());

    let memory = Arc::new(OnceLock::new());
    let load_args = defaults.clone();
    let loaded = memory.clone();
    let load = move || -> Result<CliRenderer> {
        let model = generate::load(&load_args, loras, true, quiet)?;
        let _ = loaded.set(model.pipe.memory_check());
        Ok(CliRenderer { model })
    };
    let model = if preload {
        ServedModel::Ready(load()?)
    } else {
        ServedModel::Load(Box::new(move || load().map_err(|e| crate::error_chain(&e))))
    };
    let mut config = Config::new(generate::model_name(&defaults));
    config.host = host;
    config.port = port;
    config.api_key = api_key;
    config.max_queue = max_queue;
    config.shutdown_grace = Duration::from_secs(shutdown_grace);
    let backend = CliBackend { defaults, memory };
    lumina2_server::run(config, backend, model, |addr| {
        // One line tests and scripts can read; stdout may be closed (no panic).
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })
    .context("lumina2 serve")
}
