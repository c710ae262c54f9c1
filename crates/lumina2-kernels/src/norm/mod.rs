//! Normalisations.

pub mod group;
