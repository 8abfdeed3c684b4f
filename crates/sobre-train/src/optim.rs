//! AdamW with per-parameter decay exclusion, exact save/restore, a warmup + decay schedule,
//! and global-norm gradient clipping.
//!
//! Why not burn's `AdamW`: burn-optim 0.22.1 applies one weight decay to every parameter (no
//! exclusion of norms and biases, which HF's Trainer and nanoGPT-style recipes exclude), clips
//! gradients per tensor only, and keeps its moments in records keyed by `ParamId`s that change
//! when a model is re-loaded from safetensors — awkward to checkpoint bit-exactly. This AdamW
//! keeps its moments on the host as `f32` vectors keyed by the parameter's module path
//! (`layers.0.self_attn.q_proj.weight`), saves them as safetensors, and performs the update
//! with plain host arithmetic, so an update is the same bits on every run and after a resume.
//! The models it trains are small enough that moving weights and gradients to the host once
//! per step costs little next to the forward and backward passes.
//!
//! Update (Loshchilov & Hutter; PyTorch's `AdamW`): `p ← p − lr·wd·p` (decoupled, skipped for
//! 1-D parameters), `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr · (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)`.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Barrier, Mutex};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::Gradients;
use sobre_model::{MoeModel, RouteTotals};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::TrainError;
use crate::config::Config;
use crate::dist;
use crate::parallel::par_map;

/// The learning-rate schedule: linear warmup from 0, then constant, linear or cosine decay to
/// `min_lr_ratio · lr` at `total` steps (HF's `get_*_schedule_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: usize,
    pub total: usize,
    pub kind: ScheduleKind,
    pub min_lr_ratio: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

impl ScheduleKind {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "constant" => Some(ScheduleKind::Constant),
            "linear" => Some(ScheduleKind::Linear),
            "cosine" => Some(ScheduleKind::Cosine),
            _ => None,
        }
    }
}

impl Schedule {
    /// The SFT stage's schedule: `[sft]` lr, warmup and steps, `[optim]` shape.
    pub fn sft(cfg: &Config) -> Self {
        Schedule {
            lr: cfg.sft.lr,
            warmup: cfg.sft.warmup_steps,
            total: cfg.sft.steps,
            kind: ScheduleKind::from_name(
                cfg.sft.schedule.as_deref().unwrap_or(&cfg.optim.schedule),
            )
            .unwrap_or(ScheduleKind::Constant),
            min_lr_ratio: cfg.optim.min_lr_ratio,
        }
    }

    /// The GRPO stage's schedule over `steps` GRPO steps, counted in optimizer updates
    /// (`num_iterations` × mini-batches per step).
    pub fn grpo(cfg: &Config, steps: usize) -> Self {
        let updates_per_step = cfg.grpo.num_iterations
            * (cfg.grpo.num_prompts * cfg.grpo.group_size / cfg.mini_batch().max(1));
        Schedule {
            lr: cfg.optim.lr,
            warmup: cfg.optim.warmup_steps * updates_per_step,
            total: steps * updates_per_step,
            kind: ScheduleKind::from_name(&cfg.optim.schedule).unwrap_or(ScheduleKind::Constant),
            min_lr_ratio: cfg.optim.min_lr_ratio,
        }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = self.min_lr_ratio;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => floor + (1.0 - floor) * (1.0 - progress),
            ScheduleKind::Cosine => {
                floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        };
        self.lr * factor
    }
}

/// Hyper-parameters of [`AdamW`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// The `[optim]` section's AdamW settings.
    pub fn from_config(cfg: &Config) -> Self {
        AdamWConfig {
            beta1: cfg.optim.betas[0],
            beta2: cfg.optim.betas[1],
            eps: cfg.optim.eps,
            weight_decay: cfg.optim.weight_decay,
        }
    }
}

/// One parameter's moments.
#[derive(Debug, Clone, PartialEq)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

/// AdamW over host moments keyed by parameter path (see the module docs).
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates applied so far (t in the bias corrections).
    pub step: u64,
    state: BTreeMap<String, Moments>,
}

/// A parameter's gradient on the host.
#[derive(Debug, Clone)]
pub struct HostGrad {
    pub path: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

struct PathTracker(Vec<String>);

impl PathTracker {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
        self.0.join(".")
    }
}

struct GradCollector<'a> {
    path: PathTracker,
    grads: &'a mut Gradients,
    out: Vec<HostGrad>,
}

impl ModuleVisitor for GradCollector<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        // Removed as it is copied: the backend's gradient and the host's copy of one
        // parameter are alive at once, not of all of them (a replica's peak is one set).
        if let Some(g) = t.grad_remove(self.grads) {
            let shape = g.dims().to_vec();
            let values = g.try_into_vec_as::<f32>().unwrap_or_default();
            self.out.push(HostGrad {
                path: self.path.path(),
                shape,
                values,
            });
        }
    }
}

/// Every parameter gradient of `model` in `grads`, in module order, taken out of `grads`.
pub fn collect_grads(model: &MoeModel, grads: &mut Gradients) -> Vec<HostGrad> {
    let mut c = GradCollector {
        path: PathTracker(vec![]),
        grads,
        out: vec![],
    };
    model.visit(&mut c);
    c.out
}

/// Add `other` into `acc` (gradient accumulation), matching gradients by parameter path: a
/// batch that routes no token to an expert has no gradient for it, so two lists need not hold
/// the same parameters. Paths new to `acc` are appended in `other`'s order.
pub fn accumulate(acc: &mut Vec<HostGrad>, other: Vec<HostGrad>) {
    let index: std::collections::HashMap<String, usize> = acc
        .iter()
        .enumerate()
        .map(|(i, g)| (g.path.clone(), i))
        .collect();
    for g in other {
        match index.get(&g.path) {
            Some(&i) => {
                for (x, y) in acc[i].values.iter_mut().zip(g.values) {
                    *x += y;
                }
            }
            None => acc.push(g),
        }
    }
}

/// √Σg² over every gradient (f64 accumulation).
pub fn global_norm(grads: &[HostGrad]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.values.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// The factor that brings the norm down to `max_norm` (1 when it is within, or clipping off),
/// as `torch.nn.utils.clip_grad_norm_`: `max_norm / (norm + 1e-6)`, capped at 1.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        1.0
    } else {
        (max_norm / (norm + 1e-6)).min(1.0)
    }
}

struct Updater<'a> {
    path: PathTracker,
    opt: &'a mut AdamW,
    grads: BTreeMap<String, Vec<f32>>,
    lr: f64,
    scale: f32,
}

impl ModuleMapper for Updater<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.path();
        let Some(grad) = self.grads.remove(&path) else {
            return param;
        };
        let (lr, scale) = (self.lr, self.scale);
        let opt = &mut *self.opt;
        param.map(|tensor| {
            let device = tensor.device();
            let shape = tensor.dims();
            let require_grad = tensor.is_require_grad();
            let mut values = tensor.try_into_vec_as::<f32>().unwrap_or_default();
            opt.update(&path, &mut values, &grad, scale, lr, D < 2);
            let t = Tensor::<D>::from_data(TensorData::new(values, shape), &device);
            if require_grad { t.require_grad() } else { t }
        })
    }
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// One AdamW update of one parameter. `scale` multiplies the gradient (clipping);
    /// `no_decay` skips weight decay (norms, biases).
    pub fn update(
        &mut self,
        path: &str,
        p: &mut [f32],
        g: &[f32],
        scale: f32,
        lr: f64,
        no_decay: bool,
    ) {
        let c = self.config;
        let t = (self.step + 1) as i32;
        let st = self
            .state
            .entry(path.to_string())
            .or_insert_with(|| Moments {
                m: vec![0.0; p.len()],
                v: vec![0.0; p.len()],
            });
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = if no_decay {
            1.0
        } else {
            1.0 - (lr * c.weight_decay) as f32
        };
        let k = AdamWStep {
            scale,
            b1,
            b2,
            bc2_sqrt,
            step_size,
            decay,
            eps: c.eps as f32,
        };
        // Sizes were checked when the moments were loaded (`load_for`); a mismatch here is
        // a bug in the caller.
        assert!(
            g.len() == p.len() && st.m.len() == p.len() && st.v.len() == p.len(),
            "AdamW: `{path}` has {} elements, its gradient {} and its moments {}",
            p.len(),
            g.len(),
            st.m.len()
        );
        adamw_kernel(p, g, &mut st.m, &mut st.v, &k);
    }

    /// Apply one update to every parameter with a gradient. `scale` is the clip coefficient.
    pub fn step(&mut self, model: MoeModel, grads: Vec<HostGrad>, lr: f64, scale: f64) -> MoeModel {
        let grads = grads.into_iter().map(|g| (g.path, g.values)).collect();
        let mut u = Updater {
            path: PathTracker(vec![]),
            opt: self,
            grads,
            lr,
            scale: scale as f32,
        };
        let model = model.map(&mut u);
        self.step += 1;
        model
    }

    /// Save the moments and step count as safetensors (`<path>.m` / `<path>.v` tensors and a
    /// `step` entry in the metadata).
    pub fn save(&self, file: &Path) -> Result<(), TrainError> {
        let mut bytes: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (name, st) in &self.state {
            for (suffix, v) in [("m", &st.m), ("v", &st.v)] {
                bytes.push((
                    format!("{name}.{suffix}"),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    v.len(),
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, b, len)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| TrainError::Checkpoint(format!("optimizer state: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        // One metadata entry only: a HashMap of several would serialise in random order.
        safetensors::serialize_to_file(views, Some(meta), file)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", file.display())))
    }

    /// Load what [`AdamW::save`] wrote.
    pub fn load(config: AdamWConfig, file: &Path) -> Result<Self, TrainError> {
        let data = std::fs::read(file).map_err(|e| TrainError::io(file, e))?;
        let bad = |m: String| TrainError::Checkpoint(format!("{}: {m}", file.display()));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&data).map_err(|e| bad(e.to_string()))?;
        let step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("missing `step` metadata".into()))?;
        let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| bad(e.to_string()))?;
        let mut state: BTreeMap<String, Moments> = BTreeMap::new();
        for (name, view) in st.tensors() {
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let (param, which) = name
                .rsplit_once('.')
                .ok_or_else(|| bad(format!("unexpected tensor {name}")))?;
            let e = state.entry(param.to_string()).or_insert_with(|| Moments {
                m: vec![],
                v: vec![],
            });
            match which {
                "m" => e.m = values,
                "v" => e.v = values,
                _ => return Err(bad(format!("unexpected tensor {name}"))),
            }
        }
        if let Some((name, _)) = state.iter().find(|(_, st)| st.m.len() != st.v.len()) {
            return Err(bad(format!(
                "`{name}.m` and `{name}.v` differ in length (or one is missing)"
            )));
        }
        Ok(AdamW {
            config,
            step,
            state,
        })
    }

    /// [`AdamW::load`] for resuming the training of `model`: the moments are then checked
    /// against its parameters ([`AdamW::check_against`]).
    pub fn load_for(
        config: AdamWConfig,
        file: &Path,
        model: &MoeModel,
    ) -> Result<Self, TrainError> {
        let opt = Self::load(config, file)?;
        opt.check_against(model, file)?;
        Ok(opt)
    }

    /// Checks loaded moments against the parameters of `model`, the one they will update: each
    /// must belong to a parameter and hold one value per element. A state saved for another
    /// model would otherwise update the wrong number of elements. `file` names the source in
    /// the error.
    fn check_against(&self, model: &MoeModel, file: &Path) -> Result<(), TrainError> {
        struct Sizes(PathTracker, BTreeMap<String, usize>);
        impl ModuleVisitor for Sizes {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.0.enter(name);
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.0.exit();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let n = param.val().shape().num_elements();
                self.1.insert(self.0.path(), n);
            }
        }
        let mut sizes = Sizes(PathTracker(vec![]), BTreeMap::new());
        model.visit(&mut sizes);
        for (name, st) in &self.state {
            let msg = match sizes.1.get(name) {
                None => format!("moments for `{name}`, which the model does not have"),
                Some(&n) if n != st.m.len() => format!(
                    "`{name}` has {n} elements but its moments {} (saved for another model?)",
                    st.m.len()
                ),
                Some(_) => continue,
            };
            return Err(TrainError::Checkpoint(format!("{}: {msg}", file.display())));
        }
        Ok(())
    }
}

/// The per-step constants of an AdamW update ([`AdamW::update`]).
struct AdamWStep {
    scale: f32,
    b1: f32,
    b2: f32,
    bc2_sqrt: f32,
    step_size: f32,
    decay: f32,
    eps: f32,
}

/// AdamW on one parameter's elements. Zipped slices (no bounds checks) so that the loop
/// vectorises, and compiled for AVX2 as well as baseline x86-64 (`multiversion`): the
/// square root and the divisions dominate, and AVX2 does eight at once. IEEE `sqrt` and `/`
/// are correctly rounded in every instruction set and nothing is fused, so every clone
/// computes the same bits.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn adamw_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamWStep) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let gi = g * k.scale;
        *m = k.b1 * *m + (1.0 - k.b1) * gi;
        *v = k.b2 * *v + (1.0 - k.b2) * gi * gi;
        let denom = v.sqrt() / k.bc2_sqrt + k.eps;
        *p = *p * k.decay - k.step_size * *m / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_by_hand() {
        let s = |kind| Schedule {
            lr: 1.0,
            warmup: 2,
            total: 6,
            kind,
            min_lr_ratio: 0.0,
        };
        // warmup: steps 0, 1 → 0.5, 1.0
        assert_eq!(s(ScheduleKind::Cosine).lr_at(0), 0.5);
        assert_eq!(s(ScheduleKind::Cosine).lr_at(1), 1.0);
        // after warmup, progress = (step − 2) / 4
        assert_eq!(s(ScheduleKind::Constant).lr_at(5), 1.0);
        assert!((s(ScheduleKind::Linear).lr_at(3) - 0.75).abs() < 1e-12);
        // cosine at progress 0.5: 0.5·(1 + cos(π/2)) = 0.5
        assert!((s(ScheduleKind::Cosine).lr_at(4) - 0.5).abs() < 1e-12);
        assert!((s(ScheduleKind::Cosine).lr_at(3) - 0.853_553_390_6).abs() < 1e-9);
        let floor = Schedule {
            min_lr_ratio: 0.1,
            ..s(ScheduleKind::Linear)
        };
        assert!((floor.lr_at(6) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn sft_schedule_defaults_to_optim_schedule_and_can_differ() {
        let toml = "[data]\ntask = \"countdown\"\n[sft]\nsteps = 10\nlr = 1.0\n[optim]\nschedule = \"constant\"\n";
        let (cfg, _) = Config::parse(toml, "t.toml", &[]).unwrap();
        assert_eq!(Schedule::sft(&cfg).lr_at(9), 1.0);
        let (cfg, _) = Config::parse(toml, "t.toml", &["sft.schedule=\"cosine\"".into()]).unwrap();
        // cosine at progress 9/10: 0.5·(1 + cos(0.9π))
        let want = 0.5 * (1.0 + (0.9 * std::f64::consts::PI).cos());
        assert!((Schedule::sft(&cfg).lr_at(9) - want).abs() < 1e-12);
        assert_eq!(Schedule::grpo(&cfg, 10).lr_at(9), cfg.optim.lr);
        let err = Config::parse(toml, "t.toml", &["sft.schedule=\"cosin\"".into()]).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("sft.schedule"));
    }

    #[test]
    fn adamw_first_steps_by_hand() {
        // lr 0.1, β = (0.9, 0.999), eps 1e-8, wd 0.1; p = 1, g = 0.5.
        // t=1: decay p = 1·(1 − 0.01) = 0.99; m = 0.05, v = 0.00025; m̂ = 0.5, v̂ = 0.25;
        //      p = 0.99 − 0.1·0.5/(0.5 + 1e-8) = 0.89.
        let mut o = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        });
        let mut p = [1.0f32];
        o.update("w", &mut p, &[0.5], 1.0, 0.1, false);
        assert!((p[0] - 0.89).abs() < 1e-6, "{}", p[0]);
        // no-decay parameter: 1 − 0.1 = 0.9.
        let mut q = [1.0f32];
        o.update("b", &mut q, &[0.5], 1.0, 0.1, true);
        assert!((q[0] - 0.9).abs() < 1e-6, "{}", q[0]);
        // t=2 (step counter advanced by `step`, here by hand): g = 0.5 again → m̂ = 0.5, v̂ = 0.25
        o.step = 1;
        o.update("b", &mut q, &[0.5], 1.0, 0.1, true);
        assert!((q[0] - 0.8).abs() < 1e-5, "{}", q[0]);
    }

    #[test]
    fn clipping_by_hand() {
        let g = vec![HostGrad {
            path: "a".into(),
            shape: vec![2],
            values: vec![3.0, 4.0],
        }];
        assert_eq!(global_norm(&g), 5.0);
        assert!((clip_coefficient(5.0, 1.0) - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert_eq!(clip_coefficient(5.0, 0.0), 1.0);
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut o = AdamW::new(cfg);
        let mut p = [1.0f32, 2.0];
        o.update("x.w", &mut p, &[0.1, -0.2], 1.0, 0.01, false);
        o.step = 1;
        let f = dir.path().join("optimizer.safetensors");
        o.save(&f).unwrap();
        let back = AdamW::load(cfg, &f).unwrap();
        assert_eq!(back.step, 1);
        assert_eq!(back.state, o.state);
    }

    #[test]
    fn moments_of_another_model_are_refused() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let model = sobre_model::init_model(
            &sobre_model::ModelConfig::preset("tiny").unwrap(),
            0,
            &sobre_model::default_device(),
        );
        let file = Path::new("run/optimizer.safetensors");
        let mut o = AdamW::new(cfg);
        let mut norm = vec![1.0f32; 32];
        o.update("norm.weight", &mut norm, &[0.1; 32], 1.0, 0.01, true);
        o.check_against(&model, file).unwrap();
        let mut o = AdamW::new(cfg);
        let mut short = vec![1.0f32; 31];
        o.update("norm.weight", &mut short, &[0.1; 31], 1.0, 0.01, true);
        let err = o.check_against(&model, file).unwrap_err().to_string();
        assert!(
            err.contains("run/optimizer.safetensors")
                && err.contains("`norm.weight` has 32 elements but its moments 31"),
            "{err}"
        );
        let mut o = AdamW::new(cfg);
        o.update("layers.9.w", &mut [1.0], &[0.1], 1.0, 0.01, false);
        let err = o.check_against(&model, file).unwrap_err().to_string();
        assert!(
            err.contains("`layers.9.w`, which the model does not have"),
            "{err}"
        );
        // A file whose `v` is shorter than its `m` is refused at load.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("optimizer.safetensors");
        let mut o = AdamW::new(cfg);
        o.update("norm.weight", &mut [1.0, 2.0], &[0.1, 0.2], 1.0, 0.01, true);
        if let Some(st) = o.state.get_mut("norm.weight") {
            st.v.pop();
        }
        o.save(&f).unwrap();
        let err = AdamW::load(cfg, &f).unwrap_err().to_string();
        assert!(
            err.contains("`norm.weight.m` and `norm.weight.v` differ in length"),
            "{err}"
        );
        // Resuming (`load_for`) loads, then checks against the model.
        let mut o = AdamW::new(cfg);
        o.update("norm.weight", &mut [1.0; 31], &[0.1; 31], 1.0, 0.01, true);
        o.save(&f).unwrap();
        let err = AdamW::load_for(cfg, &f, &model).unwrap_err().to_string();
        assert!(
            err.contains("`norm.weight` has 32 elements but its moments 31"),
            "{err}"
        );
        let mut o = AdamW::new(cfg);
        o.update("norm.weight", &mut [1.0; 32], &[0.1; 32], 1.0, 0.01, true);
        o.save(&f).unwrap();
        assert_eq!(AdamW::load_for(cfg, &f, &model).unwrap().state, o.state);
    }
}

/// What one optimizer update did.
#[derive(Debug, Clone, Copy)]
pub struct UpdateOutcome {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was skipped: the loss or a gradient was not finite.
    pub skipped: bool,
}

/// The loss's value and, when it is finite, the gradients of `model`'s parameters on the host.
fn host_gradients(model: &MoeModel, loss: Tensor<1>) -> (f64, Option<Vec<HostGrad>>) {
    let value = loss
        .clone()
        .try_into_vec_as::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN) as f64;
    if !value.is_finite() {
        return (value, None);
    }
    let mut grads = loss.backward();
    (value, Some(collect_grads(model, &mut grads)))
}

/// Clip `grads` by global norm and apply AdamW at `lr`; `None` (a non-finite loss) or a
/// non-finite norm leaves the weights and moments untouched and reports the update skipped.
pub fn apply_gradients(
    model: MoeModel,
    grads: Option<Vec<HostGrad>>,
    opt: &mut AdamW,
    lr: f64,
    max_grad_norm: f64,
) -> (MoeModel, UpdateOutcome) {
    let Some(host) = grads else {
        return (
            model,
            UpdateOutcome {
                grad_norm: f64::NAN,
                skipped: true,
            },
        );
    };
    let norm = global_norm(&host);
    if !norm.is_finite() {
        return (
            model,
            UpdateOutcome {
                grad_norm: norm,
                skipped: true,
            },
        );
    }
    let scale = clip_coefficient(norm, max_grad_norm);
    let model = opt.step(model, host, lr, scale);
    (
        model,
        UpdateOutcome {
            grad_norm: norm,
            skipped: false,
        },
    )
}

/// Data-parallel gradients of a batch cut into `shards`, each on its own thread with its own
/// replica of the parameters (a separate autodiff graph: burn merges the graphs of ops that
/// share a leaf, which would serialise the threads).
///
/// On each replica `forward(model_i, i)` runs shard `i`'s forward and returns what `finish`
/// needs plus the shard's routing totals (when a balance loss is on); with `exchange_totals`
/// the replicas wait for each other and sum their totals; then `finish(state, batch_totals)`
/// builds the shard's loss, weighted so that the shards' losses sum to the batch's
/// (`AuxParts::loss_in` with the batch's totals does that for the balance loss). A shard may
/// have no loss (nothing to score) and adds nothing. Without `exchange_totals` (no balance
/// loss) each replica goes on to its backward as soon as its own forward is done, and
/// `finish` gets `None`: a replica that finished its forward early would otherwise idle at the
/// exchange while the other catches up (the two cores of a small machine drift apart by tens of
/// milliseconds per forward).
///
/// Returns the sum of the shard losses; the sum of their gradients, added in shard order (so
/// the result depends on `shards`, not on the machine), or `None` when a shard's loss is not
/// finite; and each shard's side output. One shard runs on the calling thread, unreplicated.
///
/// With several ranks ([`crate::dist`]) `shards` counts the shards of all of them: this rank
/// runs its block ([`dist::local_shards`]), the totals, losses and gradients are summed over the
/// ranks and the side outputs gathered, so every rank returns what one process running every
/// shard would.
pub fn sharded_gradients<S, R: Send + Serialize + DeserializeOwned>(
    model: &MoeModel,
    shards: usize,
    exchange_totals: bool,
    forward: impl Fn(&MoeModel, usize) -> (S, Option<RouteTotals>) + Sync,
    finish: impl Fn(S, Option<&RouteTotals>) -> (Option<Tensor<1>>, R) + Sync,
) -> (f64, Option<Vec<HostGrad>>, Vec<R>) {
    let ids: Vec<usize> = dist::local_shards(shards.max(1)).collect();
    let n = ids.len();
    // Each local shard's totals (`Err` if its forward panicked), filled before the barrier;
    // then the totals of every shard of every rank, set by the first local shard.
    type Slot = Option<Result<Option<RouteTotals>, ()>>;
    let slots: Mutex<Vec<Slot>> = Mutex::new(vec![None; n]);
    let batch_totals: Mutex<Option<RouteTotals>> = Mutex::new(None);
    let (barrier, published) = (Barrier::new(n.max(1)), Barrier::new(n.max(1)));
    if n == 0 && exchange_totals {
        // No shard here, but the peers' exchange needs this rank's (empty) share.
        exchange_route_totals(None);
    }
    let positions: Vec<usize> = (0..n).collect();
    let results = par_map(&positions, |&p| {
        let i = ids[p];
        let replica;
        let m = if n > 1 {
            replica = model.clone().fork(&model.device());
            &replica
        } else {
            model
        };
        let (state, batch) = if exchange_totals {
            // Every replica must reach the barrier, or the others wait forever.
            let ran = std::panic::catch_unwind(AssertUnwindSafe(|| forward(m, i)));
            let totals = ran.as_ref().map(|(_, t)| t.clone()).map_err(|_| ());
            lock(&slots)[p] = Some(totals);
            barrier.wait();
            if p == 0 {
                let mut local: Option<RouteTotals> = None;
                let mut failed = false;
                for slot in lock(&slots).iter() {
                    match slot {
                        Some(Ok(Some(t))) => local.get_or_insert_with(RouteTotals::default).add(t),
                        Some(Ok(None)) => {}
                        _ => failed = true,
                    }
                }
                if failed && dist::world().size() > 1 {
                    // The peers are waiting in the exchange: end the job, not just this rank.
                    dist::fail("a data-parallel replica failed in its forward pass");
                }
                *lock(&batch_totals) = exchange_route_totals(local);
            }
            published.wait();
            let (state, _) = ran.unwrap_or_else(|e| std::panic::resume_unwind(e));
            if lock(&slots).iter().any(|s| !matches!(s, Some(Ok(_)))) {
                panic!("another data-parallel replica failed in its forward pass");
            }
            (state, lock(&batch_totals).clone())
        } else {
            let (state, totals) = forward(m, i);
            debug_assert!(
                totals.is_none(),
                "routing totals returned without exchange_totals: the balance loss would be lost"
            );
            (state, None)
        };
        let (loss, out) = finish(state, batch.as_ref());
        let (value, grads) = match loss {
            Some(loss) => host_gradients(m, loss),
            None => (0.0, Some(vec![])),
        };
        (value, grads, out)
    });
    let mut loss = 0.0;
    let mut sum: Option<Vec<HostGrad>> = Some(vec![]);
    let mut outs = Vec::with_capacity(results.len());
    for (value, grads, out) in results {
        loss += value;
        sum = match (sum, grads) {
            (Some(mut acc), Some(g)) => {
                accumulate(&mut acc, g);
                Some(acc)
            }
            _ => None,
        };
        outs.push(out);
    }
    let loss = dist::sum(loss);
    let sum = dist::reduce_grads(sum);
    (loss, sum, dist::all_gather_concat(outs))
}

/// The router totals of every rank's shards, added in rank order (`local`: this rank's).
fn exchange_route_totals(local: Option<RouteTotals>) -> Option<RouteTotals> {
    if dist::world().size() == 1 {
        return local;
    }
    let mine = local.map(|t| (t.tokens_per_expert, t.rows));
    let mut out: Option<RouteTotals> = None;
    for (tokens_per_expert, rows) in dist::all_gather_concat(vec![mine]).into_iter().flatten() {
        let t = RouteTotals {
            tokens_per_expert,
            rows,
        };
        out.get_or_insert_with(RouteTotals::default).add(&t);
    }
    out
}

/// The guard of `m`, also after another thread panicked holding it (the data is still whole:
/// each thread writes only its own slot).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
