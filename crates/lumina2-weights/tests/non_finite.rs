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

/// 16-bit linear weights of a safetensors file widened to f32 are checked
/// piece by piece while widened: a NaN or infinity anywhere in a weight of
/// several pieces is recorded, a finite weight is not.
#[test]
fn widened_file_weights_are_checked_while_read() {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("lumina2-widened-nan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        // 3 x 2^20 + 5 values: more than one piece of the widening reader.
        let (rows, cols) = (3 * 1024 + 1, 1024 + 1);
        let clean = Tensor::ones((rows, cols), DType::F32, &dev).unwrap();
        let mut v = vec![1f32; rows * cols];
        v[rows * cols - 2] = f32::INFINITY;
        let broken = Tensor::from_vec(v, (rows, cols), &dev).unwrap();
        let tensors = HashMap::from([
            ("ok.weight".to_string(), clean.to_dtype(dtype).unwrap()),
            ("bad.weight".to_string(), broken.to_dtype(dtype).unwrap()),
        ]);
        let path = dir.join(format!("{dtype:?}.safetensors"));
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let w = Weights::from_safetensors(&[&path], DType::F32, &dev).unwrap();
        w.linear("ok", cols, rows, false).unwrap();
        assert!(w.non_finite_keys().is_empty(), "{dtype:?}");
        w.linear("bad", cols, rows, false).unwrap();
        assert_eq!(w.non_finite_keys(), vec!["bad.weight"], "{dtype:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
