//! PyTorch's CPU random number generator (placeholder, being written).
