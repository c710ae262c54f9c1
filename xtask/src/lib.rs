//! Developer tasks: `cargo xtask parity`, `bench`, `fuzz`, `openai` and `load`.
//!
//! The library half exists so that `cargo test` can run the committed parity
//! fixtures through the same runner as `cargo xtask parity --cases`.

pub mod bench;
pub mod bench_e2e;
pub mod fuzz;
pub mod fuzz_configs;
pub mod load;
pub mod openai;
pub mod parity;
pub mod pyenv;
pub mod server;
