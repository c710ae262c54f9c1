//! `lumina2`: Lumina-Image 2.0 text-to-image from the command line.

// Bad input is an error message and an exit status, never a panic.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod batch;
mod convert;
mod generate;
mod init_image;
mod inspect;
mod output;
mod serve;
mod signals;
mod zimage;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status of an impossible request (clap uses it for its usage errors);
/// 1 is a failure while running (missing or corrupt files, ...).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "lumina2",
    version,
    about = "Lumina-Image 2.0 text-to-image on candle"
)]
struct Cli {
    /// Only errors on stderr (no progress bar, no stage timings).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More logging (repeat for even more); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from prompts.
    Generate(Box<generate::GenerateArgs>),
    /// Describe a checkpoint: format, key layout, dtypes, quantisation, parameters, config.
    Inspect(inspect::InspectArgs),
    /// Serve an OpenAI-compatible images API over HTTP, models loaded once.
    Serve(Box<serve::ServeArgs>),
    /// Convert a transformer checkpoint: diffusers folder, original single file, GGUF (quantised).
    Convert(convert::ConvertArgs),
}

fn init_logging(quiet: bool, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// The error and its causes on one line, skipping a cause whose text the
/// message already holds (typed errors quote their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

fn main() -> ExitCode {
    // Before any thread or large buffer exists (see the function's docs).
    let kept = lumina2_kernels::memory::keep_freed_memory();
    let cli = Cli::parse();
    init_logging(cli.quiet, cli.verbose);
    tracing::debug!("freed memory kept for reuse: {kept}");
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args, cli.quiet),
        Command::Inspect(args) => inspect::run(&args),
        Command::Serve(args) => serve::run(*args, cli.quiet),
        Command::Convert(args) => convert::run(args, cli.quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // 128 + the signal, as a shell reports a process the signal killed.
            if let Some(i) = e.downcast_ref::<signals::Interrupted>() {
                eprintln!("lumina2: {i}");
                return ExitCode::from(i.exit_status());
            }
            eprintln!("lumina2: error: {}", error_chain(&e));
            let invalid_option = matches!(
                e.downcast_ref::<lumina2_pipeline::Error>(),
                Some(lumina2_pipeline::Error::InvalidOption { .. })
            );
            if e.downcast_ref::<generate::Usage>().is_some() || invalid_option {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
