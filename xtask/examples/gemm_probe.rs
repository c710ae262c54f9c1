//! Matmul throughput of the shapes of the Lumina2 transformer's linear layers:
//! candle's f32 and bf16 matmul against the packed bf16 kernel and the int8
//! kernel (inputs quantised per call, included in its time).
//! `cargo run -p xtask --release --example gemm_probe`

use candle_core::{DType, Device, Tensor};
use lumina2_kernels::gemm::int8::PackedI8;
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

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
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
