//! Weights holding NaN or infinity are recorded (the pipeline warns about
//! them) without failing the load.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lumina2_weights::Weights;

#[test]
fn nan_and_inf_weights_are_recorded_by_key() {
    let dev = Device::Cpu;
    let ok = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let nan = Tensor::new(&[[1f32, f32::NAN], [3.0, 4.0]], &dev).unwrap();
    let inf = Tensor::new(&[f32::NEG_INFINITY, 0.0], &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let w = Weights::from_tensors(
        HashMap::from([
            ("a.weight".to_string(), ok),
            ("b.weight".to_string(), nan),
            ("c.bias".to_string(), inf),
        ]),
        DType::F32,
        &dev,
    );
    w.linear("a", 2, 2, false).unwrap();
    assert!(w.non_finite_keys().is_empty());
    // Loads still succeed; the keys are recorded, through any sub-handle.
    w.pp("b").get("weight", &[2, 2]).unwrap();
    w.get("c.bias", &[2]).unwrap();
    assert_eq!(w.non_finite_keys(), vec!["b.weight", "c.bias"]);
}
