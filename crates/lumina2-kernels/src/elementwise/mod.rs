//! Element-wise ops fused into one pass.

pub mod fused;
