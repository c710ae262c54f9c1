//! `Linear::gated` against the unfused form (two linear layers, then the
//! fused activation-times-gate), and `Linear::feed_forward` against that
//! followed by the last layer: the same bits, for Q4_0 weights (the
//! panel-by-panel AMX paths where the CPU has them) and for dense ones.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use lumina2_kernels::conv::bf16 as conv;
use lumina2_kernels::elementwise::fused;
use lumina2_kernels::{ops, profile};
use lumina2_weights::{GateAct, Linear, LinearWeight};

fn bits(t: &Tensor) -> candle_core::Result<Vec<u16>> {
    Ok(t.flatten_all()?
        .to_vec1::<half::bf16>()?
        .into_iter()
        .map(|v| v.to_bits())
        .collect())
}

#[test]
fn gated_equals_unfused() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // (rows, in, out): a partial last panel and row block; an input deep
    // enough for the kernel's depth chunks.
    // A Q4_0 last layer needs its input width (out) a multiple of 32: the
    // feed-forward is checked on those shapes only. Below 16 rows the
    // one-pass kernels step aside for the layers' own paths (candle's
    // matmul on the dequantised weight, which sums in another order).
    for (rows, inp, out) in [
        (5usize, 64usize, 40usize),
        (130, 4992, 70),
        (7, 64, 96),
        (100, 4992, 160),
    ] {
        let x = Tensor::randn(0f32, 1., (1, rows, inp), &dev)?.to_dtype(DType::BF16)?;
        let wg = Tensor::randn(0f32, 0.05, (out, inp), &dev)?;
        let wu = Tensor::randn(0f32, 0.05, (out, inp), &dev)?;
        let wd = Tensor::randn(0f32, 0.05, (inp, out.div_ceil(32) * 32), &dev)?;
        let layers = |quantized: bool| -> candle_core::Result<(Linear, Linear, Linear)> {
            let make = |w: &Tensor| -> candle_core::Result<Linear> {
                let weight = match quantized {
                    true => LinearWeight::Quantized(std::sync::Arc::new(QTensor::quantize(
                        w,
                        GgmlDType::Q4_0,
                    )?)),
                    false => LinearWeight::Dense(w.to_dtype(DType::BF16)?),
                };
                Linear::new(weight, None)
            };
            Ok((make(&wg)?, make(&wu)?, make(&wd)?))
        };
        for quantized in [true, false] {
            let (g, u, d) = layers(quantized)?;
            for act in [GateAct::Silu, GateAct::GeluTanh] {
                profile::reset();
                profile::enable(true);
                let fused_out = g.gated(&u, &x, act)?;
                profile::enable(false);
                // With AMX, Q4_0 takes the panel-by-panel path: no separate
                // element-wise pass (the unfused form has one).
                let separate = profile::report()
                    .iter()
                    .any(|(group, _, _)| *group == profile::groups::ELEMENTWISE);
                // The one-pass kernels take inputs of the packed kernel's
                // row count (fewer rows: each layer on its own path).
                let one_pass =
                    quantized && conv::available() && rows >= ops::linear::PACK_PER_CALL_ROWS;
                assert_eq!(separate, !one_pass, "{quantized} {act:?}");
                let (gy, uy) = (g.forward(&x)?, u.forward(&x)?);
                let unfused = match act {
                    GateAct::Silu => fused::silu_mul(&gy, &uy)?,
                    GateAct::GeluTanh => fused::gelu_tanh_mul(&gy, &uy)?,
                };
                assert_eq!(fused_out.dims(), &[1, rows, out]);
                assert_eq!(
                    bits(&fused_out)?,
                    bits(&unfused)?,
                    "{rows}x{inp}x{out} quantized {quantized} {act:?}"
                );
                if out % 32 != 0 {
                    continue;
                }
                profile::reset();
                profile::enable(true);
                let ffn = g.feed_forward(&u, &d, &x, act)?;
                profile::enable(false);
                // With AMX, Q4_0 runs as one call (the gated product handed
                // over as tiles), otherwise as three layers.
                let calls: u64 = profile::report()
                    .iter()
                    .filter(|(group, _, _)| *group == profile::groups::LINEAR)
                    .map(|r| r.2)
                    .sum();
                assert_eq!(calls, if one_pass { 1 } else { 3 }, "{quantized} {act:?}");
                assert_eq!(ffn.dims(), &[1, rows, inp]);
                assert_eq!(
                    bits(&ffn)?,
                    bits(&d.forward(&unfused)?)?,
                    "feed-forward {rows}x{inp}x{out} quantized {quantized} {act:?}"
                );
            }
        }
    }
    Ok(())
}
