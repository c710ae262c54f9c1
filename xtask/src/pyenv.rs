//! The pinned Python reference environment under `target/parity-venv`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `xtask/parity` folder with the generators and `requirements.txt`.
pub fn scripts_dir() -> PathBuf {
    workspace_root().join("xtask").join("parity")
}

/// Creates (once) the virtual environment with the pinned packages and returns
/// its Python. Re-installs when `requirements.txt` changes. The interpreter used
/// to create it is `$LUMINA2_PYTHON` or `python3`.
pub fn ensure_venv() -> Result<PathBuf> {
    let root = workspace_root();
    let venv = root.join("target").join("parity-venv");
    let python = venv.join("bin").join("python");
    let reqs_path = scripts_dir().join("requirements.txt");
    let reqs = std::fs::read_to_string(&reqs_path)
        .with_context(|| format!("reading {}", reqs_path.display()))?;
    let stamp = venv.join(".lumina2-requirements");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(reqs.as_str()) {
        return Ok(python);
    }
    if !python.exists() {
        let base = std::env::var("LUMINA2_PYTHON").unwrap_or_else(|_| "python3".into());
        eprintln!(
            "xtask: creating the reference environment {}",
            venv.display()
        );
        run(Command::new(&base).args(["-m", "venv"]).arg(&venv))?;
    }
    eprintln!(
        "xtask: installing pinned packages from {}",
        reqs_path.display()
    );
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-r",
        ])
        .arg(&reqs_path))?;
    std::fs::write(&stamp, reqs)?;
    Ok(python)
}

/// Runs a command, failing with its status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
