//! The dispatch layer's ops against float64 references, through the path
//! this machine takes for each (printed; `LUMINA2_PORTABLE=1` runs candle's
//! paths).

use candle_core::{DType, Device, Tensor};
use lumina2_kernels::norm::group::FusedAct;
use lumina2_kernels::ops;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random normal-ish sequence (sum of uniforms), so that
    // the tolerances below hold for the exact inputs every run.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f64) / (1u64 << 24) as f64
    };
    let v: Vec<f32> = (0..n)
        .map(|_| ((0..4).map(|_| next()).sum::<f64>() - 2.0) * 1.7)
        .map(|x| x as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0.0, f64::max)
}

fn bf(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap()
}

/// `softmax(scale q k^T + bias[b, j] + mask[b, i, j]) v` in f64, query head
/// `i` reading key head `i / (H / KV)`.
fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    score: impl Fn(f64) -> f64,
    bias: impl Fn(usize, usize, usize) -> f64,
) -> Vec<f64> {
    let (b, h, s_q, d) = q.dims4().unwrap();
    let (_, kv, s_kv, _) = k.dims4().unwrap();
    let (q, k, v) = (f64s(q), f64s(k), f64s(v));
    let rep = h / kv;
    let mut out = vec![0.0; b * h * s_q * d];
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / rep;
            for i in 0..s_q {
                let qrow = &q[((bi * h + hi) * s_q + i) * d..][..d];
                let mut s: Vec<f64> = (0..s_kv)
                    .map(|j| {
                        let krow = &k[((bi * kv + g) * s_kv + j) * d..][..d];
                        let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                        score(dot * scale) + bias(bi, i, j)
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                s.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: f64 = s.iter().sum();
                for (j, p) in s.iter().enumerate() {
                    let vrow = &v[((bi * kv + g) * s_kv + j) * d..][..d];
                    let o = &mut out[((bi * h + hi) * s_q + i) * d..][..d];
                    for (o, x) in o.iter_mut().zip(vrow) {
                        *o += p / z * x;
                    }
                }
            }
        }
    }
    out
}

/// Keys 30.. of item 1 are padding.
fn key_bias(s_kv: usize) -> (Tensor, impl Fn(usize, usize, usize) -> f64) {
    let valid = move |b: usize, j: usize| b == 0 || j < 30;
    let data: Vec<f32> = (0..2)
        .flat_map(|b| (0..s_kv).map(move |j| if valid(b, j) { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let t = Tensor::from_vec(data, (2, s_kv), &Device::Cpu).unwrap();
    (
        t,
        move |b, _, j| if valid(b, j) { 0.0 } else { f64::NEG_INFINITY },
    )
}

#[test]
fn sdpa_is_grouped_softmax_attention() {
    lumina2_kernels::report_paths("sdpa");
    let (q, k, v) = (
        randn(&[2, 6, 37, 40], 1),
        randn(&[2, 2, 37, 40], 2),
        randn(&[2, 2, 37, 40], 3),
    );
    let (bias, bias_ref) = key_bias(37);
    let keys = ops::attention::KeyBias {
        bias: &bias,
        prefix: Some(&[37, 30]),
    };
    let scale = 1.0 / 40f64.sqrt();
    // f32 in: f32 sums; bf16 in: probabilities and output rounded to bf16
    // (outputs are averages of values with |v| < 7: below 2 * 7 * 2^-8).
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.06)] {
        let (q, k, v) = (
            q.to_dtype(dtype).unwrap(),
            k.to_dtype(dtype).unwrap(),
            v.to_dtype(dtype).unwrap(),
        );
        let want = reference_attention(&q, &k, &v, scale, |s| s, &bias_ref);
        eprintln!(
            "sdpa {dtype:?}: {:?}",
            ops::attention::sdpa_path(q.device(), dtype)
        );
        // One row per chunk, an uneven chunking, one chunk.
        for budget in [1, 3 * 37 * 4 * 5, usize::MAX / 2] {
            let got = ops::attention::sdpa(&q, &k, &v, Some(keys), scale, budget).unwrap();
            assert_eq!((got.dims(), got.dtype()), (q.dims(), dtype));
            let d = max_diff(&f64s(&got), &want);
            assert!(d < tol, "{dtype:?} budget {budget}: {d}");
        }
    }
}

#[test]
fn grouped_candle_path_is_attention() {
    let (q, k, v) = (
        randn(&[2, 6, 37, 8], 4),
        randn(&[2, 2, 37, 8], 5),
        randn(&[2, 2, 37, 8], 6),
    );
    let (bias, bias_ref) = key_bias(37);
    let want = reference_attention(&q, &k, &v, 1.0, |s| s, &bias_ref);
    for budget in [1, 2 * 6 * 37 * 4 * 5, usize::MAX / 2] {
        let got = ops::attention::grouped(&q, &k, &v, Some(&bias), budget).unwrap();
        let d = max_diff(&f64s(&got), &want);
        assert!(d < 1e-5, "budget {budget}: {d}");
    }
}

#[test]
fn eager_is_softcapped_causal_attention() {
    lumina2_kernels::report_paths("eager");
    let (b, h, kv, l, d) = (2, 4, 2, 19, 16);
    let (q, k, v) = (
        randn(&[b, h, l, d], 7),
        randn(&[b, kv, l, d], 8),
        randn(&[b, kv, l, d], 9),
    );
    // Causal, and the first key of item 1 is padding.
    let neg = f32::from_bits(0xFF7F_0000);
    let masked = |bi: usize, i: usize, j: usize| j > i || (bi == 1 && j == 0);
    let mask: Vec<f32> = (0..b * l * l)
        .map(|n| {
            if masked(n / (l * l), n / l % l, n % l) {
                neg
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (b, 1, l, l), &Device::Cpu).unwrap();
    let (scaling, cap) = (0.25, 3.0);
    let softcap = |s: f64| cap * (s / cap).tanh();
    let mask_ref = |bi, i, j| if masked(bi, i, j) { neg as f64 } else { 0.0 };
    // bf16: every op rounded to bf16 (scores |s| < 3: 2^-8 relative each,
    // a few roundings), probabilities and output rounded.
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.08)] {
        let (q, k, v) = (
            q.to_dtype(dtype).unwrap(),
            k.to_dtype(dtype).unwrap(),
            v.to_dtype(dtype).unwrap(),
        );
        let want = reference_attention(&q, &k, &v, scaling, softcap, mask_ref);
        eprintln!(
            "eager {dtype:?}: {:?}",
            ops::attention::eager_path(q.device(), dtype)
        );
        let got = ops::attention::eager(&q, &k, &v, &mask, scaling, Some(cap)).unwrap();
        assert_eq!((got.dims(), got.dtype()), (q.dims(), dtype));
        let dd = max_diff(&f64s(&got), &want);
        assert!(dd < tol, "{dtype:?}: {dd}");
        // Without a soft cap.
        let want = reference_attention(&q, &k, &v, scaling, |s| s, mask_ref);
        let got = ops::attention::eager(&q, &k, &v, &mask, scaling, None).unwrap();
        let dd = max_diff(&f64s(&got), &want);
        assert!(dd < tol, "{dtype:?} no cap: {dd}");
    }
}

#[test]
fn rms_norms_normalise() {
    lumina2_kernels::report_paths("rms_norm");
    let (rows, n, eps) = (5, 48, 1e-6);
    let x = randn(&[rows, n], 10);
    let w = randn(&[n], 11);
    let reference = |x: &Tensor, w: Option<&Tensor>| -> Vec<f64> {
        let (xs, ws) = (f64s(x), w.map(f64s));
        xs.chunks(n)
            .flat_map(|r| {
                let inv = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / n as f64 + eps).sqrt();
                let ws = ws.clone();
                r.iter()
                    .enumerate()
                    .map(move |(i, v)| v * inv * ws.as_ref().map_or(1.0, |w| w[i]))
            })
            .collect()
    };
    for dtype in [DType::F32, DType::BF16] {
        eprintln!(
            "rms_norm {dtype:?}: {:?}",
            ops::norm::rms_norm_path(&Device::Cpu, dtype)
        );
        let (x, w) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
        // bf16: the normalised value and the product rounded (|y| < 4 * 7).
        let tol = if dtype == DType::BF16 {
            28.0 * 2f64.powi(-8)
        } else {
            1e-5
        };
        for w in [Some(&w), None] {
            let got = ops::norm::rms_norm(&x, w, eps).unwrap();
            assert_eq!(got.dtype(), dtype);
            let d = max_diff(&f64s(&got), &reference(&x, w));
            assert!(d < tol, "{dtype:?} weight {}: {d}", w.is_some());
        }
        // Gemma's: in f32 throughout, one rounding.
        let w32 = w.to_dtype(DType::F32).unwrap();
        let got = ops::norm::rms_norm_f32(&x, &w32, eps).unwrap();
        assert_eq!(got.dtype(), dtype);
        let d = max_diff(&f64s(&got), &reference(&x, Some(&w32)));
        let tol = if dtype == DType::BF16 {
            28.0 * 2f64.powi(-9)
        } else {
            1e-5
        };
        assert!(d < tol, "{dtype:?} rms_norm_f32: {d}");
    }
}

#[test]
fn group_norm_normalises_groups() {
    let dev = Device::Cpu;
    eprintln!("group_norm: {:?}", ops::norm::GroupNorm::path(&dev));
    let (b, c, h, w, groups, eps) = (2, 8, 5, 3, 4, 1e-6);
    let x = randn(&[b, c, h, w], 12);
    let (wt, bt) = (randn(&[c], 13), randn(&[c], 14));
    let gn = ops::norm::GroupNorm::new(&wt, &bt, groups, eps).unwrap();
    let (xs, ws, bs) = (f64s(&x), f64s(&wt), f64s(&bt));
    let per = c / groups * h * w;
    let mut want = vec![0.0; xs.len()];
    for (gi, chunk) in xs.chunks(per).enumerate() {
        let mean = chunk.iter().sum::<f64>() / per as f64;
        let var = chunk.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / per as f64;
        for (i, v) in chunk.iter().enumerate() {
            let ch = (gi % groups) * (c / groups) + i / (h * w);
            want[gi * per + i] = (v - mean) / (var + eps).sqrt() * ws[ch] + bs[ch];
        }
    }
    let got = gn.forward_f32(&x).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    let d = max_diff(&f64s(&got), &want);
    assert!(d < 1e-4, "group norm: {d}");
    // With SiLU fused, where the kernel runs.
    if let Some(y) = gn.forward_act(&x, FusedAct::Silu, DType::F32).unwrap() {
        let silu: Vec<f64> = want.iter().map(|v| v / (1.0 + (-v).exp())).collect();
        let d = max_diff(&f64s(&y), &silu);
        assert!(d < 1e-4, "group norm + silu: {d}");
    }
}

#[test]
fn ropes_rotate() {
    lumina2_kernels::report_paths("rope");
    let (b, h, s, d) = (2, 3, 5, 8);
    let x = randn(&[b, h, s, d], 15);
    let angle = |p: usize, k: usize| (p as f64 + 1.0) * 0.3 / (k as f64 + 1.0);
    // Interleaved: pairs (2k, 2k+1) rotated by angle(p, k); f32 factors.
    let cos: Vec<f32> = (0..b * s * d / 2)
        .map(|n| angle(n / (d / 2) % s, n % (d / 2)).cos() as f32)
        .collect();
    let sin: Vec<f32> = (0..b * s * d / 2)
        .map(|n| angle(n / (d / 2) % s, n % (d / 2)).sin() as f32)
        .collect();
    let cos_t = Tensor::from_vec(cos.clone(), (b, s, d / 2), &Device::Cpu).unwrap();
    let sin_t = Tensor::from_vec(sin.clone(), (b, s, d / 2), &Device::Cpu).unwrap();
    let xs = f64s(&x);
    let mut want = vec![0.0; xs.len()];
    for (r, row) in xs.chunks(d).enumerate() {
        let p = r % s;
        for k in 0..d / 2 {
            let (c, sn) = (angle(p, k).cos(), angle(p, k).sin());
            want[r * d + 2 * k] = row[2 * k] * c - row[2 * k + 1] * sn;
            want[r * d + 2 * k + 1] = row[2 * k] * sn + row[2 * k + 1] * c;
        }
    }
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 7.0 * 2f64.powi(-8))] {
        let got = ops::rope::interleaved(&x.to_dtype(dtype).unwrap(), &cos_t, &sin_t).unwrap();
        assert_eq!(got.dtype(), dtype);
        let want = if dtype == DType::BF16 {
            // The reference of the bf16-rounded input.
            let xb = f64s(&bf(&x));
            let mut w = vec![0.0; xb.len()];
            for (r, row) in xb.chunks(d).enumerate() {
                for k in 0..d / 2 {
                    let (c, sn) = (angle(r % s, k).cos(), angle(r % s, k).sin());
                    w[r * d + 2 * k] = row[2 * k] * c - row[2 * k + 1] * sn;
                    w[r * d + 2 * k + 1] = row[2 * k] * sn + row[2 * k + 1] * c;
                }
            }
            w
        } else {
            want.clone()
        };
        let dd = max_diff(&f64s(&got), &want);
        assert!(dd < tol, "interleaved {dtype:?}: {dd}");
    }
    // Rotate-half: channel i < D/2 pairs with i + D/2; factors [L, D].
    let cos2: Vec<f64> = (0..s * d)
        .map(|n| angle(n / d, n % (d / 2)).cos())
        .collect();
    let sin2: Vec<f64> = (0..s * d)
        .map(|n| angle(n / d, n % (d / 2)).sin())
        .collect();
    let mut want = vec![0.0; xs.len()];
    for (r, row) in xs.chunks(d).enumerate() {
        let p = r % s;
        for i in 0..d {
            let rot = if i < d / 2 {
                -row[i + d / 2]
            } else {
                row[i - d / 2]
            };
            want[r * d + i] = row[i] * cos2[p * d + i] + rot * sin2[p * d + i];
        }
    }
    let to = |v: &[f64]| {
        Tensor::from_vec(
            v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            (s, d),
            &Device::Cpu,
        )
        .unwrap()
    };
    let got = ops::rope::rotate_half(&x, &to(&cos2), &to(&sin2)).unwrap();
    let dd = max_diff(&f64s(&got), &want);
    assert!(dd < 1e-5, "rotate_half: {dd}");
}

#[test]
fn rope_to_heads_is_the_transposed_rope_bit_for_bit() {
    // The fused path (AVX512-BF16) against the transpose copy and candle's
    // `rope_i`; widths with a partial last vector (40) and Z-Image's (128),
    // factors of any sign including zero rows (masked positions).
    for (b, s, h, d) in [(2, 7, 3, 40), (1, 33, 2, 128)] {
        let x = randn(&[b, s, h, d], 21);
        let n = b * s * d / 2;
        let ang: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32) * 0.13 - 6.0)
            .collect();
        let zero_row = |i: usize| (i / (d / 2)) % s == 3;
        let cos: Vec<f32> = (0..n)
            .map(|i| if zero_row(i) { 0.0 } else { ang[i].cos() })
            .collect();
        let sin: Vec<f32> = (0..n)
            .map(|i| if zero_row(i) { 0.0 } else { ang[i].sin() })
            .collect();
        let cos = Tensor::from_vec(cos, (b, s, d / 2), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(sin, (b, s, d / 2), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = x.to_dtype(dtype).unwrap();
            let got = ops::rope::interleaved_to_heads(&x, &cos, &sin).unwrap();
            let want = candle_nn::rotary_emb::rope_i(
                &x.transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
                &cos,
                &sin,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            assert_eq!(got.dims(), [b, h, s, d]);
            assert_eq!(got.dtype(), dtype);
            let bits = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&got), bits(&want), "{dtype:?} {:?}", (b, s, h, d));
        }
    }
}

#[test]
fn elementwise_ops_compute_their_math() {
    let dev = Device::Cpu;
    eprintln!("elementwise: {:?}", ops::elementwise::path(&dev));
    let (b, s, d) = (2, 5, 24);
    let (x, y, v) = (
        randn(&[b, s, d], 16),
        randn(&[b, s, d], 17),
        randn(&[b, 1, d], 18),
    );
    let (xs, ys, vs) = (f64s(&x), f64s(&y), f64s(&v));
    let bcast = |i: usize| vs[(i / (s * d)) * d + i % d];
    let silu = |a: f64| a / (1.0 + (-a).exp());
    let gelu = |a: f64| {
        0.5 * a * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (a + 0.044715 * a.powi(3))).tanh())
    };
    type Op = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor>;
    type Want<'a> = Box<dyn Fn(usize) -> f64 + 'a>;
    let cases: Vec<(&str, Op, Want)> = vec![
        (
            "add",
            Box::new(|x, y, _| ops::elementwise::add(x, y).unwrap()),
            Box::new(|i| xs[i] + ys[i]),
        ),
        (
            "mul_broadcast",
            Box::new(|x, _, v| ops::elementwise::mul_broadcast(x, v).unwrap()),
            Box::new(|i| xs[i] * bcast(i)),
        ),
        (
            "add_mul_broadcast",
            Box::new(|x, y, v| ops::elementwise::add_mul_broadcast(x, v, y).unwrap()),
            Box::new(|i| xs[i] + bcast(i) * ys[i]),
        ),
        (
            "silu_mul",
            Box::new(|x, y, _| ops::elementwise::silu_mul(x, y).unwrap()),
            Box::new(|i| silu(xs[i]) * ys[i]),
        ),
        (
            "gelu_tanh_mul",
            Box::new(|x, y, _| ops::elementwise::gelu_tanh_mul(x, y).unwrap()),
            Box::new(|i| gelu(xs[i]) * ys[i]),
        ),
    ];
    for (name, op, want) in &cases {
        let got = f64s(&op(&x, &y, &v));
        let want: Vec<f64> = (0..got.len()).map(want).collect();
        let dd = max_diff(&got, &want);
        assert!(dd < 1e-4, "{name} f32: {dd}");
        // bf16 of bf16 inputs: within a few bf16 roundings of |r| < 60.
        let got = op(&bf(&x), &bf(&y), &bf(&v));
        assert_eq!(got.dtype(), DType::BF16);
        let rel = f64s(&got)
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(rel < 0.05, "{name} bf16: {rel}");
    }
}

#[test]
fn linear_dispatch_and_candle_matmul() {
    use ops::linear::{Path, WeightForm};
    let x = randn(&[3, 7], 19);
    let w = randn(&[5, 7], 20);
    let bias = randn(&[5], 21);
    // Dense weights multiply on candle; f32 quantised inputs and a few bf16
    // rows too; packed and int8 weights on their kernels for CPU inputs.
    assert_eq!(ops::linear::path(WeightForm::Dense, &x), Path::Candle);
    assert_eq!(ops::linear::path(WeightForm::Quantized, &x), Path::Candle);
    assert_eq!(
        ops::linear::path(WeightForm::Quantized, &bf(&x)),
        Path::Candle
    );
    assert_eq!(
        ops::linear::path(WeightForm::PackedBf16, &x),
        Path::PackedBf16
    );
    assert_eq!(ops::linear::path(WeightForm::Int8, &x), Path::Int8);
    let rows = bf(&randn(&[ops::linear::PACK_PER_CALL_ROWS, 7], 22));
    let want = if lumina2_kernels::gemm::packed::available() {
        Path::PackPerCall
    } else {
        Path::Candle
    };
    assert_eq!(ops::linear::path(WeightForm::Quantized, &rows), want);
    assert_eq!(
        ops::linear::packs(&bf(&w)),
        lumina2_kernels::gemm::packed::available()
    );
    assert!(!ops::linear::packs(&w));
    eprintln!(
        "linear: bf16 weights packed: {}",
        ops::linear::packs(&bf(&w))
    );
    let got = f64s(&ops::linear::matmul(&x, &w, Some(&bias)).unwrap());
    let (xs, ws, bs) = (f64s(&x), f64s(&w), f64s(&bias));
    let want: Vec<f64> = (0..3 * 5)
        .map(|n| {
            (0..7)
                .map(|i| xs[n / 5 * 7 + i] * ws[n % 5 * 7 + i])
                .sum::<f64>()
                + bs[n % 5]
        })
        .collect();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "linear: {d}");
}

#[test]
fn conv_dispatch() {
    let dev = Device::Cpu;
    // Half models convolve in f32 on the CPU; f64 stays f64.
    assert_eq!(ops::conv::compute_dtype(DType::BF16, &dev), DType::F32);
    assert_eq!(ops::conv::compute_dtype(DType::F16, &dev), DType::F32);
    assert_eq!(ops::conv::compute_dtype(DType::F64, &dev), DType::F64);
    assert!(!ops::conv::f32_kernel(&dev, DType::F64));
    assert_eq!(ops::conv::path(&dev, DType::F64), ops::conv::Path::Candle);
    assert!(!ops::attention::vae_kernel(&dev, DType::BF16));
    eprintln!(
        "conv: bf16 model {:?}, f32 model {:?}",
        ops::conv::path(&dev, DType::BF16),
        ops::conv::path(&dev, DType::F32)
    );
}
