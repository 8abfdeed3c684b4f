//! Building a [`MoeModel`] from HF-named tensors (a checkpoint directory or a seeded random
//! init), and writing one back as an HF model directory.
//!
//! Every tensor passes through [`WeightSource::take`] by its HF name and HF shape, so loading,
//! initialisation and saving share one table of names ([`Names`], used by the builder and by
//! [`hf_tensors`]). Problems are collected, not raised one at a time: a checkpoint with three
//! missing tensors and one mis-shaped tensor fails with one error listing all four.
//!
//! Loading is lazy: the safetensors files are memory-mapped and indexed by their headers, and a
//! tensor is converted to f32 only when the builder asks for it, then handed to burn and
//! dropped. Peak host memory is the f32 model plus about one tensor (the largest is a layer's
//! stacked experts), not the model twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};

use crate::ModelError;
use crate::config::{Family, MLA_NORM_EPS, MlaConfig, ModelConfig};
use crate::model::{
    Attention, DecoderLayer, Ffn, GroupLimit, LatentAttention, Mlp, MoeBlock, MoeModel, Proj,
    RmsNorm, to_vec_f32,
};

/// Where a family keeps its tensors. Everything not named here is common to all families:
/// `model.embed_tokens`, `model.layers.{i}.{input_layernorm, post_attention_layernorm}`,
/// `self_attn.{q,k,v,o}_proj`, `self_attn.{q,k}_norm`, dense `mlp.{gate,up,down}_proj`,
/// `model.norm`, `lm_head`. DeepSeek's MLA layers name their attention tensors
/// `self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}`, `self_attn.kv_a_proj_with_mqa`,
/// `self_attn.kv_a_layernorm`, `self_attn.kv_b_proj`, `self_attn.o_proj`
/// ([`MLA_TENSORS`]).
#[derive(Debug, Clone, Copy)]
struct Names {
    /// The sparse FFN of layer i is `model.layers.{i}.{moe}`: `mlp` (Qwen, OLMoE, DeepSeek) or
    /// `block_sparse_moe` (Mixtral). Its router is `{moe}.gate.weight`.
    moe: &'static str,
    /// An expert's gate, up and down projections: `gate_proj`, `up_proj`, `down_proj`, or
    /// Mixtral's `w1`, `w3`, `w2`.
    expert: [&'static str; 3],
    /// The shared expert module: Qwen2-MoE's `shared_expert` or DeepSeek's `shared_experts`.
    shared: &'static str,
    /// The router under `{moe}`: `gate` (most families) or Granite's `router.layer`.
    router: &'static str,
    /// Granite keeps all experts in two stacked tensors under `{moe}`: `input_linear`
    /// `[E, 2I, H]` (gate rows first) and `output_linear` `[E, H, I]`.
    stacked_experts: Option<[&'static str; 2]>,
}

const SWIGLU: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// The attention tensors of an MLA layer under `self_attn`: `q_proj` (no `q_lora_rank`) or
/// `q_a_proj`, `q_a_layernorm` (and `q_b_proj`); `kv_a_proj_with_mqa`, `kv_a_layernorm`,
/// `kv_b_proj`, `o_proj`.
const MLA_TENSORS: [&str; 7] = [
    "q_proj",
    "q_a_proj",
    "q_a_layernorm",
    "kv_a_proj_with_mqa",
    "kv_a_layernorm",
    "kv_b_proj",
    "o_proj",
];

impl Names {
    fn of(cfg: &ModelConfig) -> Self {
        let mixtral = cfg.family == Family::Mixtral;
        let granite = cfg.family == Family::GraniteMoe;
        Names {
            moe: if mixtral || granite {
                "block_sparse_moe"
            } else {
                "mlp"
            },
            router: if granite { "router.layer" } else { "gate" },
            stacked_experts: granite.then_some(["input_linear", "output_linear"]),
            expert: if mixtral { ["w1", "w3", "w2"] } else { SWIGLU },
            shared: if cfg.n_shared_experts > 0 {
                "shared_experts"
            } else {
                "shared_expert"
            },
        }
    }
}

/// The width of the q and k norms: one head, or OLMoE's whole projection.
fn qk_norm_widths(cfg: &ModelConfig) -> (usize, usize) {
    let d = cfg.head_dim;
    if cfg.qk_norm_over_projection() {
        (cfg.num_attention_heads * d, cfg.num_key_value_heads * d)
    } else {
        (d, d)
    }
}

/// Where the values of named tensors come from.
trait WeightSource {
    /// The values of tensor `name`, row-major in HF's shape `shape`. On a problem, records it
    /// and returns zeros so building can go on and report every problem at once.
    fn take(&mut self, name: &str, shape: &[usize], kind: Init) -> Vec<f32>;
    /// Does the source hold `name`? (For layouts that exist in two spellings.)
    fn has(&self, name: &str) -> bool;
}

/// How a tensor is initialised from scratch.
#[derive(Clone, Copy)]
enum Init {
    /// Normal(0, std).
    Normal(f64),
    Ones,
    Zeros,
}

/// A seeded random init: each tensor's values come from its own stream, seeded by the run seed
/// and the tensor's name, so adding or reordering tensors never changes the others.
struct RandomInit {
    seed: u64,
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl WeightSource for RandomInit {
    fn take(&mut self, name: &str, shape: &[usize], kind: Init) -> Vec<f32> {
        let n: usize = shape.iter().product();
        match kind {
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::Normal(std) => {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(name));
                let mut unit =
                    || ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
                let mut out = Vec::with_capacity(n);
                while out.len() < n {
                    // Box–Muller: two independent normals from two uniforms in (0, 1).
                    let (u1, u2) = (unit(), unit());
                    let r = (-2.0 * u1.ln()).sqrt();
                    let a = std::f64::consts::TAU * u2;
                    out.push((std * r * a.cos()) as f32);
                    if out.len() < n {
                        out.push((std * r * a.sin()) as f32);
                    }
                }
                out
            }
        }
    }

    fn has(&self, _name: &str) -> bool {
        false
    }
}

/// One tensor of a checkpoint: which file, where its bytes are, its dtype and shape.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file.
    bytes: std::ops::Range<usize>,
}

/// Tensors of memory-mapped safetensors files, converted to f32 one at a time on request.
pub(crate) struct FileSource {
    files: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    index: BTreeMap<String, Entry>,
    taken: BTreeSet<String>,
    problems: Vec<String>,
}

impl FileSource {
    /// Map `files` and index their headers. A file that is not safetensors is an error at once;
    /// tensor-level problems (dtype, duplicates, index disagreements) are collected.
    pub(crate) fn open(
        files: &[PathBuf],
        weight_map: Option<&BTreeMap<String, String>>,
    ) -> Result<Self, ModelError> {
        let mut src = FileSource {
            files: files.to_vec(),
            maps: Vec::with_capacity(files.len()),
            index: BTreeMap::new(),
            taken: BTreeSet::new(),
            problems: vec![],
        };
        for (fi, file) in files.iter().enumerate() {
            let f = fs::File::open(file).map_err(|e| ModelError::io(file, e))?;
            // SAFETY: the map is read-only and lives as long as this source; a checkpoint
            // modified by another process while we read it is outside what we can guard against.
            let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(file, e))?;
            let (header, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Weights {
                    file: file.clone(),
                    msg: format!(
                        "not a readable safetensors file ({e}); is it truncated or corrupt?"
                    ),
                })?;
            let data_start = 8 + header;
            let short = file_name(file);
            for (name, info) in meta.tensors() {
                if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                    src.problems.push(format!(
                        "tensor `{name}` in {short} has dtype {:?}; expected F32, BF16 or F16",
                        info.dtype
                    ));
                    src.taken.insert(name.clone());
                    continue;
                }
                let (a, b) = info.data_offsets;
                let entry = Entry {
                    file: fi,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: data_start + a..data_start + b,
                };
                if let Some(prev) = src.index.get(&name) {
                    src.problems.push(format!(
                        "tensor `{name}` is in both {} and {short}",
                        file_name(&files[prev.file])
                    ));
                    continue;
                }
                src.index.insert(name, entry);
            }
            src.maps.push(mmap);
        }
        if let Some(map) = weight_map {
            for (name, file) in map {
                match src.index.get(name) {
                    None => src.problems.push(format!(
                        "the index lists tensor `{name}` in {file}, which does not hold it"
                    )),
                    Some(e) if file_name(&files[e.file]) != *file => src.problems.push(format!(
                        "the index lists tensor `{name}` in {file}, but it is in {}",
                        file_name(&files[e.file])
                    )),
                    Some(_) => {}
                }
            }
        }
        Ok(src)
    }
}

impl FileSource {
    /// Tensor `name` in HF shape `shape` ([`WeightSource::take`]: a problem is recorded and
    /// zeros returned).
    pub(crate) fn tensor(&mut self, name: &str, shape: &[usize]) -> Vec<f32> {
        self.take(name, shape, Init::Zeros)
    }

    /// The problems recorded so far.
    pub(crate) fn take_problems(&mut self) -> Vec<String> {
        std::mem::take(&mut self.problems)
    }

    /// Tensors of the files no one asked for.
    pub(crate) fn untaken(&self) -> Vec<String> {
        self.index
            .keys()
            .filter(|n| !self.taken.contains(*n))
            .cloned()
            .collect()
    }
}

/// The module names of a sparse layer's FFN under `model.layers.{i}` and of its shared
/// expert under that: (`mlp` or `block_sparse_moe`, `shared_expert` or `shared_experts`).
pub(crate) fn ffn_module_names(cfg: &ModelConfig) -> (&'static str, &'static str) {
    let n = Names::of(cfg);
    (n.moe, n.shared)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Little-endian f32 / bf16 / f16 bytes → f32 values.
fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

impl WeightSource for FileSource {
    fn take(&mut self, name: &str, shape: &[usize], _kind: Init) -> Vec<f32> {
        let n = shape.iter().product();
        let Some(entry) = self.index.get(name) else {
            if !self.taken.contains(name) {
                self.problems.push(format!(
                    "missing tensor `{name}` (expected shape {shape:?})"
                ));
            }
            return vec![0.0; n];
        };
        self.taken.insert(name.to_string());
        if entry.shape.as_slice() != shape {
            self.problems.push(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?} (in {})",
                entry.shape,
                file_name(&self.files[entry.file])
            ));
            return vec![0.0; n];
        }
        let bytes = self.maps[entry.file]
            .get(entry.bytes.clone())
            .unwrap_or_default();
        let values = bytes_to_f32(bytes, entry.dtype);
        if values.len() != n {
            // read_metadata validated every range, so this is a corrupt header we missed.
            self.problems.push(format!(
                "tensor `{name}` holds {} values, expected {n}",
                values.len()
            ));
            return vec![0.0; n];
        }
        values
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

struct Builder<'a> {
    cfg: &'a ModelConfig,
    device: &'a Device,
    names: Names,
    std: f64,
    /// Residual-branch outputs (o_proj, down) start smaller so the residual stream's variance
    /// does not grow with depth (GPT-2's scaled init).
    residual_std: f64,
}

impl Builder<'_> {
    fn param1(
        &self,
        src: &mut dyn WeightSource,
        name: &str,
        n: usize,
        init: Init,
    ) -> Param<Tensor<1>> {
        let v = src.take(name, &[n], init);
        Param::from_tensor(Tensor::from_data(TensorData::new(v, [n]), self.device))
    }

    /// An HF linear `[out, in]` held as `[in, out]`.
    fn linear_t(
        &self,
        src: &mut dyn WeightSource,
        name: &str,
        out: usize,
        inp: usize,
        std: f64,
    ) -> Param<Tensor<2>> {
        let v = src.take(name, &[out, inp], Init::Normal(std));
        Param::from_tensor(Tensor::from_data(
            TensorData::new(transpose(&v, out, inp), [inp, out]),
            self.device,
        ))
    }

    fn proj(
        &self,
        src: &mut dyn WeightSource,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        std: f64,
    ) -> Proj {
        Proj {
            weight: self.linear_t(src, &format!("{prefix}.weight"), out, inp, std),
            bias: bias.then(|| self.param1(src, &format!("{prefix}.bias"), out, Init::Zeros)),
            lora: None,
        }
    }

    fn norm(&self, src: &mut dyn WeightSource, name: &str, n: usize) -> RmsNorm {
        self.norm_eps(src, name, n, self.cfg.rms_norm_eps)
    }

    fn norm_eps(&self, src: &mut dyn WeightSource, name: &str, n: usize, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: self.param1(src, name, n, Init::Ones),
            eps,
        }
    }

    /// DeepSeek's Multi-head Latent Attention under `prefix` (`model.layers.{i}.self_attn`):
    /// `attention_bias` puts biases on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` only, as
    /// transformers builds them.
    fn latent_attention(
        &self,
        src: &mut dyn WeightSource,
        prefix: &str,
        mla: &MlaConfig,
    ) -> Attention {
        let cfg = self.cfg;
        let (h, nh, bias) = (cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias);
        let [q, q_a, q_a_norm, kv_a, kv_a_norm, kv_b, o] = MLA_TENSORS;
        let qk = mla.qk_head_dim();
        let (q_proj, q_a_proj, q_a_layernorm) = match mla.q_lora_rank {
            None => {
                let q = self.proj(src, &format!("{prefix}.{q}"), nh * qk, h, false, self.std);
                (q, None, None)
            }
            Some(r) => {
                let a = self.proj(src, &format!("{prefix}.{q_a}"), r, h, bias, self.std);
                let name = format!("{prefix}.{q_a_norm}.weight");
                let norm = self.norm_eps(src, &name, r, MLA_NORM_EPS);
                let q_b = format!("{prefix}.q_b_proj");
                let b = self.proj(src, &q_b, nh * qk, r, false, self.std);
                (b, Some(a), Some(norm))
            }
        };
        let r = mla.kv_lora_rank;
        let kv_width = nh * (mla.qk_nope_head_dim + mla.v_head_dim);
        Attention {
            q_proj,
            k_proj: self.proj(
                src,
                &format!("{prefix}.{kv_a}"),
                mla.latent_dim(),
                h,
                bias,
                self.std,
            ),
            v_proj: self.proj(
                src,
                &format!("{prefix}.{kv_b}"),
                kv_width,
                r,
                false,
                self.std,
            ),
            o_proj: self.proj(
                src,
                &format!("{prefix}.{o}"),
                h,
                nh * mla.v_head_dim,
                bias,
                self.residual_std,
            ),
            q_norm: None,
            k_norm: None,
            qk_norm_over_projection: false,
            clip_qkv: None,
            num_heads: nh,
            num_kv_heads: nh,
            head_dim: mla.qk_rope_head_dim,
            softmax_scale: cfg.attention_scale(),
            latent: Some(LatentAttention {
                q_a_proj,
                q_a_layernorm,
                kv_a_layernorm: self.norm_eps(
                    src,
                    &format!("{prefix}.{kv_a_norm}.weight"),
                    r,
                    MLA_NORM_EPS,
                ),
                kv_lora_rank: r,
                qk_nope_head_dim: mla.qk_nope_head_dim,
                qk_rope_head_dim: mla.qk_rope_head_dim,
                v_head_dim: mla.v_head_dim,
                rope_interleave: mla.rope_interleave,
            }),
        }
    }

    /// HF gate/up/down (named `proj`) → fused `[hidden, 2·inter]` and `[inter, hidden]`.
    fn swiglu_host(
        &self,
        src: &mut dyn WeightSource,
        prefix: &str,
        proj: [&str; 3],
        inter: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let h = self.cfg.hidden_size;
        let [g, u, d] = proj;
        let gate = src.take(
            &format!("{prefix}.{g}.weight"),
            &[inter, h],
            Init::Normal(self.std),
        );
        let up = src.take(
            &format!("{prefix}.{u}.weight"),
            &[inter, h],
            Init::Normal(self.std),
        );
        let fused = fuse_gate_up(&gate, &up, inter, h);
        drop((gate, up));
        let down = src.take(
            &format!("{prefix}.{d}.weight"),
            &[h, inter],
            Init::Normal(self.residual_std),
        );
        (fused, transpose(&down, h, inter))
    }

    fn mlp(&self, src: &mut dyn WeightSource, prefix: &str, inter: usize) -> Mlp {
        let h = self.cfg.hidden_size;
        let (gu, d) = self.swiglu_host(src, prefix, SWIGLU, inter);
        Mlp {
            gate_up: Param::from_tensor(Tensor::from_data(
                TensorData::new(gu, [h, 2 * inter]),
                self.device,
            )),
            down: Param::from_tensor(Tensor::from_data(
                TensorData::new(d, [inter, h]),
                self.device,
            )),
            gate_lora: None,
            up_lora: None,
            down_lora: None,
        }
    }

    fn moe(&self, src: &mut dyn WeightSource, prefix: &str) -> MoeBlock {
        let cfg = self.cfg;
        let (h, e, inter) = (cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size);
        // Stacked experts: Granite's names, or transformers 5's in-memory layout should a
        // checkpoint carry it; both gate_up [E, 2I, H] (gate rows first), down [E, H, I].
        let stacked = match self.names.stacked_experts {
            Some([gu, d]) => Some((
                format!("{prefix}.{gu}.weight"),
                format!("{prefix}.{d}.weight"),
            )),
            None => {
                let f = format!("{prefix}.experts.gate_up_proj");
                src.has(&f)
                    .then(|| (f, format!("{prefix}.experts.down_proj")))
            }
        };
        // Gate/up first, built into a burn tensor, then down: one stacked host copy at a time.
        let experts_gate_up;
        let experts_down;
        if let Some((fused, down_name)) = stacked {
            let gu = src.take(&fused, &[e, 2 * inter, h], Init::Normal(self.std));
            let mut gu_all = Vec::with_capacity(e * h * 2 * inter);
            for ex in 0..e {
                gu_all.extend(transpose(
                    &gu[ex * 2 * inter * h..(ex + 1) * 2 * inter * h],
                    2 * inter,
                    h,
                ));
            }
            drop(gu);
            experts_gate_up = self.param3(gu_all, [e, h, 2 * inter]);
            let d = src.take(&down_name, &[e, h, inter], Init::Normal(self.residual_std));
            let mut d_all = Vec::with_capacity(e * inter * h);
            for ex in 0..e {
                d_all.extend(transpose(
                    &d[ex * h * inter..(ex + 1) * h * inter],
                    h,
                    inter,
                ));
            }
            drop(d);
            experts_down = self.param3(d_all, [e, inter, h]);
        } else {
            let (mut gu_all, mut d_all) = (
                Vec::with_capacity(e * h * 2 * inter),
                Vec::with_capacity(e * inter * h),
            );
            for ex in 0..e {
                let (gu, d) = self.swiglu_host(
                    src,
                    &format!("{prefix}.experts.{ex}"),
                    self.names.expert,
                    inter,
                );
                gu_all.extend(gu);
                d_all.extend(d);
            }
            experts_gate_up = self.param3(gu_all, [e, h, 2 * inter]);
            experts_down = self.param3(d_all, [e, inter, h]);
        }
        let shared = cfg.shared_expert_intermediate_size;
        let shared_name = format!("{prefix}.{}", self.names.shared);
        MoeBlock {
            router: self.linear_t(
                src,
                &format!("{prefix}.{}.weight", self.names.router),
                e,
                h,
                self.std,
            ),
            experts_gate_up,
            experts_down,
            shared_expert: (shared > 0).then(|| self.mlp(src, &shared_name, shared)),
            shared_expert_gate: (shared > 0 && cfg.shared_expert_gate).then(|| {
                self.linear_t(
                    src,
                    &format!("{prefix}.shared_expert_gate.weight"),
                    1,
                    h,
                    self.std,
                )
            }),
            expert_bias: cfg.aux_loss_free_bias.then(|| {
                src.take(
                    &format!("{prefix}.gate.e_score_correction_bias"),
                    &[e],
                    Init::Zeros,
                )
            }),
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            scoring: cfg.scoring_func,
            routed_scaling_factor: cfg.routed_scaling_factor,
            group_limit: GroupLimit::from_config(cfg),
        }
    }

    fn param3(&self, v: Vec<f32>, shape: [usize; 3]) -> Param<Tensor<3>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), self.device))
    }

    fn model(&self, src: &mut dyn WeightSource) -> MoeModel {
        let cfg = self.cfg;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (qn, kn) = qk_norm_widths(cfg);
        let embed = src.take(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            Init::Normal(self.std),
        );
        let embed_tokens = Param::from_tensor(Tensor::from_data(
            TensorData::new(embed, [cfg.vocab_size, h]),
            self.device,
        ));
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let bias = cfg.attention_bias;
            let self_attn = match &cfg.mla {
                Some(mla) => self.latent_attention(src, &a, mla),
                None => Attention {
                    q_proj: self.proj(src, &format!("{a}.q_proj"), nq * d, h, bias, self.std),
                    k_proj: self.proj(src, &format!("{a}.k_proj"), nkv * d, h, bias, self.std),
                    v_proj: self.proj(src, &format!("{a}.v_proj"), nkv * d, h, bias, self.std),
                    o_proj: self.proj(
                        src,
                        &format!("{a}.o_proj"),
                        h,
                        nq * d,
                        cfg.o_proj_bias,
                        self.residual_std,
                    ),
                    q_norm: cfg
                        .qk_norm
                        .then(|| self.norm(src, &format!("{a}.q_norm.weight"), qn)),
                    k_norm: cfg
                        .qk_norm
                        .then(|| self.norm(src, &format!("{a}.k_norm.weight"), kn)),
                    qk_norm_over_projection: cfg.qk_norm_over_projection(),
                    clip_qkv: cfg.clip_qkv,
                    num_heads: nq,
                    num_kv_heads: nkv,
                    head_dim: d,
                    softmax_scale: cfg.attention_scale(),
                    latent: None,
                },
            };
            let mlp = if cfg.is_sparse_layer(i) {
                Ffn::Sparse(self.moe(src, &format!("{p}.{}", self.names.moe)))
            } else {
                Ffn::Dense(self.mlp(src, &format!("{p}.mlp"), cfg.intermediate_size))
            };
            layers.push(DecoderLayer {
                input_layernorm: self.norm(src, &format!("{p}.input_layernorm.weight"), h),
                self_attn,
                post_attention_layernorm: self.norm(
                    src,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                ),
                mlp,
            });
        }
        let norm = self.norm(src, "model.norm.weight", h);
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| self.linear_t(src, "lm_head.weight", cfg.vocab_size, h, self.std));
        MoeModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config: cfg.clone(),
        }
    }
}

/// `gate [I, H]`, `up [I, H]` (HF) → `[H, 2I]` with gate in the first I columns.
fn fuse_gate_up(gate: &[f32], up: &[f32], inter: usize, h: usize) -> Vec<f32> {
    let mut out = vec![0.0; 2 * inter * h];
    for r in 0..inter {
        for c in 0..h {
            out[c * 2 * inter + r] = gate[r * h + c];
            out[c * 2 * inter + inter + r] = up[r * h + c];
        }
    }
    out
}

fn builder<'a>(cfg: &'a ModelConfig, device: &'a Device) -> Builder<'a> {
    Builder {
        cfg,
        device,
        names: Names::of(cfg),
        std: cfg.initializer_range,
        residual_std: cfg.initializer_range / (2.0 * cfg.num_hidden_layers as f64).sqrt(),
    }
}

/// A randomly initialised model: Normal(0, `initializer_range`) weights, residual output
/// projections scaled by `1/√(2·layers)`, norms at one, biases at zero. The same seed gives
/// the same weights on every machine and backend (values are drawn on the host).
pub fn init_model(cfg: &ModelConfig, seed: u64, device: &Device) -> MoeModel {
    builder(cfg, device).model(&mut RandomInit { seed })
}

/// The safetensors files of a model directory (the index's shards, or `model.safetensors`),
/// and the index's `weight_map` when there is one.
#[allow(clippy::type_complexity)]
fn weight_files(
    dir: &Path,
) -> Result<(Vec<PathBuf>, Option<BTreeMap<String, String>>), ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Weights {
                file: index.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Weights {
                file: index.clone(),
                msg: "missing object `weight_map`".into(),
            })?;
        let mut weight_map = BTreeMap::new();
        for (name, file) in map {
            let Some(file) = file.as_str() else {
                return Err(ModelError::Weights {
                    file: index,
                    msg: format!("`weight_map.{name}` must be a file name, found {file}"),
                });
            };
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(ModelError::Weights {
                    file: index,
                    msg: format!(
                        "`weight_map.{name}` = \"{file}\" is not a file in this directory"
                    ),
                });
            }
            weight_map.insert(name.clone(), file.to_string());
        }
        let files: BTreeSet<&String> = weight_map.values().collect();
        let files = files.into_iter().map(|f| dir.join(f)).collect();
        return Ok((files, Some(weight_map)));
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok((vec![single], None));
    }
    Err(ModelError::Weights {
        file: dir.to_path_buf(),
        msg: "no model.safetensors or model.safetensors.index.json in this directory".into(),
    })
}

/// Load a model directory (`config.json` + safetensors, single or sharded). A LoRA adapter
/// directory (`adapter_config.json`, no `config.json`) loads as its base model with the
/// adapters attached ([`crate::lora::load_adapted`]).
pub fn load_model(dir: &Path, device: &Device) -> Result<MoeModel, ModelError> {
    if !dir.join("config.json").exists() && crate::lora::is_adapter_dir(dir) {
        return crate::lora::load_adapted(dir, device);
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    load_model_with_config(dir, cfg, device)
}

/// Load the weights of a model directory into the shape `cfg` describes.
pub fn load_model_with_config(
    dir: &Path,
    cfg: ModelConfig,
    device: &Device,
) -> Result<MoeModel, ModelError> {
    let (files, weight_map) = weight_files(dir)?;
    let mut src = FileSource::open(&files, weight_map.as_ref())?;
    let model = builder(&cfg, device).model(&mut src);
    let mut problems = src.problems;
    for (name, entry) in src.index.iter().filter(|(n, _)| !src.taken.contains(*n)) {
        // transformers writes the rotary inverse frequencies in some old checkpoints; they are
        // a function of the config, not weights.
        if name.ends_with("rotary_emb.inv_freq") || is_mtp_tensor(&cfg, name) {
            continue;
        }
        problems.push(format!(
            "unexpected tensor `{name}` in {} (not part of this model's config)",
            file_name(&src.files[entry.file])
        ));
    }
    if problems.is_empty() {
        Ok(model)
    } else {
        Err(ModelError::Mismatch {
            dir: dir.to_path_buf(),
            problems,
        })
    }
}

/// A tensor of DeepSeek-V3's multi-token-prediction layers (`model.layers.{n}.…` for the
/// `num_nextn_predict_layers` indices `n` past the decoder's), which transformers and sobre
/// skip.
fn is_mtp_tensor(cfg: &ModelConfig, name: &str) -> bool {
    let layers = cfg.num_hidden_layers;
    name.strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i >= layers && i < layers + cfg.num_nextn_predict_layers)
}

/// Every tensor of `model` by its HF name and shape, row-major, in the layout transformers
/// reads (what [`save_model`] writes). Long because it is one flat list, a tensor per statement
/// in checkpoint order: the mirror of `Builder::model`.
pub fn hf_tensors(model: &MoeModel) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let cfg = &model.config;
    let names = Names::of(cfg);
    let h = cfg.hidden_size;
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let lin = |p: &Param<Tensor<2>>| {
        let [i, o] = p.val().dims();
        (vec![o, i], transpose(&to_vec_f32(p.val()), i, o))
    };
    let vec1 = |p: &Param<Tensor<1>>| to_vec_f32(p.val());
    // Fused `gu: [H, 2I]`, `d: [I, H]` → HF gate/up `[I, H]` and down `[H, I]`, named `proj`.
    let swiglu = |out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
                  prefix: &str,
                  proj: [&str; 3],
                  gu: &[f32],
                  d: &[f32],
                  inter: usize| {
        let [gn, un, dn] = proj;
        let mut g = Vec::with_capacity(h * inter);
        let mut u = Vec::with_capacity(h * inter);
        for row in gu.chunks_exact(2 * inter) {
            g.extend_from_slice(&row[..inter]);
            u.extend_from_slice(&row[inter..]);
        }
        out.push((
            format!("{prefix}.{gn}.weight"),
            vec![inter, h],
            transpose(&g, h, inter),
        ));
        out.push((
            format!("{prefix}.{un}.weight"),
            vec![inter, h],
            transpose(&u, h, inter),
        ));
        out.push((
            format!("{prefix}.{dn}.weight"),
            vec![h, inter],
            transpose(d, inter, h),
        ));
    };
    out.push((
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
        to_vec_f32(model.embed_tokens.val()),
    ));
    for (i, layer) in model.layers.iter().enumerate() {
        let pre = format!("model.layers.{i}");
        out.push((
            format!("{pre}.input_layernorm.weight"),
            vec![h],
            vec1(&layer.input_layernorm.weight),
        ));
        out.push((
            format!("{pre}.post_attention_layernorm.weight"),
            vec![h],
            vec1(&layer.post_attention_layernorm.weight),
        ));
        let a = &layer.self_attn;
        let mut projections = vec![
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
        ];
        if let Some(lat) = &a.latent {
            let [q, q_a, q_a_norm, kv_a, kv_a_norm, kv_b, o] = MLA_TENSORS;
            projections = vec![
                (
                    if lat.q_a_proj.is_some() {
                        "q_b_proj"
                    } else {
                        q
                    },
                    &a.q_proj,
                ),
                (kv_a, &a.k_proj),
                (kv_b, &a.v_proj),
                (o, &a.o_proj),
            ];
            if let Some(p) = &lat.q_a_proj {
                projections.push((q_a, p));
            }
            let norms = [(q_a_norm, lat.q_a_layernorm.as_ref())]
                .into_iter()
                .chain([(kv_a_norm, Some(&lat.kv_a_layernorm))]);
            for (n, norm) in norms {
                if let Some(norm) = norm {
                    let v = vec1(&norm.weight);
                    out.push((format!("{pre}.self_attn.{n}.weight"), vec![v.len()], v));
                }
            }
        }
        for (n, proj) in projections {
            let (s, v) = lin(&proj.weight);
            out.push((format!("{pre}.self_attn.{n}.weight"), s, v));
            if let Some(b) = &proj.bias {
                let v = vec1(b);
                out.push((format!("{pre}.self_attn.{n}.bias"), vec![v.len()], v));
            }
        }
        for (n, norm) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
            if let Some(norm) = norm {
                let v = vec1(&norm.weight);
                out.push((format!("{pre}.self_attn.{n}.weight"), vec![v.len()], v));
            }
        }
        match &layer.mlp {
            Ffn::Dense(m) => {
                let (gu, d) = (to_vec_f32(m.gate_up.val()), to_vec_f32(m.down.val()));
                swiglu(
                    &mut out,
                    &format!("{pre}.mlp"),
                    SWIGLU,
                    &gu,
                    &d,
                    cfg.intermediate_size,
                );
            }
            Ffn::Sparse(m) => {
                let (e, inter) = (cfg.num_experts, cfg.moe_intermediate_size);
                let moe = format!("{pre}.{}", names.moe);
                let (s, v) = lin(&m.router);
                out.push((format!("{moe}.{}.weight", names.router), s, v));
                let gu = to_vec_f32(m.experts_gate_up.val());
                let d = to_vec_f32(m.experts_down.val());
                if let Some([gu_name, d_name]) = names.stacked_experts {
                    // `[E, H, 2I]` → `[E, 2I, H]`, `[E, I, H]` → `[E, H, I]`.
                    let (mut gu_t, mut d_t) =
                        (Vec::with_capacity(gu.len()), Vec::with_capacity(d.len()));
                    for ex in 0..e {
                        let n = h * 2 * inter;
                        gu_t.extend(transpose(&gu[ex * n..(ex + 1) * n], h, 2 * inter));
                        let n = inter * h;
                        d_t.extend(transpose(&d[ex * n..(ex + 1) * n], inter, h));
                    }
                    out.push((
                        format!("{moe}.{gu_name}.weight"),
                        vec![e, 2 * inter, h],
                        gu_t,
                    ));
                    out.push((format!("{moe}.{d_name}.weight"), vec![e, h, inter], d_t));
                }
                for ex in (0..e).filter(|_| names.stacked_experts.is_none()) {
                    let gu_e = &gu[ex * h * 2 * inter..(ex + 1) * h * 2 * inter];
                    let d_e = &d[ex * inter * h..(ex + 1) * inter * h];
                    swiglu(
                        &mut out,
                        &format!("{moe}.experts.{ex}"),
                        names.expert,
                        gu_e,
                        d_e,
                        inter,
                    );
                }
                if let Some(sh) = &m.shared_expert {
                    let (gu, d) = (to_vec_f32(sh.gate_up.val()), to_vec_f32(sh.down.val()));
                    swiglu(
                        &mut out,
                        &format!("{moe}.{}", names.shared),
                        SWIGLU,
                        &gu,
                        &d,
                        cfg.shared_expert_intermediate_size,
                    );
                }
                if let Some(g) = &m.shared_expert_gate {
                    let (s, v) = lin(g);
                    out.push((format!("{moe}.shared_expert_gate.weight"), s, v));
                }
                if let Some(bias) = &m.expert_bias {
                    out.push((
                        format!("{moe}.gate.e_score_correction_bias"),
                        vec![e],
                        bias.clone(),
                    ));
                }
            }
        }
    }
    out.push((
        "model.norm.weight".into(),
        vec![h],
        vec1(&model.norm.weight),
    ));
    if let Some(head) = &model.lm_head {
        let (s, v) = lin(head);
        out.push(("lm_head.weight".into(), s, v));
    }
    out
}

/// Write `model` as an HF model directory (`config.json`, `model.safetensors` or shards above
/// `max_shard_bytes` with an index, `generation_config.json`) atomically: everything goes to a
/// temporary sibling directory that is renamed over `dir` at the end, so a crash leaves either
/// the old directory or the new one, never a mix.
pub fn save_model(
    model: &MoeModel,
    dir: &Path,
    max_shard_bytes: Option<usize>,
) -> Result<(), ModelError> {
    if model.has_adapters() {
        return Err(ModelError::Config {
            origin: dir.display().to_string(),
            msg: "the model carries LoRA adapters: save them with `lora::save_adapter`, or fold \
                  them into the weights first (`lora::merge_adapters`, `sobre merge`)"
                .into(),
        });
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    write_model_files(model, &tmp, max_shard_bytes)?;
    replace_dir(&tmp, dir)
}

/// Rename `tmp` over `dir`. An existing `dir` is first moved aside, then removed, so there is
/// no moment without a complete directory at one of the two names.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<(), ModelError> {
    if dir.exists() {
        let old = dir.with_extension("old");
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
        }
        fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
        fs::rename(tmp, dir).map_err(|e| ModelError::io(dir, e))?;
        fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
    } else {
        fs::rename(tmp, dir).map_err(|e| ModelError::io(dir, e))?;
    }
    Ok(())
}

fn write_model_files(
    model: &MoeModel,
    dir: &Path,
    max_shard_bytes: Option<usize>,
) -> Result<(), ModelError> {
    let cfg_text = serde_json::to_string_pretty(&model.config.to_json()).unwrap_or_default();
    let cfg_path = dir.join("config.json");
    fs::write(&cfg_path, cfg_text).map_err(|e| ModelError::io(&cfg_path, e))?;
    crate::GenerationConfig::from_model_config(&model.config).write(dir)?;

    let tensors = hf_tensors(model);
    let limit = max_shard_bytes.unwrap_or(usize::MAX);
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, (_, _, v)) in tensors.iter().enumerate() {
        let bytes = v.len() * 4;
        if size > 0 && size + bytes > limit {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (si, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|&i| {
                let (name, shape, v) = &tensors[i];
                (
                    name.clone(),
                    shape.clone(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, shape, b)| {
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                    .map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ModelError::Weights {
                file: dir.join(&file),
                msg: e.to_string(),
            })?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| {
            ModelError::Weights {
                file: path.clone(),
                msg: e.to_string(),
            }
        })?;
        for &i in shard {
            weight_map.insert(
                tensors[i].0.clone(),
                serde_json::Value::String(file.clone()),
            );
        }
    }
    if n > 1 {
        let total: usize = tensors.iter().map(|(_, _, v)| v.len() * 4).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        fs::write(
            &path,
            serde_json::to_string_pretty(&index).unwrap_or_default(),
        )
        .map_err(|e| ModelError::io(&path, e))?;
    }
    Ok(())
}
