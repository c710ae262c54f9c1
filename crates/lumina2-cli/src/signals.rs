//! SIGINT, SIGTERM and SIGHUP: the first stops the run at the next point
//! where it can stop without output (after the current denoising step, or
//! before the first file is written once decoding started); a second one
//! quits at once, removing the temporary files this run holds. Either way the
//! exit status is 128 + the signal (130 for SIGINT, 143 for SIGTERM), as a
//! shell reports a process the signal killed.

use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Result;

/// The first signal received, 0 while none was.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
/// SIGINT's number where there is no `signal.h` list (the C standard's).
#[cfg(not(unix))]
const SIGINT: i32 = 2;

/// A run stopped by a signal before it wrote its output.
#[derive(Debug)]
pub struct Interrupted {
    /// The signal.
    pub signal: i32,
    /// When it stopped (" after step 3 of 30", " before writing x.png").
    pub when: String,
}

impl Interrupted {
    /// 128 + the signal.
    pub fn exit_status(&self) -> u8 {
        exit_status(self.signal)
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by {}{}", name(self.signal), self.when)
    }
}

impl std::error::Error for Interrupted {}

fn exit_status(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(u8::MAX)
}

fn name(signal: i32) -> String {
    match signal {
        SIGINT => "SIGINT".into(),
        #[cfg(unix)]
        SIGTERM => "SIGTERM".into(),
        #[cfg(unix)]
        SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// The first signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `Err(Interrupted)` once a signal was received; `when` completes "interrupted by SIGTERM".
pub fn check(when: impl FnOnce() -> String) -> Result<()> {
    match received() {
        Some(signal) => Err(Interrupted {
            signal,
            when: when(),
        }
        .into()),
        None => Ok(()),
    }
}

/// What the handler does with each signal.
fn on_signal(signal: i32) {
    use std::io::Write;
    // Not `eprintln!`, which panics when stderr is gone (a closed terminal):
    // the handler must go on to stop or quit.
    let mut err = std::io::stderr();
    if RECEIVED
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        let _ = writeln!(
            err,
            "\nlumina2: {}: stopping after this step, writing nothing (again to quit now)",
            name(signal)
        );
    } else {
        let _ = writeln!(
            err,
            "\nlumina2: {} again: quitting now, writing nothing more",
            name(signal)
        );
        crate::output::abandon(exit_status(signal));
    }
}

/// Installs the handlers: a thread that receives the signals (so the handler
/// may print and remove files, which a signal handler itself may not).
#[cfg(unix)]
pub fn install() -> Result<()> {
    use anyhow::Context;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing the signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                on_signal(signal);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Installs the Ctrl-C handler (the one signal other systems share).
#[cfg(not(unix))]
pub fn install() -> Result<()> {
    use anyhow::Context;
    ctrlc::set_handler(|| on_signal(SIGINT)).context("installing the Ctrl-C handler")
}
