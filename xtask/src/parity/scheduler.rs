//! `scheduler` cases: diffusers' `FlowMatchEulerDiscreteScheduler` as
//! Lumina2Pipeline drives it (set_timesteps, begin index 0, one step per timestep).

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use lumina2_scheduler::{FlowMatchEulerDiscreteScheduler, TimestepRequest};

use super::Prepared;
use super::{input, Case};

struct SchedulerCase {
    scheduler: FlowMatchEulerDiscreteScheduler,
    request: TimestepRequest,
    sample: Tensor,
    model_outputs: Tensor,
}

/// The case's `args` as a `set_timesteps` request.
fn request(args: &serde_json::Map<String, serde_json::Value>) -> Result<TimestepRequest> {
    let n = args
        .get("num_inference_steps")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| anyhow!("args.num_inference_steps must be a non-negative integer"))?;
    let sigmas = match args.get("sigmas") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_array()
                .ok_or_else(|| anyhow!("args.sigmas must be a list"))?
                .iter()
                .map(|x| {
                    x.as_f64()
                        .ok_or_else(|| anyhow!("args.sigmas: {x} is not a number"))
                })
                .collect::<Result<Vec<f64>>>()?,
        ),
    };
    let mu = match args.get("mu") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| anyhow!("args.mu must be a number"))?,
        ),
    };
    Ok(TimestepRequest {
        num_inference_steps: Some(usize::try_from(n)?),
        sigmas,
        timesteps: None,
        mu,
    })
}

pub fn prepare(case: &Case) -> Result<Box<dyn Prepared>> {
    let model = case.model()?;
    let scheduler = FlowMatchEulerDiscreteScheduler::from_config_file(model)
        .with_context(|| format!("loading {}", model.display()))?;
    let request = request(&case.args)?;
    let inputs = case.inputs()?;
    let dev = Device::Cpu;
    let sample = input(&inputs, "sample")?
        .to_device(&dev)?
        .to_dtype(case.dtype)?;
    let model_outputs = input(&inputs, "model_outputs")?
        .to_device(&dev)?
        .to_dtype(case.dtype)?;
    Ok(Box::new(SchedulerCase {
        scheduler,
        request,
        sample,
        model_outputs,
    }))
}

impl Prepared for SchedulerCase {
    fn run(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let s = &mut self.scheduler;
        s.set_timesteps(&self.request)?;
        s.set_begin_index(0);
        let timesteps = s.timesteps().to_vec();
        let n = timesteps.len();
        if self.model_outputs.dim(0)? != n {
            bail!(
                "model_outputs has {} steps, the schedule {n}",
                self.model_outputs.dim(0)?
            );
        }
        let mut latents = self.sample.clone();
        for (i, &t) in timesteps.iter().enumerate() {
            let v = self.model_outputs.get(i)?;
            latents = s.step(&v, t, &latents, None)?;
        }
        let dev = Device::Cpu;
        let sigmas = s.sigmas().to_vec();
        let ns = sigmas.len();
        Ok(BTreeMap::from([
            (
                "timesteps".to_string(),
                Tensor::from_vec(timesteps, n, &dev)?,
            ),
            ("sigmas".to_string(), Tensor::from_vec(sigmas, ns, &dev)?),
            ("final_sample".to_string(), latents),
        ]))
    }
}
