//! Not built yet: see this crate's README.md.
