//! `ModelConfig`: the model's shape and options, read from and written to an HF `config.json`.
//!
//! The keys are those transformers writes for `qwen3_moe`, `qwen2_moe`, `mixtral` and `olmoe`
//! (4.x and 5.x spellings both read); sobre's own options, DeepSeek's routing options among them,
//! are extra keys that round-trip through the same file. `deepseek_v2` / `deepseek_v3` configs
//! are read with their Multi-head Latent Attention ([`MlaConfig`]) and their own routing, with
//! the defaults of transformers' `DeepseekV2Config` / `DeepseekV3Config` where a key is absent.
//! Every key that changes the maths is honoured or refused: a value sobre cannot compute
//! exactly (a rope scaling type, sliding-window attention, another activation) is an error that
//! names the key and the value. Keys that carry no maths for sobre (`architectures`, `use_cache`,
//! token ids, …) are read and kept; keys sobre has never heard of are kept in `unknown_keys` so
//! the caller can warn about them.

use serde_json::{Map, Value, json};

use crate::ModelError;
pub use crate::rope::{RopeFrequencies, RopeScaling, Yarn};

/// Which model family a config describes. It decides the defaults of keys that the family's
/// transformers class hard-codes (Qwen2-MoE: q/k/v bias on; Qwen3-MoE: per-head q/k RMSNorm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `model_type = "qwen3_moe"`.
    Qwen3Moe,
    /// `model_type = "qwen2_moe"`.
    Qwen2Moe,
    /// `model_type = "mixtral"`: `block_sparse_moe` with `w1`/`w3`/`w2` experts, every layer
    /// sparse, top-k weights always renormalised.
    Mixtral,
    /// `model_type = "olmoe"`: q/k RMSNorm over the whole projection, optional `clip_qkv`.
    Olmoe,
    /// `model_type = "granitemoe"`: IBM's Granite MoE — every layer sparse, the experts fused
    /// in `block_sparse_moe.input_linear` / `output_linear`, the router in
    /// `block_sparse_moe.router.layer`, and the four multipliers (embedding, attention,
    /// residual, logits).
    GraniteMoe,
    /// `model_type = "qwen2"`: dense, q/k/v biases (no key: the class hard-codes them).
    Qwen2,
    /// `model_type = "qwen3"`: dense, per-head q/k RMSNorm, `attention_bias` on q/k/v/o.
    Qwen3,
    /// `model_type = "llama"`: dense, `attention_bias` on q/k/v/o.
    Llama,
    /// `model_type = "mistral"`: dense, no biases, a `sliding_window` that must not bind.
    Mistral,
    /// `model_type = "deepseek_v2"`: Multi-head Latent Attention with the RoPE pairs interleaved
    /// (transformers applies it in complex form), softmax routing (`greedy` or
    /// `group_limited_greedy`, never renormalised), DeepSeek's shared experts, the first
    /// `first_k_dense_replace` layers dense.
    DeepseekV2,
    /// `model_type = "deepseek_v3"`: MLA (`rope_interleave` chooses the RoPE layout), sigmoid
    /// routing with `e_score_correction_bias` and `noaux_tc` group selection.
    DeepseekV3,
}

/// The `model_type` values sobre reads, for error messages.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "granitemoe",
    "qwen2",
    "qwen3",
    "llama",
    "mistral",
    "deepseek_v2",
    "deepseek_v3",
];

impl Family {
    /// The `model_type` string transformers uses.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "qwen3_moe",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Mixtral => "mixtral",
            Family::Olmoe => "olmoe",
            Family::GraniteMoe => "granitemoe",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
        }
    }

    fn architecture(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
            Family::GraniteMoe => "GraniteMoeForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::DeepseekV2 => "DeepseekV2ForCausalLM",
            Family::DeepseekV3 => "DeepseekV3ForCausalLM",
        }
    }

    /// Dense families: every layer a SwiGLU MLP, no experts.
    pub fn is_dense(self) -> bool {
        matches!(
            self,
            Family::Qwen2 | Family::Qwen3 | Family::Llama | Family::Mistral
        )
    }

    /// Families whose experts are as wide as `intermediate_size` and whose every layer is sparse
    /// (their transformers classes have no dense FFN and no `moe_intermediate_size`).
    pub fn all_layers_sparse(self) -> bool {
        matches!(self, Family::Mixtral | Family::Olmoe | Family::GraniteMoe)
    }

    /// DeepSeek's families: Multi-head Latent Attention in every layer.
    pub fn is_deepseek(self) -> bool {
        matches!(self, Family::DeepseekV2 | Family::DeepseekV3)
    }
}

/// The epsilon of MLA's two inner RMSNorms (`q_a_layernorm`, `kv_a_layernorm`): transformers'
/// DeepSeek classes (and DeepSeek's own code) build them with the RMSNorm's default `1e-6`, not
/// `rms_norm_eps`.
pub const MLA_NORM_EPS: f64 = 1e-6;

/// DeepSeek's Multi-head Latent Attention (`deepseek_v2`, `deepseek_v3`): the shape of its
/// projections, as `modeling_deepseek_v2.py` / `modeling_deepseek_v3.py` build them.
///
/// Per token: the query is `q_proj(x)` or, with a `q_lora_rank`,
/// `q_b_proj(q_a_layernorm(q_a_proj(x)))`, `[heads, qk_nope_head_dim + qk_rope_head_dim]`, its
/// last `qk_rope_head_dim` columns rotated. `kv_a_proj_with_mqa(x)` gives the latent
/// `[kv_lora_rank]` (then `kv_a_layernorm`) and one rotated key `k_pe` `[qk_rope_head_dim]`
/// shared by every head; `kv_b_proj` expands the latent into each head's `k_nope` and value
/// `[qk_nope_head_dim + v_head_dim]`. Keys are `[k_nope, k_pe]`, the softmax scale
/// `qk_head_dim^-0.5` (times `mscale²` under YaRN, [`ModelConfig::attention_scale`]), and
/// `o_proj` maps `[heads · v_head_dim]` back. RoPE runs over `qk_rope_head_dim` dimensions
/// (`ModelConfig::head_dim` is set to it, as transformers' config does).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// `None` (`null`): one `q_proj`; `Some(r)`: `q_a_proj` `[r, hidden]`, `q_a_layernorm`,
    /// `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// The rotary dimensions come in interleaved pairs `(x0, x1), (x2, x3), …`, each rotated by
    /// one frequency: always for DeepSeek-V2 (transformers rotates them as complex numbers),
    /// `rope_interleave` for DeepSeek-V3 (default true). Otherwise rotate-half pairs `(x_i,
    /// x_{i+d/2})`.
    pub rope_interleave: bool,
}

impl MlaConfig {
    /// `qk_nope_head_dim + qk_rope_head_dim`: the width of a query and of a key.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// `kv_lora_rank + qk_rope_head_dim`: what the compressed cache holds per token and layer
    /// (the normalised latent and the rotated `k_pe`).
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// How the experts of a token are chosen from the scores (DeepSeek's `topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Top-k over all experts.
    Greedy,
    /// DeepSeek-V2: experts are split into `n_group` groups, a group scores its best expert, the
    /// best `topk_group` groups are kept, then top-k within them.
    GroupLimitedGreedy,
    /// DeepSeek-V3: the same with the bias-corrected scores (`e_score_correction_bias`) and a
    /// group scoring the sum of its two best experts.
    NoauxTc,
}

impl TopkMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            TopkMethod::Greedy => "greedy",
            TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            TopkMethod::NoauxTc => "noaux_tc",
        }
    }
}

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    /// Softmax over all experts (Qwen, Mixtral, Switch).
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// The full description of a model. Field names follow transformers' config keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense SwiGLU layers (layers that are not sparse).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The RoPE variant (`rope_scaling` / `rope_parameters`): default, linear, llama3, yarn.
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (and on o for Qwen3-MoE's `attention_bias`).
    pub attention_bias: bool,
    /// Bias on the output projection (Qwen3-MoE `attention_bias` puts one there too; Qwen2 never).
    pub o_proj_bias: bool,
    /// RMSNorm on q and k before RoPE: per head over `head_dim` (Qwen3), or over the whole
    /// projection for OLMoE (see [`ModelConfig::qk_norm_over_projection`]).
    pub qk_norm: bool,
    /// OLMoE's `clip_qkv`: q, k and v are clamped to `[-c, c]` after their projection (and
    /// OLMoE's q/k norm). `None` = no clamp.
    pub clip_qkv: Option<f64>,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub norm_topk_prob: bool,
    pub router_aux_loss_coef: f64,
    /// Width of the shared expert (0 = none).
    pub shared_expert_intermediate_size: usize,
    /// DeepSeek's `n_shared_experts`. Non-zero selects DeepSeek's arrangement: the shared experts
    /// are one SwiGLU `n_shared_experts · moe_intermediate_size` wide (that width is also in
    /// `shared_expert_intermediate_size`), named `mlp.shared_experts.*`, without a gate. Zero
    /// keeps Qwen2-MoE's names (`mlp.shared_expert.*`).
    pub n_shared_experts: usize,
    /// Qwen2-MoE's `sigmoid(shared_expert_gate(x))` in front of the shared expert. Off gives the
    /// DeepSeek arrangement (shared expert always added in full).
    pub shared_expert_gate: bool,
    pub scoring_func: ScoringFunc,
    /// Multiplier on the routed experts' combined output (DeepSeek-V3's `routed_scaling_factor`).
    pub routed_scaling_factor: f64,
    /// DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the scores for
    /// the top-k choice only (`e_score_correction_bias`), updated by the trainer.
    pub aux_loss_free_bias: bool,
    /// Step size γ of that bias update (sign of the load error times γ).
    pub bias_update_rate: f64,
    /// DeepSeek's expert selection (`greedy`, `group_limited_greedy`, `noaux_tc`).
    pub topk_method: TopkMethod,
    /// Expert groups for group-limited selection (`n_group`; 1 = no groups).
    pub n_group: usize,
    /// Groups kept per token in group-limited selection (`topk_group`).
    pub topk_group: usize,
    /// DeepSeek's `first_k_dense_replace`: layers `0..k` are dense.
    pub first_k_dense_replace: usize,
    /// DeepSeek's `moe_layer_freq`: layer i (past the dense ones) is sparse only if
    /// `i % moe_layer_freq == 0`, as DeepSeek's own code has it (transformers ignores the key;
    /// every published config has 1).
    pub moe_layer_freq: usize,
    /// Mixtral's `router_jitter_noise`: multiplicative noise on the router input during
    /// transformers' training only. Kept so it round-trips; sobre never applies it (it has no
    /// effect at evaluation, and sobre's training does not add it).
    pub router_jitter_noise: f64,
    /// Granite's multipliers: on the input embeddings, on each attention and FFN output before
    /// its residual add, and the divisor of the logits. 1 elsewhere.
    pub embedding_multiplier: f64,
    pub residual_multiplier: f64,
    pub logits_scaling: f64,
    /// Granite's `attention_multiplier`: the softmax scale in place of `1/√head_dim`.
    pub attention_multiplier: Option<f64>,
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// DeepSeek's Multi-head Latent Attention; `Some` exactly for `deepseek_v2` / `deepseek_v3`,
    /// whose every layer uses it.
    pub mla: Option<MlaConfig>,
    /// DeepSeek-V3's `num_nextn_predict_layers`: multi-token-prediction layers stored after the
    /// decoder layers (`model.layers.{num_hidden_layers}.…`). transformers neither builds nor
    /// loads them and neither does sobre: their tensors are skipped when loading. 0 elsewhere.
    pub num_nextn_predict_layers: usize,
    /// Keys found in `config.json` that sobre does not know. Kept so a caller can warn.
    pub unknown_keys: Vec<String>,
}

/// Keys transformers writes that carry nothing sobre computes with.
const INERT_KEYS: &[&str] = &[
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "output_router_logits",
    "_name_or_path",
    "attention_dropout",
    "max_window_layers",
    "model_type",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "sobre_version",
];

impl ModelConfig {
    /// Parse the text of a `config.json`. `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
            origin: origin.to_string(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(ModelError::Config {
                origin: origin.to_string(),
                msg: "expected a JSON object at the top level".into(),
            });
        };
        Reader { map: &map, origin }.read()
    }

    /// Read `config.json` from a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// A named preset: `tiny` (tests), `small` (the CPU demo), `w1` (the benchmark model).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let base =
            |vocab, hidden, layers, heads, kv, head_dim, experts, k, moe_inter, inter| Self {
                family: Family::Qwen3Moe,
                vocab_size: vocab,
                hidden_size: hidden,
                intermediate_size: inter,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_key_value_heads: kv,
                head_dim,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
                rope_scaling: RopeScaling::None,
                max_position_embeddings: 2048,
                tie_word_embeddings: false,
                attention_bias: false,
                o_proj_bias: false,
                qk_norm: true,
                clip_qkv: None,
                num_experts: experts,
                num_experts_per_tok: k,
                moe_intermediate_size: moe_inter,
                decoder_sparse_step: 1,
                mlp_only_layers: vec![],
                norm_topk_prob: true,
                router_aux_loss_coef: 0.001,
                shared_expert_intermediate_size: 0,
                n_shared_experts: 0,
                shared_expert_gate: false,
                scoring_func: ScoringFunc::Softmax,
                routed_scaling_factor: 1.0,
                aux_loss_free_bias: false,
                bias_update_rate: 0.001,
                topk_method: TopkMethod::Greedy,
                n_group: 1,
                topk_group: 1,
                first_k_dense_replace: 0,
                moe_layer_freq: 1,
                router_jitter_noise: 0.0,
                embedding_multiplier: 1.0,
                residual_multiplier: 1.0,
                logits_scaling: 1.0,
                attention_multiplier: None,
                initializer_range: 0.02,
                bos_token_id: None,
                eos_token_id: vec![],
                pad_token_id: None,
                mla: None,
                num_nextn_predict_layers: 0,
                unknown_keys: vec![],
            };
        let cfg = match name {
            "tiny" => base(64, 32, 2, 4, 2, 8, 4, 2, 16, 64),
            "small" => {
                let mut c = base(1024, 128, 4, 4, 2, 32, 8, 2, 96, 384);
                c.tie_word_embeddings = true;
                c
            }
            "w1" => base(512, 256, 4, 4, 2, 64, 8, 2, 128, 512),
            other => {
                return Err(ModelError::Config {
                    origin: "preset".into(),
                    msg: format!("unknown preset `{other}`; expected one of: tiny, small, w1"),
                });
            }
        };
        cfg.validate("preset")?;
        Ok(cfg)
    }

    /// Is decoder layer `i` a sparse (MoE) layer? The rule of transformers' Qwen MoE models
    /// (`mlp_only_layers`, `decoder_sparse_step`) and of DeepSeek's (`first_k_dense_replace`,
    /// `moe_layer_freq`), both applied; each is neutral at its default.
    pub fn is_sparse_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
            && i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq)
    }

    /// The softmax scale of attention: Granite's `attention_multiplier`, else `1/√head_dim`;
    /// for MLA `qk_head_dim^-0.5`, times `mscale²` with `mscale = yarn_get_mscale(factor,
    /// mscale_all_dim)` under YaRN with a non-zero `mscale_all_dim` (transformers'
    /// `yarn_apply_mscale`).
    pub fn attention_scale(&self) -> f64 {
        if let Some(mla) = &self.mla {
            let mut scale = 1.0 / (mla.qk_head_dim() as f64).sqrt();
            if let RopeScaling::Yarn(y) = &self.rope_scaling
                && y.mscale_all_dim != 0.0
            {
                let factor = RopeScaling::yarn_factor(y, self.max_position_embeddings);
                let m = crate::rope::yarn_get_mscale(factor, y.mscale_all_dim);
                scale *= m * m;
            }
            return scale;
        }
        self.attention_multiplier
            .unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }

    /// The width of a query and a key head: `head_dim`, or MLA's `qk_nope + qk_rope`.
    pub fn qk_head_dim(&self) -> usize {
        self.mla
            .as_ref()
            .map_or(self.head_dim, MlaConfig::qk_head_dim)
    }

    /// The width of a value head: `head_dim`, or MLA's `v_head_dim`.
    pub fn v_head_dim(&self) -> usize {
        self.mla.as_ref().map_or(self.head_dim, |m| m.v_head_dim)
    }

    /// Bytes per token (f32, all layers) of the KV caches sobre keeps ([`crate::KvCache`],
    /// [`crate::HostKvCache`]): `layers · 2 · kv_heads · head_dim · 4` for standard attention;
    /// for MLA the compressed form, `layers · (kv_lora_rank + qk_rope_head_dim) · 4` (the
    /// normalised latent and the rotated `k_pe` of each token).
    pub fn kv_bytes_per_token(&self) -> usize {
        let per_layer = match &self.mla {
            Some(m) => m.latent_dim(),
            None => 2 * self.num_key_value_heads * self.head_dim,
        };
        self.num_hidden_layers * per_layer * 4
    }

    /// Bytes per token of the KV cache in the expanded form, every head's key and value:
    /// for MLA `layers · heads · (qk_head_dim + v_head_dim) · 4` (what a standard-attention
    /// cache of the same heads would hold; sobre's caches hold the compressed form,
    /// [`ModelConfig::kv_bytes_per_token`]); for standard attention the same as
    /// `kv_bytes_per_token`.
    pub fn expanded_kv_bytes_per_token(&self) -> usize {
        match &self.mla {
            Some(m) => {
                self.num_hidden_layers
                    * self.num_attention_heads
                    * (m.qk_head_dim() + m.v_head_dim)
                    * 4
            }
            None => self.kv_bytes_per_token(),
        }
    }

    /// The rotary frequencies of every head and the factor on cos and sin ([`RopeScaling`]).
    pub fn rope_frequencies(&self) -> RopeFrequencies {
        self.rope_scaling
            .frequencies(self.head_dim, self.rope_theta, self.max_position_embeddings)
    }

    /// OLMoE normalises q and k over the whole projection (`[heads · head_dim]`) before
    /// splitting it into heads; Qwen3 normalises each head over `head_dim`.
    pub fn qk_norm_over_projection(&self) -> bool {
        self.family == Family::Olmoe
    }

    /// Does expert selection use groups (`n_group`, `topk_group`)?
    pub fn group_limited(&self) -> bool {
        self.topk_method != TopkMethod::Greedy
    }

    /// Query heads served by each KV head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Check the shape constraints the forward pass relies on. Long because it is one flat list
    /// of independent checks, each with its own message.
    pub fn validate(&self, origin: &str) -> Result<(), ModelError> {
        let err = |msg: String| ModelError::Config {
            origin: origin.to_string(),
            msg,
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            // MLA's `head_dim` is its rotary width, which its config names so.
            (
                if self.mla.is_some() {
                    "qk_rope_head_dim"
                } else {
                    "head_dim"
                },
                self.head_dim,
            ),
            ("decoder_sparse_step", self.decoder_sparse_step),
            ("moe_layer_freq", self.moe_layer_freq),
        ] {
            if v == 0 {
                return Err(err(format!("`{key}` must be at least 1, found 0")));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        // (MLA's rotary width is `qk_rope_head_dim`, checked by that name below.)
        if !self.head_dim.is_multiple_of(2) && self.mla.is_none() {
            return Err(err(format!(
                "`head_dim` must be even for RoPE, found {}",
                self.head_dim
            )));
        }
        let any_sparse = (0..self.num_hidden_layers).any(|i| self.is_sparse_layer(i));
        let any_dense = (0..self.num_hidden_layers).any(|i| !self.is_sparse_layer(i));
        if any_sparse {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                return Err(err(format!(
                    "`num_experts_per_tok` must be in 1..={} (`num_experts`), found {}",
                    self.num_experts, self.num_experts_per_tok
                )));
            }
            if self.moe_intermediate_size == 0 {
                return Err(err("`moe_intermediate_size` must be at least 1".into()));
            }
        }
        if any_dense && self.intermediate_size == 0 {
            return Err(err(
                "`intermediate_size` must be at least 1 (there are dense layers)".into(),
            ));
        }
        if let Some(&bad) = self
            .mlp_only_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            return Err(err(format!(
                "`mlp_only_layers` names layer {bad}, but there are {} layers",
                self.num_hidden_layers
            )));
        }
        if self.rms_norm_eps.is_nan()
            || self.rms_norm_eps <= 0.0
            || self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
        {
            return Err(err(
                "`rms_norm_eps` and `rope_theta` must be positive".into()
            ));
        }
        if let Some(c) = self.clip_qkv
            && (c.is_nan() || c <= 0.0)
        {
            return Err(err(format!("`clip_qkv` must be positive, found {c}")));
        }
        if any_sparse && self.group_limited() {
            let (e, g, tg, k) = (
                self.num_experts,
                self.n_group,
                self.topk_group,
                self.num_experts_per_tok,
            );
            let method = self.topk_method.as_str();
            if g == 0 || e % g != 0 {
                return Err(err(format!(
                    "`n_group` ({g}) must divide `num_experts` ({e}) for `topk_method` \"{method}\""
                )));
            }
            if tg == 0 || tg > g {
                return Err(err(format!(
                    "`topk_group` must be in 1..={g} (`n_group`), found {tg}"
                )));
            }
            if k > tg * (e / g) {
                return Err(err(format!(
                    "`num_experts_per_tok` ({k}) exceeds the {} experts in `topk_group` ({tg}) \
                     groups of {}",
                    tg * (e / g),
                    e / g
                )));
            }
            if self.topk_method == TopkMethod::NoauxTc && e / g < 2 {
                return Err(err(format!(
                    "`topk_method` \"noaux_tc\" scores a group by its two best experts, so each \
                     of the `n_group` ({g}) groups needs at least 2 experts (`num_experts` = {e})"
                )));
            }
        }
        if self.n_shared_experts > 0 {
            if self.shared_expert_intermediate_size
                != self.n_shared_experts * self.moe_intermediate_size
            {
                return Err(err(format!(
                    "`n_shared_experts` ({}) makes the shared experts {} wide \
                     (`n_shared_experts · moe_intermediate_size`), but \
                     `shared_expert_intermediate_size` is {}",
                    self.n_shared_experts,
                    self.n_shared_experts * self.moe_intermediate_size,
                    self.shared_expert_intermediate_size
                )));
            }
            if self.shared_expert_gate {
                return Err(err(
                    "`n_shared_experts` (DeepSeek's shared experts) has no gate; \
                     `shared_expert_gate` must be false"
                        .into(),
                ));
            }
        }
        let family = self.family.model_type();
        if self.family.is_dense() && self.num_experts > 0 {
            return Err(err(format!(
                "\"{family}\" is a dense model: `num_experts` must be 0, found {}",
                self.num_experts
            )));
        }
        for (key, v) in [
            ("embedding_multiplier", self.embedding_multiplier),
            ("residual_multiplier", self.residual_multiplier),
            ("logits_scaling", self.logits_scaling),
            (
                "attention_multiplier",
                self.attention_multiplier.unwrap_or(1.0),
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(err(format!("`{key}` must be a positive number, found {v}")));
            }
        }
        if self.family.all_layers_sparse() {
            if any_dense {
                return Err(err(format!(
                    "\"{family}\" has no dense layers (its `intermediate_size` is the experts' \
                     width), so `mlp_only_layers`, `decoder_sparse_step`, `first_k_dense_replace` \
                     and `moe_layer_freq` must leave every layer sparse"
                )));
            }
            if self.intermediate_size != self.moe_intermediate_size {
                return Err(err(format!(
                    "\"{family}\" experts are `intermediate_size` wide: intermediate_size ({}) \
                     and moe_intermediate_size ({}) must agree",
                    self.intermediate_size, self.moe_intermediate_size
                )));
            }
        }
        match self.family {
            Family::Mixtral => {
                if !self.norm_topk_prob {
                    return Err(err("\"mixtral\" always renormalises the top-k weights; \
                         `norm_topk_prob` = false is not representable"
                        .into()));
                }
                if self.attention_bias || self.o_proj_bias {
                    return Err(err(
                        "\"mixtral\" attention has no biases; `attention_bias` must be false"
                            .into(),
                    ));
                }
            }
            Family::Olmoe => {
                if self.num_attention_heads * self.head_dim != self.hidden_size {
                    return Err(err(format!(
                        "\"olmoe\" normalises q over `hidden_size`, so `num_attention_heads · \
                         head_dim` ({} · {}) must equal `hidden_size` ({})",
                        self.num_attention_heads, self.head_dim, self.hidden_size
                    )));
                }
            }
            Family::DeepseekV2 | Family::DeepseekV3 => self.validate_deepseek(&err)?,
            Family::Qwen2Moe
            | Family::Qwen3Moe
            | Family::GraniteMoe
            | Family::Qwen2
            | Family::Qwen3
            | Family::Llama
            | Family::Mistral => {}
        }
        if self.mla.is_some() && !self.family.is_deepseek() {
            return Err(err(format!(
                "Multi-head Latent Attention is DeepSeek's; \"{family}\" uses standard attention"
            )));
        }
        Ok(())
    }

    /// The checks of a `deepseek_v2` / `deepseek_v3` config: MLA's shapes, and the routing
    /// transformers' class computes (a setting it would ignore is refused, not computed
    /// differently). Long because it is one flat list of checks.
    fn validate_deepseek(&self, err: &dyn Fn(String) -> ModelError) -> Result<(), ModelError> {
        let family = self.family.model_type();
        let Some(mla) = &self.mla else {
            return Err(err(format!(
                "\"{family}\" uses Multi-head Latent Attention, but the config has no MLA shape"
            )));
        };
        for (key, v) in [
            ("kv_lora_rank", mla.kv_lora_rank),
            ("qk_nope_head_dim", mla.qk_nope_head_dim),
            ("qk_rope_head_dim", mla.qk_rope_head_dim),
            ("v_head_dim", mla.v_head_dim),
            ("q_lora_rank", mla.q_lora_rank.unwrap_or(1)),
            ("n_routed_experts", self.num_experts),
        ] {
            if v == 0 {
                return Err(err(format!(
                    "`{key}` must be at least 1 for \"{family}\", found 0"
                )));
            }
        }
        if !mla.qk_rope_head_dim.is_multiple_of(2) {
            return Err(err(format!(
                "`qk_rope_head_dim` must be even for RoPE, found {}",
                mla.qk_rope_head_dim
            )));
        }
        if self.head_dim != mla.qk_rope_head_dim {
            return Err(err(format!(
                "MLA rotates `qk_rope_head_dim` ({}) dimensions: `head_dim` must equal it, found {}",
                mla.qk_rope_head_dim, self.head_dim
            )));
        }
        if self.num_key_value_heads != self.num_attention_heads {
            return Err(err(format!(
                "unsupported `num_key_value_heads` = {} for \"{family}\": MLA expands the latent \
                 into every one of the `num_attention_heads` ({}) heads, and transformers' class \
                 cannot run with fewer key/value heads",
                self.num_key_value_heads, self.num_attention_heads
            )));
        }
        if self.qk_norm || self.clip_qkv.is_some() {
            return Err(err(format!(
                "`qk_norm` and `clip_qkv` are not part of \"{family}\" attention (MLA normalises \
                 its latents itself)"
            )));
        }
        if self.shared_expert_gate
            || (self.n_shared_experts == 0 && self.shared_expert_intermediate_size > 0)
        {
            return Err(err(format!(
                "\"{family}\" shared experts are `n_shared_experts · moe_intermediate_size` wide \
                 and ungated; `shared_expert_intermediate_size` / `shared_expert_gate` cannot \
                 describe another one"
            )));
        }
        if self.family == Family::DeepseekV2 {
            if self.scoring_func != ScoringFunc::Softmax {
                return Err(err(
                    "unsupported `scoring_func` \"sigmoid\" for \"deepseek_v2\": transformers' \
                     DeepseekV2 router always takes the softmax"
                        .into(),
                ));
            }
            if self.topk_method == TopkMethod::NoauxTc {
                return Err(err(
                    "unsupported `topk_method` \"noaux_tc\" for \"deepseek_v2\"; its router \
                     computes \"greedy\" and \"group_limited_greedy\" (\"noaux_tc\" is \
                     \"deepseek_v3\")"
                        .into(),
                ));
            }
            if self.norm_topk_prob {
                return Err(err(
                    "unsupported `norm_topk_prob` = true for \"deepseek_v2\": transformers' \
                     DeepseekV2 router never renormalises the top-k weights (it multiplies them by \
                     `routed_scaling_factor`) and would ignore the key"
                        .into(),
                ));
            }
            if self.aux_loss_free_bias {
                return Err(err(
                    "`aux_loss_free_bias` (`e_score_correction_bias`) is DeepSeek-V3's; \
                     \"deepseek_v2\" has no such tensor"
                        .into(),
                ));
            }
        } else {
            if self.scoring_func != ScoringFunc::Sigmoid {
                return Err(err(
                    "unsupported `scoring_func` \"softmax\" for \"deepseek_v3\": transformers' \
                     DeepseekV3 router always takes the sigmoid"
                        .into(),
                ));
            }
            if self.topk_method != TopkMethod::NoauxTc {
                return Err(err(format!(
                    "unsupported `topk_method` \"{}\" for \"deepseek_v3\": transformers' \
                     DeepseekV3 router always selects by \"noaux_tc\"",
                    self.topk_method.as_str()
                )));
            }
            if !self.aux_loss_free_bias {
                return Err(err(
                    "\"deepseek_v3\" always has `e_score_correction_bias`: \
                     `aux_loss_free_bias` must be true"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// The `config.json` transformers reads for this model, plus sobre's own keys. Long because
    /// it is one flat list of keys, the mirror of `read`.
    pub fn to_json(&self) -> Value {
        if self.family.is_deepseek() {
            return self.deepseek_json();
        }
        let mut m = self.common_json_head();
        let fam = self.family;
        match fam {
            Family::Qwen3Moe | Family::Olmoe | Family::Qwen3 => {
                m.insert("attention_bias".into(), json!(self.attention_bias));
            }
            Family::Llama => {
                m.insert("attention_bias".into(), json!(self.attention_bias));
                m.insert("mlp_bias".into(), json!(false));
            }
            Family::GraniteMoe => {
                m.insert("attention_bias".into(), json!(self.attention_bias));
                m.insert(
                    "embedding_multiplier".into(),
                    json!(self.embedding_multiplier),
                );
                m.insert(
                    "residual_multiplier".into(),
                    json!(self.residual_multiplier),
                );
                m.insert("logits_scaling".into(), json!(self.logits_scaling));
                m.insert("attention_multiplier".into(), json!(self.attention_scale()));
            }
            Family::Qwen2 => {
                // Qwen2's class hard-codes the q/k/v biases; `qkv_bias` = false is sobre's.
                if !self.attention_bias {
                    m.insert("qkv_bias".into(), json!(false));
                }
                m.insert("use_sliding_window".into(), json!(false));
            }
            Family::Mistral => {
                m.insert("sliding_window".into(), Value::Null);
            }
            Family::DeepseekV2 | Family::DeepseekV3 => {} // `deepseek_json`
            Family::Qwen2Moe => {
                m.insert("qkv_bias".into(), json!(self.attention_bias));
                m.insert(
                    "shared_expert_intermediate_size".into(),
                    json!(self.shared_expert_intermediate_size),
                );
            }
            Family::Mixtral => {
                // Mixtral's attention never has biases (validated); a window wider than any
                // sequence is the same as none, which is how sobre writes it.
                m.insert("sliding_window".into(), Value::Null);
                m.insert(
                    "router_jitter_noise".into(),
                    json!(self.router_jitter_noise),
                );
            }
        }
        if fam.is_dense() {
            self.common_json_tail(&mut m);
            return Value::Object(m);
        }
        // Mixtral's and Granite's classes read `num_local_experts`, OLMoE's `num_experts`; the
        // Qwen classes read both (5.x writes `num_local_experts`, 4.x `num_experts`).
        if matches!(fam, Family::Mixtral | Family::GraniteMoe) {
            m.insert("num_local_experts".into(), json!(self.num_experts));
        } else {
            m.insert("num_experts".into(), json!(self.num_experts));
        }
        m.insert(
            "num_experts_per_tok".into(),
            json!(self.num_experts_per_tok),
        );
        if fam.all_layers_sparse() {
            // Experts are `intermediate_size` wide (validated equal to moe_intermediate_size).
            m.insert(
                "intermediate_size".into(),
                json!(self.moe_intermediate_size),
            );
        } else {
            m.insert(
                "moe_intermediate_size".into(),
                json!(self.moe_intermediate_size),
            );
            m.insert(
                "decoder_sparse_step".into(),
                json!(self.decoder_sparse_step),
            );
            m.insert("mlp_only_layers".into(), json!(self.mlp_only_layers));
            m.insert("use_sliding_window".into(), json!(false));
        }
        if !matches!(fam, Family::Mixtral | Family::GraniteMoe) {
            m.insert("norm_topk_prob".into(), json!(self.norm_topk_prob));
        }
        // OLMoE's own key (null = off); on other families a sobre extra, written when set.
        if fam == Family::Olmoe || self.clip_qkv.is_some() {
            m.insert("clip_qkv".into(), json!(self.clip_qkv));
        }
        m.insert(
            "router_aux_loss_coef".into(),
            json!(self.router_aux_loss_coef),
        );
        self.common_json_tail(&mut m);
        // sobre's own keys. transformers keeps unknown config keys as attributes and ignores
        // them, so these only change what sobre computes (see the README: a model that uses
        // them computes something transformers' class for this family does not).
        if self.n_shared_experts > 0 {
            m.insert("n_shared_experts".into(), json!(self.n_shared_experts));
        } else if fam != Family::Qwen2Moe && self.shared_expert_intermediate_size > 0 {
            m.insert(
                "shared_expert_intermediate_size".into(),
                json!(self.shared_expert_intermediate_size),
            );
        }
        let shared_gate_default = fam == Family::Qwen2Moe && self.n_shared_experts == 0;
        if self.shared_expert_gate != shared_gate_default {
            m.insert("shared_expert_gate".into(), json!(self.shared_expert_gate));
        }
        if self.qk_norm != matches!(fam, Family::Qwen3Moe | Family::Olmoe | Family::Qwen3) {
            m.insert("qk_norm".into(), json!(self.qk_norm));
        }
        m.insert(
            "scoring_func".into(),
            json!(match self.scoring_func {
                ScoringFunc::Softmax => "softmax",
                ScoringFunc::Sigmoid => "sigmoid",
            }),
        );
        m.insert(
            "routed_scaling_factor".into(),
            json!(self.routed_scaling_factor),
        );
        m.insert("aux_loss_free_bias".into(), json!(self.aux_loss_free_bias));
        m.insert("bias_update_rate".into(), json!(self.bias_update_rate));
        if self.topk_method != TopkMethod::Greedy {
            m.insert("topk_method".into(), json!(self.topk_method.as_str()));
            m.insert("n_group".into(), json!(self.n_group));
            m.insert("topk_group".into(), json!(self.topk_group));
        }
        if self.first_k_dense_replace > 0 {
            m.insert(
                "first_k_dense_replace".into(),
                json!(self.first_k_dense_replace),
            );
        }
        if self.moe_layer_freq != 1 {
            m.insert("moe_layer_freq".into(), json!(self.moe_layer_freq));
        }
        Value::Object(m)
    }

    /// The `config.json` of a `deepseek_v2` / `deepseek_v3` model: the keys of transformers'
    /// `DeepseekV2Config` / `DeepseekV3Config` (which also carry DeepSeek's own code's
    /// `scoring_func`, `topk_method`, `moe_layer_freq`), then sobre's training keys. Long
    /// because it is one flat list of keys, the mirror of `read_deepseek`.
    fn deepseek_json(&self) -> Value {
        let mut m = self.common_json_head();
        let v3 = self.family == Family::DeepseekV3;
        // transformers' config sets `head_dim` to the rotary width and writes `qk_head_dim`.
        m.insert("qk_head_dim".into(), json!(self.qk_head_dim()));
        m.insert("attention_bias".into(), json!(self.attention_bias));
        if !v3 {
            m.insert("mlp_bias".into(), json!(false));
        }
        if let Some(mla) = &self.mla {
            m.insert("q_lora_rank".into(), json!(mla.q_lora_rank));
            m.insert("kv_lora_rank".into(), json!(mla.kv_lora_rank));
            m.insert("qk_nope_head_dim".into(), json!(mla.qk_nope_head_dim));
            m.insert("qk_rope_head_dim".into(), json!(mla.qk_rope_head_dim));
            m.insert("v_head_dim".into(), json!(mla.v_head_dim));
            if v3 {
                m.insert("rope_interleave".into(), json!(mla.rope_interleave));
            }
        }
        m.insert("n_routed_experts".into(), json!(self.num_experts));
        m.insert(
            "num_experts_per_tok".into(),
            json!(self.num_experts_per_tok),
        );
        m.insert(
            "moe_intermediate_size".into(),
            json!(self.moe_intermediate_size),
        );
        m.insert("n_shared_experts".into(), json!(self.n_shared_experts));
        m.insert(
            "routed_scaling_factor".into(),
            json!(self.routed_scaling_factor),
        );
        m.insert("topk_method".into(), json!(self.topk_method.as_str()));
        m.insert("n_group".into(), json!(self.n_group));
        m.insert("topk_group".into(), json!(self.topk_group));
        m.insert(
            "first_k_dense_replace".into(),
            json!(self.first_k_dense_replace),
        );
        m.insert("moe_layer_freq".into(), json!(self.moe_layer_freq));
        m.insert("norm_topk_prob".into(), json!(self.norm_topk_prob));
        m.insert(
            "scoring_func".into(),
            json!(match self.scoring_func {
                ScoringFunc::Softmax => "softmax",
                ScoringFunc::Sigmoid => "sigmoid",
            }),
        );
        if v3 {
            m.insert(
                "num_nextn_predict_layers".into(),
                json!(self.num_nextn_predict_layers),
            );
            m.insert("bias_update_rate".into(), json!(self.bias_update_rate));
        }
        m.insert(
            "router_aux_loss_coef".into(),
            json!(self.router_aux_loss_coef),
        );
        self.common_json_tail(&mut m);
        Value::Object(m)
    }

    /// The keys every family's `config.json` starts with: the class, the shape, RoPE (both
    /// spellings, so transformers 4.x and 5.x read the same value), the context and the head.
    fn common_json_head(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("architectures".into(), json!([self.family.architecture()]));
        m.insert("model_type".into(), json!(self.family.model_type()));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        m.insert(
            "num_key_value_heads".into(),
            json!(self.num_key_value_heads),
        );
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("hidden_act".into(), json!("silu"));
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        // Both spellings, so transformers 4.x and 5.x read the same value.
        let (rope_parameters, rope_scaling) = self.rope_scaling.to_json(self.rope_theta);
        m.insert("rope_theta".into(), json!(self.rope_theta));
        m.insert("rope_parameters".into(), rope_parameters);
        if !rope_scaling.is_null() {
            m.insert("rope_scaling".into(), rope_scaling);
        }
        m.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        m
    }

    /// The keys every family's `config.json` ends with: initialisation, token ids, dtype.
    fn common_json_tail(&self, m: &mut Map<String, Value>) {
        m.insert("initializer_range".into(), json!(self.initializer_range));
        m.insert("bos_token_id".into(), json!(self.bos_token_id));
        m.insert(
            "eos_token_id".into(),
            match self.eos_token_id.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
        );
        m.insert("pad_token_id".into(), json!(self.pad_token_id));
        m.insert("dtype".into(), json!("float32"));
    }

    /// Total parameter count.
    pub fn num_parameters(&self) -> usize {
        self.count_parameters().0
    }

    /// `(total, active per token)` parameter counts. Active counts every parameter a token
    /// passes through, as Mixtral and Qwen report it: all but the routed experts it skips.
    pub fn count_parameters(&self) -> (usize, usize) {
        let h = self.hidden_size;
        let d = self.head_dim;
        let (nq, nkv) = (self.num_attention_heads, self.num_key_value_heads);
        let bias = |on: bool, n: usize| if on { n } else { 0 };
        let mut attn = h * nq * d + 2 * h * nkv * d + nq * d * h;
        attn += bias(self.attention_bias, nq * d + 2 * nkv * d) + bias(self.o_proj_bias, h);
        if let Some(mla) = &self.mla {
            // q (direct, or down → norm → up), kv_a (latent + k_pe), its norm, kv_b, o; the
            // biases of `attention_bias` on q_a, kv_a and o only, as transformers builds them.
            let (qk, latent) = (mla.qk_head_dim(), mla.latent_dim());
            let ab = self.attention_bias;
            attn = match mla.q_lora_rank {
                None => h * nq * qk,
                Some(r) => h * r + bias(ab, r) + r + r * nq * qk,
            };
            attn += h * latent + bias(ab, latent) + mla.kv_lora_rank;
            attn += mla.kv_lora_rank * nq * (mla.qk_nope_head_dim + mla.v_head_dim);
            attn += nq * mla.v_head_dim * h + bias(ab, h);
        }
        if self.qk_norm {
            attn += if self.qk_norm_over_projection() {
                (nq + nkv) * d
            } else {
                2 * d
            };
        }
        let swiglu = |inter: usize| 3 * h * inter;
        let (mut total, mut active) = (0, 0);
        for i in 0..self.num_hidden_layers {
            let norms = 2 * h;
            total += attn + norms;
            active += attn + norms;
            if self.is_sparse_layer(i) {
                let router = self.num_experts * h;
                let mut shared = 0;
                if self.shared_expert_intermediate_size > 0 {
                    shared = swiglu(self.shared_expert_intermediate_size);
                    shared += bias(self.shared_expert_gate, h);
                }
                total += router + shared + self.num_experts * swiglu(self.moe_intermediate_size);
                active +=
                    router + shared + self.num_experts_per_tok * swiglu(self.moe_intermediate_size);
            } else {
                total += swiglu(self.intermediate_size);
                active += swiglu(self.intermediate_size);
            }
        }
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        total += embed + head + h;
        active += embed + head + h;
        (total, active)
    }
}

/// Reads one config object key by key, with errors that name the key.
struct Reader<'a> {
    map: &'a Map<String, Value>,
    origin: &'a str,
}

impl Reader<'_> {
    fn err(&self, msg: String) -> ModelError {
        ModelError::Config {
            origin: self.origin.to_string(),
            msg,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize, ModelError> {
        match self.get(key) {
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                self.err(format!("`{key}` must be a non-negative integer, found {v}"))
            }),
            None => default.ok_or_else(|| self.err(format!("missing required key `{key}`"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        match self.get(key) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` must be a number, found {v}"))),
            None => Ok(default),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(key) {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` must be true or false, found {v}"))),
            None => Ok(default),
        }
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a token id, found {v}"))),
        }
    }

    /// Keys whose non-default values no family computes: another activation, sliding windows,
    /// partial rotary, MLP biases.
    fn refuse_unsupported(&self) -> Result<(), ModelError> {
        let act = self
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(self.err(format!(
                "unsupported `hidden_act` \"{act}\"; sobre computes \"silu\""
            )));
        }
        if self.bool_or("use_sliding_window", false)? {
            return Err(self.err(
                "unsupported `use_sliding_window` = true; sobre computes full attention only"
                    .into(),
            ));
        }
        if let Some(types) = self.get("layer_types") {
            let all_full = types
                .as_array()
                .is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")));
            if !all_full {
                return Err(self.err(format!(
                    "unsupported `layer_types` {types}; sobre computes \"full_attention\" layers only"
                )));
            }
        }

        let partial_rotary = self.f64_or("partial_rotary_factor", 1.0)?;
        if partial_rotary != 1.0 {
            return Err(self.err(format!(
                "unsupported `partial_rotary_factor` = {partial_rotary}; sobre rotates the whole head (1.0)"
            )));
        }
        if self.bool_or("mlp_bias", false)? {
            return Err(self.err(
                "unsupported `mlp_bias` = true: sobre's MLPs have no biases (no published \
                 Llama-family checkpoint uses them)"
                    .into(),
            ));
        }
        let pretraining_tp = self.usize_or("pretraining_tp", Some(1))?;
        if pretraining_tp == 0 {
            return Err(self.err("`pretraining_tp` must be at least 1, found 0".into()));
        }
        Ok(())
    }

    /// `rope_theta` and the RoPE scaling from `rope_theta`, `rope_scaling` and `rope_parameters`.
    fn rope(&self, default_theta: f64) -> Result<(f64, RopeScaling), ModelError> {
        // RoPE: transformers 4.x writes `rope_theta` (+ `rope_scaling`), 5.x `rope_parameters`.
        let mut rope_theta = self.f64_or("rope_theta", default_theta)?;
        let mut rope_scaling = RopeScaling::None;
        for key in ["rope_scaling", "rope_parameters"] {
            let Some(v) = self.get(key) else { continue };
            let obj = v
                .as_object()
                .ok_or_else(|| self.err(format!("`{key}` must be an object, found {v}")))?;
            let (scaling, theta) = RopeScaling::from_json(key, obj).map_err(|e| self.err(e))?;
            if let Some(t) = theta {
                rope_theta = t;
            }
            // 5.x files may carry both spellings; a scaled one wins over a default one, two
            // different scalings are an error.
            match (&rope_scaling, &scaling) {
                (_, RopeScaling::None) => {}
                (RopeScaling::None, _) => rope_scaling = scaling,
                (a, b) if a == b => {}
                _ => {
                    return Err(self.err(
                        "`rope_scaling` and `rope_parameters` describe different RoPE scalings"
                            .into(),
                    ));
                }
            }
        }
        Ok((rope_theta, rope_scaling))
    }

    /// `eos_token_id`: one id or a list, `default` when absent.
    fn eos_ids(&self, default: Option<u32>) -> Result<Vec<u32>, ModelError> {
        match self.get("eos_token_id") {
            None => Ok(default.into_iter().collect()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    self.err("`eos_token_id` must be a token id or a list of them".into())
                }),
            Some(_) => Ok(self.token_id("eos_token_id")?.into_iter().collect()),
        }
    }

    /// Every `config.json` key sobre reads. Long because it is one flat list, a key per
    /// statement in the order of transformers' config classes: split, the list would scatter.
    fn read(&self) -> Result<ModelConfig, ModelError> {
        let family = match self.get("model_type").and_then(Value::as_str) {
            Some("qwen3_moe") => Family::Qwen3Moe,
            Some("qwen2_moe") => Family::Qwen2Moe,
            Some("mixtral") => Family::Mixtral,
            Some("olmoe") => Family::Olmoe,
            Some("granitemoe") => Family::GraniteMoe,
            Some("qwen2") => Family::Qwen2,
            Some("qwen3") => Family::Qwen3,
            Some("llama") => Family::Llama,
            Some("mistral") => Family::Mistral,
            Some("deepseek_v2") => return self.read_deepseek(Family::DeepseekV2),
            Some("deepseek_v3") => return self.read_deepseek(Family::DeepseekV3),
            Some(other) => {
                return Err(self.err(format!(
                    "unsupported `model_type` \"{other}\"; sobre reads {}",
                    SUPPORTED_MODEL_TYPES
                        .iter()
                        .map(|t| format!("\"{t}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            None => return Err(self.err("missing required key `model_type`".into())),
        };
        let qwen2 = matches!(family, Family::Qwen2Moe | Family::Qwen2);
        let dense = family.is_dense();

        self.refuse_unsupported()?;
        let default_theta = if family == Family::Mixtral {
            1e6
        } else {
            10000.0
        };
        let (rope_theta, rope_scaling) = self.rope(default_theta)?;

        let hidden_size = self.usize_or("hidden_size", None)?;
        let num_attention_heads = self.usize_or("num_attention_heads", None)?;
        let num_key_value_heads =
            self.usize_or("num_key_value_heads", Some(num_attention_heads))?;
        if num_attention_heads == 0 {
            return Err(self.err("`num_attention_heads` must be at least 1, found 0".into()));
        }
        let head_dim = self.usize_or("head_dim", Some(hidden_size / num_attention_heads))?;
        let max_position_embeddings = self.usize_or("max_position_embeddings", Some(32768))?;
        let num_experts = match (self.get("num_experts"), self.get("num_local_experts")) {
            // Dense families have no expert keys; any found are left as unknown keys.
            _ if dense => 0,
            (Some(_), Some(_))
                if self.usize_or("num_experts", None)?
                    != self.usize_or("num_local_experts", None)? =>
            {
                return Err(self.err("`num_experts` and `num_local_experts` disagree".into()));
            }
            (Some(_), _) => self.usize_or("num_experts", None)?,
            (None, Some(_)) => self.usize_or("num_local_experts", None)?,
            (None, None) => return Err(self.err("missing required key `num_experts`".into())),
        };
        // Which keys hold the attention biases, per family.
        let attention_bias = match family {
            Family::Qwen2Moe | Family::Qwen2 => self.bool_or("qkv_bias", true)?,
            Family::Qwen3Moe
            | Family::Olmoe
            | Family::Qwen3
            | Family::Llama
            | Family::GraniteMoe
            | Family::DeepseekV2
            | Family::DeepseekV3 => self.bool_or("attention_bias", false)?,
            Family::Mixtral | Family::Mistral => {
                if self.bool_or("attention_bias", false)? {
                    return Err(self.err(format!(
                        "unsupported `attention_bias` = true for \"{}\": transformers' \
                         attention of this family has no biases and would ignore the key",
                        family.model_type()
                    )));
                }
                false
            }
        };
        if matches!(family, Family::Mixtral | Family::Mistral) {
            // A window at least as long as any sequence the model takes is no window at all.
            if let Some(w) = self.get("sliding_window") {
                let w = w.as_u64().ok_or_else(|| {
                    self.err(format!(
                        "`sliding_window` must be null or an integer, found {w}"
                    ))
                })?;
                if (w as usize) < max_position_embeddings {
                    return Err(self.err(format!(
                        "unsupported `sliding_window` = {w} (< `max_position_embeddings` = \
                         {max_position_embeddings}); sobre computes full attention only, so the \
                         window must be null or at least `max_position_embeddings`"
                    )));
                }
            }
            if family == Family::Mixtral
                && self.get("norm_topk_prob").is_some()
                && !self.bool_or("norm_topk_prob", true)?
            {
                return Err(self.err(
                    "unsupported `norm_topk_prob` = false for \"mixtral\": transformers' Mixtral \
                     always renormalises the top-k weights"
                        .into(),
                ));
            }
        }
        let clip_qkv = match self.get("clip_qkv") {
            None => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                self.err(format!("`clip_qkv` must be null or a number, found {v}"))
            })?),
        };
        let mlp_only_layers = match self.get("mlp_only_layers") {
            None => vec![],
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().map(|n| n as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    self.err(format!(
                        "`mlp_only_layers` must be a list of layer indices, found {v}"
                    ))
                })?,
        };
        // Expert width: `moe_intermediate_size`, except where the family's experts are as wide
        // as `intermediate_size` (and there are no dense layers).
        let intermediate_size = self.usize_or("intermediate_size", Some(0))?;
        let moe_intermediate_size = if family.all_layers_sparse() {
            intermediate_size
        } else if dense {
            0
        } else {
            self.usize_or("moe_intermediate_size", Some(0))?
        };
        let n_shared_experts = self.usize_or("n_shared_experts", Some(0))?;
        let shared_expert_intermediate_size = if n_shared_experts > 0 {
            let width = n_shared_experts * moe_intermediate_size;
            let given = self.usize_or("shared_expert_intermediate_size", Some(width))?;
            if given != width {
                return Err(self.err(format!(
                    "`shared_expert_intermediate_size` ({given}) disagrees with `n_shared_experts` \
                     · `moe_intermediate_size` ({width})"
                )));
            }
            width
        } else {
            self.usize_or("shared_expert_intermediate_size", Some(0))?
        };
        let scoring_func = match self.get("scoring_func").and_then(Value::as_str) {
            None | Some("softmax") => ScoringFunc::Softmax,
            Some("sigmoid") => ScoringFunc::Sigmoid,
            Some(other) => {
                return Err(self.err(format!(
                    "unsupported `scoring_func` \"{other}\"; expected \"softmax\" or \"sigmoid\""
                )));
            }
        };
        let topk_method = match self.get("topk_method") {
            None => TopkMethod::Greedy,
            Some(v) => match v.as_str() {
                Some("greedy") => TopkMethod::Greedy,
                Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
                Some("noaux_tc") => TopkMethod::NoauxTc,
                _ => {
                    return Err(self.err(format!(
                        "unsupported `topk_method` {v}; expected \"greedy\", \
                         \"group_limited_greedy\" or \"noaux_tc\""
                    )));
                }
            },
        };
        let router_jitter_noise = self.f64_or("router_jitter_noise", 0.0)?;
        if router_jitter_noise.is_nan() || router_jitter_noise < 0.0 {
            return Err(self.err(format!(
                "`router_jitter_noise` must be non-negative, found {router_jitter_noise}"
            )));
        }
        let eos_token_id = self.eos_ids(None)?;

        let mut known: Vec<&str> = vec![
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_act",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "rope_parameters",
            "max_position_embeddings",
            "tie_word_embeddings",
            "attention_bias",
            "qk_norm",
            "clip_qkv",
            "num_experts",
            "num_local_experts",
            "num_experts_per_tok",
            "norm_topk_prob",
            "router_aux_loss_coef",
            "shared_expert_intermediate_size",
            "shared_expert_gate",
            "n_shared_experts",
            "scoring_func",
            "routed_scaling_factor",
            "aux_loss_free_bias",
            "bias_update_rate",
            "topk_method",
            "n_group",
            "topk_group",
            "first_k_dense_replace",
            "moe_layer_freq",
            "initializer_range",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "use_sliding_window",
            "layer_types",
            "partial_rotary_factor",
        ];
        match family {
            Family::Qwen2Moe | Family::Qwen2 => known.extend(["qkv_bias", "sliding_window"]),
            Family::Qwen3Moe | Family::Qwen3 => known.push("sliding_window"),
            Family::Mixtral => known.extend(["sliding_window", "router_jitter_noise"]),
            Family::Mistral => known.push("sliding_window"),
            Family::Llama => known.extend(["mlp_bias", "pretraining_tp"]),
            Family::GraniteMoe => known.extend([
                "embedding_multiplier",
                "attention_multiplier",
                "residual_multiplier",
                "logits_scaling",
            ]),
            Family::Olmoe | Family::DeepseekV2 | Family::DeepseekV3 => {}
        }
        if dense {
            known.retain(|k| {
                !matches!(
                    *k,
                    "num_experts"
                        | "num_local_experts"
                        | "num_experts_per_tok"
                        | "norm_topk_prob"
                        | "router_aux_loss_coef"
                        | "shared_expert_intermediate_size"
                        | "shared_expert_gate"
                        | "n_shared_experts"
                        | "scoring_func"
                        | "routed_scaling_factor"
                        | "aux_loss_free_bias"
                        | "bias_update_rate"
                        | "topk_method"
                        | "n_group"
                        | "topk_group"
                        | "first_k_dense_replace"
                        | "moe_layer_freq"
                )
            });
        } else if !family.all_layers_sparse() {
            known.extend([
                "moe_intermediate_size",
                "decoder_sparse_step",
                "mlp_only_layers",
            ]);
        }
        let unknown_keys = self
            .map
            .keys()
            .filter(|k| !known.contains(&k.as_str()) && !INERT_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();

        // Granite's multipliers are its own keys; on another family they are unknown keys.
        let granite = |key: &str| -> Result<Option<f64>, ModelError> {
            match (family, self.get(key)) {
                (Family::GraniteMoe, Some(_)) => Ok(Some(self.f64_or(key, 1.0)?)),
                _ => Ok(None),
            }
        };
        let cfg = ModelConfig {
            family,
            vocab_size: self.usize_or("vocab_size", None)?,
            hidden_size,
            intermediate_size,
            num_hidden_layers: self.usize_or("num_hidden_layers", None)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.f64_or(
                "rms_norm_eps",
                if family.all_layers_sparse() {
                    1e-5
                } else {
                    1e-6
                },
            )?,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            attention_bias,
            // Qwen2's o_proj never has a bias; Qwen3's and OLMoE's `attention_bias` covers o_proj.
            o_proj_bias: !qwen2 && attention_bias,
            qk_norm: self.bool_or(
                "qk_norm",
                matches!(family, Family::Qwen3Moe | Family::Olmoe | Family::Qwen3),
            )?,
            clip_qkv,
            num_experts,
            num_experts_per_tok: if dense {
                0
            } else {
                self.usize_or("num_experts_per_tok", None)?
            },
            moe_intermediate_size,
            decoder_sparse_step: if family.all_layers_sparse() {
                1
            } else {
                self.usize_or("decoder_sparse_step", Some(1))?
            },
            mlp_only_layers: if family.all_layers_sparse() {
                vec![]
            } else {
                mlp_only_layers
            },
            // Granite's router takes the softmax of the top-k logits: renormalised weights.
            norm_topk_prob: family == Family::GraniteMoe
                || self.bool_or("norm_topk_prob", family == Family::Mixtral)?,
            router_aux_loss_coef: self.f64_or(
                "router_aux_loss_coef",
                if family == Family::Olmoe { 0.01 } else { 0.001 },
            )?,
            shared_expert_intermediate_size,
            n_shared_experts,
            shared_expert_gate: self.bool_or(
                "shared_expert_gate",
                family == Family::Qwen2Moe && n_shared_experts == 0,
            )?,
            scoring_func,
            routed_scaling_factor: self.f64_or("routed_scaling_factor", 1.0)?,
            // DeepSeek-V3's `noaux_tc` comes with its `e_score_correction_bias`.
            aux_loss_free_bias: self
                .bool_or("aux_loss_free_bias", topk_method == TopkMethod::NoauxTc)?,
            bias_update_rate: self.f64_or("bias_update_rate", 0.001)?,
            topk_method,
            n_group: self.usize_or("n_group", Some(1))?,
            topk_group: self.usize_or("topk_group", Some(1))?,
            first_k_dense_replace: self.usize_or("first_k_dense_replace", Some(0))?,
            moe_layer_freq: self.usize_or("moe_layer_freq", Some(1))?,
            router_jitter_noise: if family == Family::Mixtral {
                router_jitter_noise
            } else {
                0.0
            },
            embedding_multiplier: granite("embedding_multiplier")?.unwrap_or(1.0),
            residual_multiplier: granite("residual_multiplier")?.unwrap_or(1.0),
            logits_scaling: granite("logits_scaling")?.unwrap_or(1.0),
            attention_multiplier: granite("attention_multiplier")?,
            initializer_range: self.f64_or("initializer_range", 0.02)?,
            bos_token_id: self.token_id("bos_token_id")?,
            eos_token_id,
            pad_token_id: self.token_id("pad_token_id")?,
            mla: None,
            num_nextn_predict_layers: 0,
            unknown_keys,
        };
        cfg.validate(self.origin)?;
        Ok(cfg)
    }

    /// A `deepseek_v2` / `deepseek_v3` config, with the defaults of transformers'
    /// `DeepseekV2Config` / `DeepseekV3Config` (5.x) where a key is absent. Long because it is
    /// one flat list, a key per statement in the order of those classes.
    fn read_deepseek(&self, family: Family) -> Result<ModelConfig, ModelError> {
        let v3 = family == Family::DeepseekV3;
        // The class defaults: (V2, V3).
        let pick = |v2: usize, v3_value: usize| if v3 { v3_value } else { v2 };
        self.refuse_unsupported()?;
        let (rope_theta, rope_scaling) = self.rope(10000.0)?;
        let num_attention_heads = self.usize_or("num_attention_heads", Some(pick(32, 128)))?;
        let hidden_size = self.usize_or("hidden_size", Some(pick(4096, 7168)))?;
        // MLA. `q_lora_rank` is `null` for a single q_proj (DeepSeek-V2-Lite), absent = 1536.
        let q_lora_rank = match self.map.get("q_lora_rank") {
            None => Some(1536),
            Some(Value::Null) => None,
            Some(_) => Some(self.usize_or("q_lora_rank", None)?),
        };
        let mla = MlaConfig {
            q_lora_rank,
            kv_lora_rank: self.usize_or("kv_lora_rank", Some(512))?,
            qk_nope_head_dim: self.usize_or("qk_nope_head_dim", Some(128))?,
            qk_rope_head_dim: self.usize_or("qk_rope_head_dim", Some(64))?,
            v_head_dim: self.usize_or("v_head_dim", Some(128))?,
            // V2 always rotates interleaved pairs (complex form); V3 reads the key.
            rope_interleave: !v3 || self.bool_or("rope_interleave", true)?,
        };
        // transformers derives these two and overwrites whatever the file says.
        let head_dim = mla.qk_rope_head_dim;
        let num_experts = match (
            self.get("n_routed_experts"),
            self.get(if v3 {
                "num_local_experts"
            } else {
                "num_experts"
            }),
        ) {
            (Some(_), Some(alias))
                if self.usize_or("n_routed_experts", None)?
                    != alias.as_u64().unwrap_or(0) as usize =>
            {
                return Err(self.err(format!(
                    "`n_routed_experts` and its alias `{}` disagree",
                    if v3 {
                        "num_local_experts"
                    } else {
                        "num_experts"
                    }
                )));
            }
            (Some(_), _) | (None, None) => {
                self.usize_or("n_routed_experts", Some(pick(64, 256)))?
            }
            (None, Some(_)) => self.usize_or(
                if v3 {
                    "num_local_experts"
                } else {
                    "num_experts"
                },
                None,
            )?,
        };
        // V2's class has no default top-k (None fails in its router): the key is required.
        let num_experts_per_tok =
            self.usize_or("num_experts_per_tok", if v3 { Some(8) } else { None })?;
        let moe_intermediate_size =
            self.usize_or("moe_intermediate_size", Some(pick(1407, 2048)))?;
        let n_shared_experts = self.usize_or("n_shared_experts", Some(pick(2, 1)))?;
        let scoring_func = match self.get("scoring_func").and_then(Value::as_str) {
            None => {
                if v3 {
                    ScoringFunc::Sigmoid
                } else {
                    ScoringFunc::Softmax
                }
            }
            Some("softmax") => ScoringFunc::Softmax,
            Some("sigmoid") => ScoringFunc::Sigmoid,
            Some(other) => {
                return Err(self.err(format!(
                    "unsupported `scoring_func` \"{other}\"; \"{}\" computes \"{}\"",
                    family.model_type(),
                    if v3 { "sigmoid" } else { "softmax" }
                )));
            }
        };
        let topk_method = match self.get("topk_method") {
            None if v3 => TopkMethod::NoauxTc,
            None => TopkMethod::Greedy,
            Some(v) => match v.as_str() {
                Some("greedy") => TopkMethod::Greedy,
                Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
                Some("noaux_tc") => TopkMethod::NoauxTc,
                _ => {
                    return Err(self.err(format!(
                        "unsupported `topk_method` {v}; expected \"greedy\", \
                         \"group_limited_greedy\" or \"noaux_tc\""
                    )));
                }
            },
        };
        // Groups: V3's class defaults to 8 / 4; V2's to None, which only its greedy top-k
        // survives (transformers' group-limited selection cannot run without them).
        let groups = |key: &str, v3_default: usize| -> Result<usize, ModelError> {
            match (v3, topk_method) {
                (true, _) => self.usize_or(key, Some(v3_default)),
                (false, TopkMethod::Greedy) => self.usize_or(key, Some(1)),
                (false, _) if self.get(key).is_none() => Err(self.err(format!(
                    "`{key}` is required for `topk_method` \"{}\" (transformers' class has no \
                     default)",
                    topk_method.as_str()
                ))),
                (false, _) => self.usize_or(key, None),
            }
        };
        let n_group = groups("n_group", 8)?;
        let topk_group = groups("topk_group", 4)?;
        let known: &[&str] = &[
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "initializer_range",
            "rms_norm_eps",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "pretraining_tp",
            "tie_word_embeddings",
            "rope_theta",
            "rope_scaling",
            "rope_parameters",
            "attention_bias",
            "mlp_bias",
            "head_dim",
            "qk_head_dim",
            "first_k_dense_replace",
            "kv_lora_rank",
            "q_lora_rank",
            "n_group",
            "n_routed_experts",
            "num_experts",
            "num_local_experts",
            "n_shared_experts",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "routed_scaling_factor",
            "topk_group",
            "topk_method",
            "norm_topk_prob",
            "v_head_dim",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "rope_interleave",
            "num_nextn_predict_layers",
            "num_mtp_layers",
            "scoring_func",
            "moe_layer_freq",
            "router_aux_loss_coef",
            "aux_loss_free_bias",
            "bias_update_rate",
            "use_sliding_window",
            "layer_types",
            "partial_rotary_factor",
            "qk_norm",
            "clip_qkv",
            "shared_expert_intermediate_size",
            "shared_expert_gate",
        ];
        // Keys of one class only (V2 always interleaves, has no MTP layers, reads `num_experts`
        // and `mlp_bias`): on the other they are unknown.
        let other_class: &[&str] = if v3 {
            &["num_experts", "mlp_bias"]
        } else {
            &[
                "rope_interleave",
                "num_nextn_predict_layers",
                "num_mtp_layers",
                "num_local_experts",
            ]
        };
        let unknown_keys = self
            .map
            .keys()
            .filter(|k| {
                let k = k.as_str();
                let known_here = known.contains(&k) && !other_class.contains(&k);
                !known_here && !INERT_KEYS.contains(&k)
            })
            .cloned()
            .collect();
        let nextn = match (
            self.get("num_nextn_predict_layers"),
            self.get("num_mtp_layers"),
        ) {
            _ if !v3 => 0,
            (Some(_), _) => self.usize_or("num_nextn_predict_layers", None)?,
            (None, Some(_)) => self.usize_or("num_mtp_layers", None)?,
            (None, None) => 1,
        };
        let shared_width = n_shared_experts * moe_intermediate_size;
        let cfg = ModelConfig {
            family,
            vocab_size: self.usize_or("vocab_size", Some(pick(102400, 129280)))?,
            hidden_size,
            intermediate_size: self.usize_or("intermediate_size", Some(pick(11008, 18432)))?,
            num_hidden_layers: self.usize_or("num_hidden_layers", Some(pick(32, 61)))?,
            num_attention_heads,
            num_key_value_heads: self.usize_or("num_key_value_heads", Some(num_attention_heads))?,
            head_dim,
            rms_norm_eps: self.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self
                .usize_or("max_position_embeddings", Some(pick(2048, 4096)))?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            // On q_a_proj, kv_a_proj_with_mqa and o_proj (never q_proj, q_b_proj, kv_b_proj).
            attention_bias: self.bool_or("attention_bias", false)?,
            o_proj_bias: self.bool_or("attention_bias", false)?,
            qk_norm: self.bool_or("qk_norm", false)?,
            clip_qkv: match self.get("clip_qkv") {
                None => None,
                Some(v) => Some(v.as_f64().ok_or_else(|| {
                    self.err(format!("`clip_qkv` must be null or a number, found {v}"))
                })?),
            },
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
            norm_topk_prob: self.bool_or("norm_topk_prob", v3)?,
            router_aux_loss_coef: self.f64_or("router_aux_loss_coef", 0.001)?,
            shared_expert_intermediate_size: self
                .usize_or("shared_expert_intermediate_size", Some(shared_width))?,
            n_shared_experts,
            shared_expert_gate: self.bool_or("shared_expert_gate", false)?,
            scoring_func,
            routed_scaling_factor: self
                .f64_or("routed_scaling_factor", if v3 { 2.5 } else { 1.0 })?,
            aux_loss_free_bias: self.bool_or("aux_loss_free_bias", v3)?,
            bias_update_rate: self.f64_or("bias_update_rate", 0.001)?,
            topk_method,
            n_group,
            topk_group,
            first_k_dense_replace: self.usize_or("first_k_dense_replace", Some(pick(0, 3)))?,
            moe_layer_freq: self.usize_or("moe_layer_freq", Some(1))?,
            router_jitter_noise: 0.0,
            embedding_multiplier: 1.0,
            residual_multiplier: 1.0,
            logits_scaling: 1.0,
            attention_multiplier: None,
            initializer_range: self.f64_or("initializer_range", 0.02)?,
            bos_token_id: match self.map.get("bos_token_id") {
                None => Some(pick(1, 0) as u32),
                Some(_) => self.token_id("bos_token_id")?,
            },
            eos_token_id: match self.map.get("eos_token_id") {
                None => vec![pick(2, 1) as u32],
                Some(_) => self.eos_ids(None)?,
            },
            pad_token_id: self.token_id("pad_token_id")?,
            mla: Some(mla),
            num_nextn_predict_layers: nextn,
            unknown_keys,
        };
        cfg.validate(self.origin)?;
        Ok(cfg)
    }
}
