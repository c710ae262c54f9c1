//! Unit tests of pieces whose expected values come from math.

use candle_core::{Device, Tensor};

/// A stride-2 convolution equals the stride-1 convolution sampled at even
/// positions (checks the convolution our downsampling relies on).
#[test]
fn stride_two_conv_is_subsampled_stride_one_conv() {
    let d = Device::Cpu;
    for (c, h, w) in [(2usize, 5usize, 5usize), (8, 25, 21), (16, 7, 4)] {
        let x = Tensor::randn(0f32, 1., (1, c, h, w), &d).unwrap();
        let k = Tensor::randn(0f32, 1., (c, c, 3, 3), &d).unwrap();
        let a = x.conv2d(&k, 0, 2, 1, 1).unwrap();
        let b = x.conv2d(&k, 0, 1, 1, 1).unwrap();
        let (_, _, bh, bw) = b.dims4().unwrap();
        let ih = Tensor::arange_step(0u32, bh as u32, 2, &d).unwrap();
        let iw = Tensor::arange_step(0u32, bw as u32, 2, &d).unwrap();
        let b2 = b
            .index_select(&ih, 2)
            .unwrap()
            .index_select(&iw, 3)
            .unwrap();
        let diff: f32 = (a - b2)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        eprintln!("{c} {h} {w}: {diff}");
        assert!(diff < 1e-4);
    }
}
