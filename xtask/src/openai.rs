//! `cargo xtask openai`: OpenAI's own Python client against `lumina2 serve`.
//!
//! The client asks for the `seed_cfg` fixture case (seed 42, 48x32, 4 steps)
//! through `client.images.generate`; the PNG it gets must be, byte for byte,
//! the one `lumina2 generate` writes for the same options and seed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::pyenv;
use crate::server::{generate, Server};

/// The bearer token the server is started with (the client must send it).
const API_KEY: &str = "lumina2-xtask-openai";

/// The prompt of the `seed_cfg` fixture case.
const PROMPT: &str = "a red fox in the snow";

/// Runs the check with the `lumina2` binary `bin`; whether the two PNGs match.
pub fn openai(bin: &Path) -> Result<bool> {
    let python = pyenv::ensure_venv()?;
    let dir = std::env::temp_dir().join(format!("lumina2-xtask-openai-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = compare(bin, &python, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn compare(bin: &Path, python: &Path, dir: &Path) -> Result<bool> {
    let api_png = dir.join("api.png");
    {
        let server = Server::start(bin, &["--api-key", API_KEY])?;
        pyenv::run(
            Command::new(python)
                .arg(pyenv::scripts_dir().join("openai_client.py"))
                .args(["--base-url", &server.url("/v1")])
                .args(["--api-key", API_KEY])
                .args(["--prompt", PROMPT])
                .arg("--out")
                .arg(&api_png),
        )?;
    }
    let cli_png = dir.join("cli.png");
    generate(
        bin,
        &[
            "--prompt", PROMPT, "--width", "48", "--height", "32", "--steps", "4", "--seed", "42",
        ],
        &cli_png,
    )?;
    let api = read(&api_png)?;
    let cli = read(&cli_png)?;
    if api == cli {
        println!(
            "openai: the image from client.images.generate equals lumina2 generate's PNG ({} bytes)",
            api.len()
        );
        Ok(true)
    } else {
        eprintln!(
            "openai: FAILED: the image from client.images.generate ({} bytes) differs from \
             lumina2 generate's PNG ({} bytes) for the same options and seed",
            api.len(),
            cli.len()
        );
        Ok(false)
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}
