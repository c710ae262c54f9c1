//! How the process's allocator treats large buffers.
//!
//! glibc serves every allocation above its mmap threshold (which it never
//! raises past 32 MiB) with a fresh `mmap`, and unmaps it when it is freed.
//! A forward pass at 1024x1024 allocates and frees activations of 40 to 100
//! MiB per operation, so each of them comes back as untouched pages that the
//! kernel faults in 4 KiB at a time and zeroes, on every operation of every
//! step. On a quiet 2-vCPU AMD EPYC, the f32 transformer benchmark at
//! 1024x1024 (4 layers) ran its forward in 45.97 s with 15.0 M page faults
//! and 36.2 s of system time; with large buffers taken from the heap and kept
//! there when freed, in 36.18 s with 0.96 M faults and 4.0 s of system time,
//! at a peak RSS of 3759 MiB instead of 3569 (`/usr/bin/time -v cargo xtask
//! bench --what transformer --sizes 1024 --skip-torch --runs 1`, with and
//! without `LUMINA2_SYSTEM_MALLOC=1`).
//!
//! [`keep_freed_memory`] makes that the process's policy. Freed memory then
//! stays with the process for the next allocation instead of going back to
//! the system, so the resident size stays at its peak, which fragmentation
//! raises a little (5% above). It is a process-wide choice, made by the program (the
//! `lumina2` binary, the benchmarks) at its start, never by a library call.

/// Whether [`keep_freed_memory`] applies: glibc, no `LUMINA2_SYSTEM_MALLOC=1`,
/// and no malloc setting of the user's own in the environment.
fn wanted() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some();
    cfg!(all(target_os = "linux", target_env = "gnu"))
        && std::env::var_os("LUMINA2_SYSTEM_MALLOC").is_none_or(|v| v != "1")
        && !set("MALLOC_MMAP_MAX_")
        && !set("MALLOC_MMAP_THRESHOLD_")
        && !set("MALLOC_TRIM_THRESHOLD_")
        && !set("GLIBC_TUNABLES")
}

/// Serves large allocations from the heap and keeps freed memory there
/// (glibc's `M_MMAP_MAX = 0`, and an `M_TRIM_THRESHOLD` no heap reaches),
/// so that buffers freed by one operation are reused by the next without
/// page faults. Call it once, at the start of `main`, before any thread is
/// started. Returns whether the setting was applied: not on other C
/// libraries, nor with `LUMINA2_SYSTEM_MALLOC=1`, nor when the environment
/// already sets glibc's malloc parameters (`MALLOC_MMAP_MAX_`,
/// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`).
pub fn keep_freed_memory() -> bool {
    if !wanted() {
        return false;
    }
    set_glibc_malloc()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_glibc_malloc() -> bool {
    // The largest trim threshold mallopt takes (an int).
    const NEVER_TRIM: libc::c_int = libc::c_int::MAX;
    // SAFETY: mallopt only changes glibc's malloc parameters; it takes the
    // arena lock itself and is called before the program starts threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_glibc_malloc() -> bool {
    false
}
