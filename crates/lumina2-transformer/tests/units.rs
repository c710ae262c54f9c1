//! Properties of the building blocks that do not need PyTorch.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use lumina2_transformer::{
    grouped_attention, grouped_attention_packed, patchify, unpatchify, Config, Error, KeyMask,
    Lumina2Transformer, Position, RopeEmbedder, WeightError, Weights,
};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Plain attention with K/V repeated per query head, no chunking.
fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let (_, h, _, _) = q.dims4().unwrap();
    let kv = k.dim(1).unwrap();
    let rep = h / kv;
    let expand = |t: &Tensor| {
        let heads: Vec<Tensor> = (0..h)
            .map(|i| t.i((.., i / rep..i / rep + 1)).unwrap())
            .collect();
        Tensor::cat(&heads, 1).unwrap()
    };
    let (k, v) = (expand(k), expand(v));
    let mut s = q.matmul(&k.t().unwrap()).unwrap();
    if let Some(b) = bias {
        s = s.broadcast_add(b).unwrap();
    }
    candle_nn_softmax(&s).matmul(&v).unwrap()
}

fn candle_nn_softmax(s: &Tensor) -> Tensor {
    let max = s.max_keepdim(3).unwrap();
    let e = s.broadcast_sub(&max).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap()
}

/// Two batch items of 37 keys, the first with its last 7 padded: the mask and
/// the same as an additive `[2, 1, 1, 37]` bias.
fn padded_keys(dev: &Device) -> (KeyMask, Tensor) {
    let valid: Vec<Vec<bool>> = [30usize, 37]
        .iter()
        .map(|&n| (0..37).map(|j| j < n).collect())
        .collect();
    let bias: Vec<f32> = valid
        .iter()
        .flatten()
        .map(|&b| if b { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let bias = Tensor::from_vec(bias, (2, 1, 1, 37), dev).unwrap();
    (KeyMask::from_valid(&valid, dev).unwrap(), bias)
}

#[test]
fn chunked_grouped_attention_equals_plain_attention() {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (2, 6, 37, 8), &dev).unwrap();
    let k = Tensor::randn(0f32, 1., (2, 2, 37, 8), &dev).unwrap();
    let v = Tensor::randn(0f32, 1., (2, 2, 37, 8), &dev).unwrap();
    let (mask, bias) = padded_keys(&dev);
    let want = reference_attention(&q, &k, &v, Some(&bias));
    // A budget of one row per chunk, an uneven chunking, and a single chunk.
    for budget in [1, 2 * 6 * 37 * 4 * 5, usize::MAX / 2] {
        let got = grouped_attention(&q, &k, &v, Some(&mask), budget).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "budget {budget}");
    }
}

/// The bf16 packed attention against plain f32 attention of the same bf16
/// inputs: within bf16 rounding (the probabilities and the output are rounded
/// to bf16), for every chunking, with the key mask.
#[test]
fn packed_bf16_attention_is_attention() {
    if !lumina2_kernels::gemm::packed::available() {
        return;
    }
    let dev = Device::Cpu;
    let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let q = bf(Tensor::randn(0f32, 1., (2, 6, 37, 40), &dev).unwrap());
    let k = bf(Tensor::randn(0f32, 1., (2, 2, 37, 40), &dev).unwrap());
    let v = bf(Tensor::randn(0f32, 1., (2, 2, 37, 40), &dev).unwrap());
    let (mask, bias) = padded_keys(&dev);
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let scale = 1.0 / (40f64).sqrt();
    let want = reference_attention(&(f(&q) * scale).unwrap(), &f(&k), &f(&v), Some(&bias));
    for budget in [1, 3 * 37 * 4 * 5, usize::MAX / 2] {
        let got = grouped_attention_packed(&q, &k, &v, Some(&mask), budget, scale as f32).unwrap();
        assert_eq!(got.dims(), want.dims());
        // Outputs are averages of N(0, 1) values, |o| < 4: two bf16 roundings
        // (probabilities, output) are below 2 * 4 * 2^-8.
        let d = max_diff(&f(&got), &want);
        assert!(d < 0.035, "budget {budget}: {d}");
    }
}

#[test]
fn patchify_round_trips() {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 2. * 3. * 4. * 6., &dev)
        .unwrap()
        .reshape((2, 3, 4, 6))
        .unwrap();
    let tokens = patchify(&x, 2).unwrap();
    assert_eq!(tokens.dims(), &[2, 6, 12]);
    // First patch of the first image: channels innermost, (dy, dx) outer.
    let first: Vec<f32> = tokens.i((0, 0)).unwrap().to_vec1().unwrap();
    assert_eq!(&first[..3], &[0., 24., 48.]);
    for b in 0..2 {
        let back = unpatchify(&tokens.i(b).unwrap(), 2, 3, 4, 6).unwrap();
        assert_eq!(max_diff(&back, &x.i(b).unwrap()), 0.0);
    }
    assert!(patchify(&x, 4).is_err());
}

#[test]
fn rope_positions_are_checked_and_zero_rows_are_zero() {
    let dev = Device::Cpu;
    let rope = RopeEmbedder::new(10000., &[2, 2, 4], &[4, 3, 3], &dev).unwrap();
    let r = rope
        .gather(&[vec![
            Position::At([0, 0, 0]),
            Position::Zero,
            Position::At([3, 2, 1]),
        ]])
        .unwrap();
    assert_eq!(r.cos.dims(), &[1, 3, 4]);
    let cos: Vec<Vec<f32>> = r.cos.i(0).unwrap().to_vec2().unwrap();
    assert_eq!(cos[0], vec![1.0; 4]);
    assert_eq!(cos[1], vec![0.0; 4]);
    assert!((cos[2][0] - 3f32.cos()).abs() < 1e-6);
    assert!(rope.gather(&[vec![Position::At([4, 0, 0])]]).is_err());
}

fn tiny_config() -> Config {
    Config {
        hidden_size: 16,
        num_attention_heads: 2,
        num_kv_heads: 1,
        num_layers: 1,
        num_refiner_layers: 1,
        multiple_of: 8,
        in_channels: 4,
        cap_feat_dim: 8,
        axes_dim_rope: vec![2, 2, 4],
        axes_lens: vec![16, 8, 8],
        ..Config::default()
    }
}

/// Random weights for every key the model asks for: a missing key is first
/// filled with a placeholder, whose shape error then tells the expected shape.
fn random_weights(cfg: &Config) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut map = HashMap::new();
    loop {
        let w = Weights::from_tensors(map.clone(), DType::F32, &dev);
        match Lumina2Transformer::new(cfg, &w) {
            Ok(_) => return map,
            Err(Error::Weight(WeightError::MissingWeight { key, .. })) => {
                map.insert(key, Tensor::zeros(1, DType::F32, &dev).unwrap());
            }
            Err(Error::Weight(WeightError::WeightShape { key, expected, .. })) => {
                map.insert(key, Tensor::randn(0f32, 0.3, expected, &dev).unwrap());
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn bad_weights_and_inputs_are_typed_errors() {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let mut map = random_weights(&cfg);
    let w = Weights::from_tensors(map.clone(), DType::F32, &dev);
    let model = Lumina2Transformer::new(&cfg, &w).unwrap();

    let x = Tensor::randn(0f32, 1., (1, 4, 4, 6), &dev).unwrap();
    let t = Tensor::new(&[0.3f32], &dev).unwrap();
    let cap = Tensor::randn(0f32, 1., (1, 5, 8), &dev).unwrap();
    let mask = Tensor::ones((1, 5), DType::I64, &dev).unwrap();
    assert_eq!(
        model.forward(&x, &t, &cap, &mask).unwrap().dims(),
        &[1, 4, 4, 6]
    );

    let odd = Tensor::randn(0f32, 1., (1, 4, 5, 6), &dev).unwrap();
    let wrong_c = Tensor::randn(0f32, 1., (1, 3, 4, 6), &dev).unwrap();
    let wrong_cap = Tensor::randn(0f32, 1., (1, 5, 7), &dev).unwrap();
    let wrong_mask = Tensor::ones((1, 4), DType::I64, &dev).unwrap();
    let long_cap = Tensor::randn(0f32, 1., (1, 17, 8), &dev).unwrap();
    let long_mask = Tensor::ones((1, 17), DType::I64, &dev).unwrap();
    for (x, cap, mask) in [
        (&odd, &cap, &mask),
        (&wrong_c, &cap, &mask),
        (&x, &wrong_cap, &mask),
        (&x, &cap, &wrong_mask),
        (&x, &long_cap, &long_mask),
    ] {
        match model.forward(x, &t, cap, mask) {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    let key = "layers.0.attn.to_k.weight".to_string();
    map.insert(
        key.clone(),
        Tensor::zeros((3, 16), DType::F32, &dev).unwrap(),
    );
    match Lumina2Transformer::new(&cfg, &Weights::from_tensors(map.clone(), DType::F32, &dev)) {
        Err(Error::Weight(WeightError::WeightShape {
            key: k,
            expected,
            found,
            ..
        })) => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![8, 16]);
            assert_eq!(found, vec![3, 16]);
        }
        other => panic!("expected WeightShape, got {:?}", other.err()),
    }
    map.remove(&key);
    match Lumina2Transformer::new(&cfg, &Weights::from_tensors(map, DType::F32, &dev)) {
        Err(Error::Weight(WeightError::MissingWeight { key: k, .. })) => assert_eq!(k, key),
        other => panic!("expected MissingWeight, got {:?}", other.err()),
    }
}

#[test]
fn weight_shapes_lists_exactly_what_the_model_loads() {
    for cfg in [
        tiny_config(),
        Config {
            out_channels: Some(6),
            patch_size: 1,
            ..tiny_config()
        },
    ] {
        let asked = random_weights(&cfg);
        let listed: HashMap<String, Vec<usize>> = lumina2_transformer::weight_shapes(&cfg)
            .into_iter()
            .collect();
        assert_eq!(listed.len(), asked.len());
        for (k, t) in &asked {
            assert_eq!(listed.get(k), Some(&t.dims().to_vec()), "{k}");
        }
    }
}
