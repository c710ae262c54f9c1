//! `Weights::with_int8_linears`: which layers it quantises, what they compute,
//! and how a bad weight is reported.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lumina2_weights::{Error, LinearWeight, Weights};

fn weights(w: Tensor) -> Weights {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    t.insert("block.proj.weight".to_string(), w);
    t.insert(
        "block.proj.bias".to_string(),
        Tensor::arange(0f32, 24., &dev).unwrap(),
    );
    Weights::from_tensors(t, DType::F32, &dev)
}

#[test]
fn linears_are_quantised_and_inherited_by_sub_handles() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (24, 80), &dev)?;
    let x = Tensor::randn(0f32, 1., (2, 5, 80), &dev)?;
    let plain = weights(w.clone())
        .pp("block")
        .linear("proj", 80, 24, true)?;
    let int8 = weights(w)
        .with_int8_linears(true)
        .pp("block")
        .linear("proj", 80, 24, true)?;
    assert!(matches!(plain.weight(), LinearWeight::Dense(_)));
    assert!(matches!(int8.weight(), LinearWeight::Int8(_)));
    let (y, y8) = (plain.forward(&x)?, int8.forward(&x)?);
    assert_eq!(y8.dims(), &[2, 5, 24]);
    assert_eq!(y8.dtype(), DType::F32);
    // 8-bit inputs and weights: about 1% relative RMS error on Gaussian data.
    let rel = ((&y8 - &y)?.sqr()?.sum_all()?.to_scalar::<f32>()?
        / y.sqr()?.sum_all()?.to_scalar::<f32>()?)
    .sqrt();
    assert!(rel > 1e-4 && rel < 0.02, "relative RMS error {rel}");
    // Turned off again for a sub-handle.
    let off = weights(Tensor::randn(0f32, 1., (24, 80), &dev)?)
        .with_int8_linears(true)
        .pp("block")
        .with_int8_linears(false)
        .linear("proj", 80, 24, true)?;
    assert!(matches!(off.weight(), LinearWeight::Dense(_)));
    Ok(())
}

#[test]
fn non_finite_weights_are_a_load_error_naming_the_key() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let mut v = vec![0.5f32; 24 * 80];
    v[100] = f32::NAN;
    let w = Tensor::from_vec(v, (24, 80), &dev)?;
    match weights(w)
        .with_int8_linears(true)
        .pp("block")
        .linear("proj", 80, 24, true)
    {
        Err(Error::WeightLoad { key, reason, .. }) => {
            assert_eq!(key, "block.proj.weight");
            assert!(reason.contains("NaN"), "{reason}");
        }
        other => panic!("expected a load error, got {other:?}"),
    }
    Ok(())
}
