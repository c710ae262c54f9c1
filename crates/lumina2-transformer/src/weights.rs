//! How the model receives its weights: the interface of the `lumina2-weights`
//! crate, shared with the text encoder and implemented by the loader.
//!
//! The model asks a [`WeightSource`] for tensors by their diffusers key
//! (`layers.0.attn.to_q.weight`); [`Weights`] checks shapes and converts to the
//! compute dtype; [`Linear`] serves dense and quantised weights alike.

pub use lumina2_weights::{
    GateAct, Linear, LinearWeight, SafetensorsSource, VarBuilderSource, WeightSource, Weights,
};
