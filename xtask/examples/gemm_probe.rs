//! Matmul throughput of the shapes of the Lumina2 transformer's linear layers:
//! candle's f32 and bf16 matmul against the packed bf16 kernel and the int8
//! kernel (inputs quantised per call, included in its time).
//! `cargo run -p xtask --release --example gemm_probe`; with `-- mapped`,
//! only the packed bf16 kernel against the in-place one
//! ([`lumina2_kernels::gemm::mapped`], the weight row-major as in its file);
//! `-- mapped zimage`: the same at Z-Image's widths.

use candle_core::{DType, Device, Tensor};
use lumina2_kernels::gemm::int8::PackedI8;
use lumina2_kernels::gemm::mapped::RowMajorBf16;
use lumina2_kernels::gemm::packed::PackedBf16;
use std::time::Instant;

fn time(runs: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..runs {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / runs as f64)
}

/// Packed against in-place bf16 products of the same shapes.
fn mapped_probe(shapes: &[(usize, usize, usize)]) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!("| m x k x n | packed bf16 GFLOP/s | mapped bf16 GFLOP/s | same bits |");
    println!("|---|---|---|---|");
    for &(m, k, n) in shapes {
        let flop = 2.0 * (m * k * n) as f64;
        let ab = Tensor::randn(0f32, 1., (m, k), &dev)?.to_dtype(DType::BF16)?;
        let wb = Tensor::randn(0f32, 1., (n, k), &dev)?.to_dtype(DType::BF16)?;
        let bytes: Vec<u8> = wb
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect();
        let mw = RowMajorBf16::new(std::sync::Arc::new(bytes), 0, n, k)
            .ok_or_else(|| candle_core::Error::msg("weight"))?;
        let p = PackedBf16::pack(&wb)?;
        let pk_s = time(5, || p.matmul(&ab, None).map(|_| ()))?;
        let mp_s = time(5, || mw.matmul(&ab, None).map(|_| ()))?;
        let same = p
            .matmul(&ab, None)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            == mw
                .matmul(&ab, None)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
        println!(
            "| {m}x{k}x{n} | {:.0} | {:.0} | {same} |",
            flop / pk_s / 1e9,
            flop / mp_s / 1e9
        );
    }
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    if std::env::args().nth(1).as_deref() == Some("mapped") {
        if std::env::args().nth(2).as_deref() == Some("zimage") {
            // Z-Image's widths (3840, feed-forward 10240) at 512x512, one item.
            return mapped_probe(&[(1056, 3840, 3840), (1056, 3840, 10240), (1056, 10240, 3840)]);
        }
        return mapped_probe(&[
            (1280, 2304, 3840),
            (1280, 2304, 2304),
            (1280, 2304, 9216),
            (1280, 9216, 2304),
            (256, 2304, 9216),
            (32, 2304, 9216),
        ]);
    }
    println!(
        "int8 kernel: {}",
        lumina2_kernels::gemm::int8::kernel_name()
    );
    println!("| m x k x n | candle f32 GFLOP/s | candle bf16 | packed bf16 | int8 (GOP/s) |");
    println!("|---|---|---|---|---|");
    for &(m, k, n) in &[
        (1280usize, 2304usize, 3840usize),
        (1280, 2304, 2304),
        (1280, 2304, 9216),
        (1280, 9216, 2304),
        (256, 2304, 9216),
        (4096, 4096, 4096),
    ] {
        let flop = 2.0 * (m * k * n) as f64;
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let f32_s = time(3, || a.matmul(&w.t()?).map(|_| ()))?;
        let (ab, wb) = (a.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
        let bf_s = time(3, || ab.matmul(&wb.t()?).map(|_| ()))?;
        let p = PackedBf16::pack(&wb)?;
        let pk_s = time(3, || p.matmul(&ab, None).map(|_| ()))?;
        let q = PackedI8::quantize(&w)?;
        let i8_s = time(3, || q.matmul(&ab, None).map(|_| ()))?;
        println!(
            "| {m}x{k}x{n} | {:.0} | {:.0} | {:.0} | {:.0} |",
            flop / f32_s / 1e9,
            flop / bf_s / 1e9,
            flop / pk_s / 1e9,
            flop / i8_s / 1e9
        );
    }
    // Packing a quantised weight per call (the GGUF bf16 path).
    let w = Tensor::randn(0f32, 1., (9216, 2304), &dev)?;
    for ty in [
        candle_core::quantized::GgmlDType::Q4_0,
        candle_core::quantized::GgmlDType::Q8_0,
    ] {
        let q = candle_core::quantized::QTensor::quantize(&w, ty)?;
        let direct = time(3, || PackedBf16::from_quantized(&q).map(|_| ()))?;
        let via = time(3, || {
            PackedBf16::pack(&q.dequantize(&dev)?.to_dtype(DType::BF16)?).map(|_| ())
        })?;
        println!(
            "pack 9216x2304 {ty:?}: direct {:.1} ms, dequantise + pack {:.1} ms",
            direct * 1e3,
            via * 1e3
        );
    }
    Ok(())
}
