//! Matrix multiplies of linear layers.

pub mod int8;
pub mod mapped;
pub mod packed;
