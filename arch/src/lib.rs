//! Model architecture description: the Hugging Face `deepseek_v3` `config.json` keys, named presets,
//! validation and the derived numbers (parameter counts, activation sizes) the planner and the model use.
//!
//! Invariant: this crate is pure data. It depends on serde, serde_json and thiserror only; it reads a file
//! only in [`ModelConfig::from_file`] and never touches numerics. Serde field names are exactly the HF keys,
//! so a `config.json` written by [`ModelConfig::to_json_string`] loads in `transformers` and vice versa.
//! Unknown keys are ignored; keys without a documented default are required.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Errors of the `arch` crate.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// The JSON text is malformed or lacks a required key (serde names the key).
    #[error("config.json: {0}")]
    Json(#[from] serde_json::Error),
    /// The config file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file that failed.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key holds a value that is inconsistent with the others.
    #[error("invalid config key `{key}`: {reason}")]
    Invalid {
        /// The HF key that is wrong.
        key: &'static str,
        /// Why it is wrong, with the values involved.
        reason: String,
    },
    /// No preset has this name.
    #[error("unknown model preset `{0}` (known: v3-671b, tiny, micro)")]
    UnknownPreset(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ArchError>;

fn default_model_type() -> String {
    "deepseek_v3".to_string()
}
fn default_architectures() -> Vec<String> {
    vec!["DeepseekV3ForCausalLM".to_string()]
}
fn default_one() -> usize {
    1
}
fn default_sigmoid() -> String {
    "sigmoid".to_string()
}
fn default_noaux() -> String {
    "noaux_tc".to_string()
}
fn default_silu() -> String {
    "silu".to_string()
}
fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_scale() -> f64 {
    1.0
}
fn default_init() -> f64 {
    0.006
}
fn default_max_pos() -> usize {
    4096
}

/// A DeepSeek-V3 model shape, field names = HF `config.json` keys (v3-spec §7.1).
///
/// Required keys: every width, layer, head and expert count. Keys with defaults: `model_type`,
/// `architectures`, `moe_layer_freq` (1), `scoring_func` ("sigmoid"), `topk_method` ("noaux_tc"),
/// `norm_topk_prob` (true), `num_nextn_predict_layers` (0), `rms_norm_eps` (1e-6), `rope_theta` (1e4),
/// `rope_scaling` (null), `rope_interleave` (true), `max_position_embeddings` (4096),
/// `tie_word_embeddings` (false), `attention_bias` (false), `initializer_range` (0.006), `hidden_act`
/// ("silu"), `routed_scaling_factor` (1.0), token ids, `quantization_config` (null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Always "deepseek_v3".
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// HF class list.
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// Dense FFN width.
    pub intermediate_size: usize,
    /// Routed/shared expert FFN width.
    pub moe_intermediate_size: usize,
    /// Decoder layers L (MTP modules not included).
    pub num_hidden_layers: usize,
    /// Leading dense layers.
    pub first_k_dense_replace: usize,
    /// A layer l ≥ first_k_dense_replace is MoE when l % moe_layer_freq == 0 (HF rule).
    #[serde(default = "default_one")]
    pub moe_layer_freq: usize,
    /// Attention heads n_h.
    pub num_attention_heads: usize,
    /// Unused by MLA math; kept for HF compatibility.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Query latent rank r_q; null means a plain `q_proj` (V2-Lite style).
    pub q_lora_rank: Option<usize>,
    /// KV latent rank r_kv.
    pub kv_lora_rank: usize,
    /// Non-RoPE query/key head dim d_n.
    pub qk_nope_head_dim: usize,
    /// RoPE query/key head dim d_r (decoupled, shared key).
    pub qk_rope_head_dim: usize,
    /// Value head dim d_v.
    pub v_head_dim: usize,
    /// Routed experts N_r per MoE layer.
    pub n_routed_experts: usize,
    /// Shared experts N_s (fused into one MLP of width N_s·moe_intermediate_size).
    pub n_shared_experts: usize,
    /// Routed experts per token K_r.
    pub num_experts_per_tok: usize,
    /// Expert groups G.
    pub n_group: usize,
    /// Groups kept per token K_g.
    pub topk_group: usize,
    /// Scale applied to the normalized gate weights.
    #[serde(default = "default_scale")]
    pub routed_scaling_factor: f64,
    /// Router score function; only "sigmoid" is supported.
    #[serde(default = "default_sigmoid")]
    pub scoring_func: String,
    /// Only "noaux_tc" (bias-corrected group-limited top-k) is supported.
    #[serde(default = "default_noaux")]
    pub topk_method: String,
    /// Renormalize the chosen gate weights to sum to one before scaling.
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    /// MTP depth D.
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    /// FFN activation; only "silu".
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// YaRN settings; kept verbatim (the model refuses YaRN for training).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Adjacent-pair RoPE layout (DeepSeek's); the model implements only `true`.
    #[serde(default = "default_true")]
    pub rope_interleave: bool,
    /// Longest supported sequence.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Always false for V3.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Always false for V3.
    #[serde(default)]
    pub attention_bias: bool,
    /// Init std (the report's 0.006 by default).
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// Begin-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// FP8 checkpoint description, kept verbatim.
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

/// Which FFN a decoder layer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Dense SwiGLU of width `intermediate_size`.
    Dense,
    /// Routed + shared experts.
    Moe,
}

impl ModelConfig {
    /// Parses HF `config.json` text and validates it.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: ModelConfig = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates an HF `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ArchError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Pretty JSON with HF keys, suitable as a checkpoint's `config.json`.
    pub fn to_json_string(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Named presets: `v3-671b` (the real shape), `tiny` (trainable on CPUs, FP8-friendly) and `micro`
    /// (unit tests).
    ///
    /// `tiny` is v3-spec §7.2: d = 256, 4 layers (layer 0 dense), 16 routed experts in 4 groups,
    /// top-4 of 2 groups, 1 shared expert, MTP depth 1, ≈ 8.75 M parameters. Every GEMM inner dimension is
    /// a multiple of 128. Two output dimensions cannot be: `q_b_proj` has n_h·(d_n+d_r) = 192 rows and
    /// `kv_a_proj_with_mqa` has r_kv + d_r = 144 rows (the latent plus the shared RoPE key, exactly like
    /// V3's 576). The FP8 path zero-pads those to the next multiple of 128 when taking block amaxes and
    /// drops the padding afterwards (v3-spec §4.2).
    ///
    /// `micro` keeps every mechanism (both latents, shared RoPE key, 8 experts in 4 groups, 2 groups per
    /// token, shared expert, a dense layer, MTP) at widths of 16–48 so finite-difference tests run in
    /// milliseconds. It does not satisfy the FP8 128-multiples.
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = match name {
            "v3-671b" => Self {
                vocab_size: 129280,
                hidden_size: 7168,
                intermediate_size: 18432,
                moe_intermediate_size: 2048,
                num_hidden_layers: 61,
                first_k_dense_replace: 3,
                num_attention_heads: 128,
                num_key_value_heads: Some(128),
                q_lora_rank: Some(1536),
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
                n_routed_experts: 256,
                n_shared_experts: 1,
                num_experts_per_tok: 8,
                n_group: 8,
                topk_group: 4,
                routed_scaling_factor: 2.5,
                num_nextn_predict_layers: 1,
                max_position_embeddings: 4096,
                ..Self::base()
            },
            "tiny" => Self {
                vocab_size: 1024,
                hidden_size: 256,
                intermediate_size: 768,
                moe_intermediate_size: 128,
                num_hidden_layers: 4,
                first_k_dense_replace: 1,
                num_attention_heads: 4,
                num_key_value_heads: Some(4),
                q_lora_rank: Some(128),
                kv_lora_rank: 128,
                qk_nope_head_dim: 32,
                qk_rope_head_dim: 16,
                v_head_dim: 32,
                n_routed_experts: 16,
                n_shared_experts: 1,
                num_experts_per_tok: 4,
                n_group: 4,
                topk_group: 2,
                routed_scaling_factor: 2.5,
                num_nextn_predict_layers: 1,
                max_position_embeddings: 1024,
                ..Self::base()
            },
            "micro" => Self {
                vocab_size: 64,
                hidden_size: 32,
                intermediate_size: 48,
                moe_intermediate_size: 16,
                num_hidden_layers: 2,
                first_k_dense_replace: 1,
                num_attention_heads: 2,
                num_key_value_heads: Some(2),
                q_lora_rank: Some(24),
                kv_lora_rank: 16,
                qk_nope_head_dim: 8,
                qk_rope_head_dim: 4,
                v_head_dim: 8,
                n_routed_experts: 8,
                n_shared_experts: 1,
                num_experts_per_tok: 2,
                n_group: 4,
                topk_group: 2,
                routed_scaling_factor: 2.5,
                num_nextn_predict_layers: 1,
                max_position_embeddings: 64,
                initializer_range: 0.1,
                ..Self::base()
            },
            other => return Err(ArchError::UnknownPreset(other.to_string())),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Defaults shared by every preset; the shape fields are zero and must be overwritten.
    fn base() -> Self {
        Self {
            model_type: default_model_type(),
            architectures: default_architectures(),
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            moe_intermediate_size: 0,
            num_hidden_layers: 0,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
            num_attention_heads: 0,
            num_key_value_heads: None,
            q_lora_rank: None,
            kv_lora_rank: 0,
            qk_nope_head_dim: 0,
            qk_rope_head_dim: 0,
            v_head_dim: 0,
            n_routed_experts: 0,
            n_shared_experts: 0,
            num_experts_per_tok: 0,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            scoring_func: default_sigmoid(),
            topk_method: default_noaux(),
            norm_topk_prob: true,
            num_nextn_predict_layers: 0,
            hidden_act: default_silu(),
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            rope_interleave: true,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            attention_bias: false,
            initializer_range: 0.006,
            bos_token_id: Some(0),
            eos_token_id: Some(1),
            quantization_config: None,
        }
    }

    /// Checks internal consistency; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        fn bad(key: &'static str, reason: String) -> Result<()> {
            Err(ArchError::Invalid { key, reason })
        }
        let positive: [(&'static str, usize); 10] = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("moe_layer_freq", self.moe_layer_freq),
            ("n_group", self.n_group),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be positive".into());
            }
        }
        if self.model_type != "deepseek_v3" {
            return bad(
                "model_type",
                format!("expected \"deepseek_v3\", got {:?}", self.model_type),
            );
        }
        if self.q_lora_rank == Some(0) {
            return bad(
                "q_lora_rank",
                "0 is not allowed; use null for a plain q_proj".into(),
            );
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return bad(
                "qk_rope_head_dim",
                format!(
                    "{} must be even (RoPE rotates pairs)",
                    self.qk_rope_head_dim
                ),
            );
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return bad(
                "first_k_dense_replace",
                format!(
                    "{} exceeds num_hidden_layers {}",
                    self.first_k_dense_replace, self.num_hidden_layers
                ),
            );
        }
        if self.first_k_dense_replace > 0 && self.intermediate_size == 0 {
            return bad(
                "intermediate_size",
                "dense layers need a positive width".into(),
            );
        }
        if self.scoring_func != "sigmoid" {
            return bad(
                "scoring_func",
                format!("only \"sigmoid\" is supported, got {:?}", self.scoring_func),
            );
        }
        if self.topk_method != "noaux_tc" {
            return bad(
                "topk_method",
                format!("only \"noaux_tc\" is supported, got {:?}", self.topk_method),
            );
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("only \"silu\" is supported, got {:?}", self.hidden_act),
            );
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return bad(
                "rms_norm_eps",
                format!("{} must be positive", self.rms_norm_eps),
            );
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 1.0 {
            return bad("rope_theta", format!("{} must exceed 1", self.rope_theta));
        }
        if self.tie_word_embeddings {
            return bad(
                "tie_word_embeddings",
                "DeepSeek-V3 keeps a separate lm_head".into(),
            );
        }
        if self.attention_bias {
            return bad("attention_bias", "DeepSeek-V3 linears have no bias".into());
        }
        let has_moe = self.n_moe_layers() > 0 || self.num_nextn_predict_layers > 0;
        if has_moe {
            if self.n_routed_experts == 0 {
                return bad("n_routed_experts", "MoE layers need routed experts".into());
            }
            if self.moe_intermediate_size == 0 {
                return bad("moe_intermediate_size", "must be positive".into());
            }
            if !self.n_routed_experts.is_multiple_of(self.n_group) {
                return bad(
                    "n_group",
                    format!(
                        "n_routed_experts {} is not divisible by n_group {}",
                        self.n_routed_experts, self.n_group
                    ),
                );
            }
            let per_group = self.n_routed_experts / self.n_group;
            if per_group < 2 {
                return bad(
                    "n_group",
                    format!(
                        "each group needs at least 2 experts (the group score sums the top 2), got {per_group}"
                    ),
                );
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return bad(
                    "topk_group",
                    format!(
                        "{} must be in 1..=n_group ({})",
                        self.topk_group, self.n_group
                    ),
                );
            }
            let reachable = self.topk_group * per_group;
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > reachable {
                return bad(
                    "num_experts_per_tok",
                    format!(
                        "{} must be in 1..={reachable} (experts in the {} kept groups)",
                        self.num_experts_per_tok, self.topk_group
                    ),
                );
            }
            if self.routed_scaling_factor.is_nan() || self.routed_scaling_factor <= 0.0 {
                return bad(
                    "routed_scaling_factor",
                    format!("{} must be positive", self.routed_scaling_factor),
                );
            }
        }
        Ok(())
    }

    /// Whether decoder layer `layer` (0-based; MTP modules use ids ≥ num_hidden_layers) is an MoE layer.
    pub fn layer_kind(&self, layer: usize) -> LayerKind {
        if layer >= self.first_k_dense_replace && layer.is_multiple_of(self.moe_layer_freq) {
            LayerKind::Moe
        } else {
            LayerKind::Dense
        }
    }

    /// MoE layers in the main model (MTP excluded).
    pub fn n_moe_layers(&self) -> usize {
        (0..self.num_hidden_layers)
            .filter(|&l| self.layer_kind(l) == LayerKind::Moe)
            .count()
    }

    /// Layer ids of every MoE layer including the MTP modules' (ids num_hidden_layers..).
    pub fn moe_layer_ids(&self) -> Vec<usize> {
        (0..self.num_hidden_layers + self.num_nextn_predict_layers)
            .filter(|&l| self.layer_kind(l) == LayerKind::Moe)
            .collect()
    }

    /// Query/key head dim d_n + d_r.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Routed experts per group.
    pub fn experts_per_group(&self) -> usize {
        self.n_routed_experts / self.n_group.max(1)
    }

    /// Softmax scale d_qk^−½ (no YaRN).
    pub fn softmax_scale(&self) -> f64 {
        (self.qk_head_dim() as f64).powf(-0.5)
    }

    /// MLA parameters of one layer, including the two latent norms (q_a_layernorm, kv_a_layernorm)
    /// but not input_layernorm. V3: 187,107,328.
    pub fn attention_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        let h = self.num_attention_heads as u64;
        let dqk = self.qk_head_dim() as u64;
        let q = match self.q_lora_rank {
            Some(r) => {
                let r = r as u64;
                r * d + r + h * dqk * r
            }
            None => h * dqk * d,
        };
        let rkv = self.kv_lora_rank as u64;
        let kv = (rkv + self.qk_rope_head_dim as u64) * d
            + rkv
            + h * (self.qk_nope_head_dim + self.v_head_dim) as u64 * rkv;
        let o = d * h * self.v_head_dim as u64;
        q + kv + o
    }

    /// Dense SwiGLU parameters (gate, up, down). V3: 396,361,728.
    pub fn dense_ffn_params(&self) -> u64 {
        3 * self.hidden_size as u64 * self.intermediate_size as u64
    }

    /// One routed expert (gate, up, down). V3: 44,040,192.
    pub fn expert_params(&self) -> u64 {
        3 * self.hidden_size as u64 * self.moe_intermediate_size as u64
    }

    /// The fused shared expert(s).
    pub fn shared_expert_params(&self) -> u64 {
        self.expert_params() * self.n_shared_experts as u64
    }

    /// Router weight [N_r, d].
    pub fn router_params(&self) -> u64 {
        self.n_routed_experts as u64 * self.hidden_size as u64
    }

    /// The routing bias [N_r] (FP32, not trained by gradients).
    pub fn routing_bias_params(&self) -> u64 {
        self.n_routed_experts as u64
    }

    /// MoE block: routed experts + shared + router + bias. V3: 11,320,164,608.
    pub fn moe_block_params(&self) -> u64 {
        self.n_routed_experts as u64 * self.expert_params()
            + self.shared_expert_params()
            + self.router_params()
            + self.routing_bias_params()
    }

    /// One decoder layer: MLA + its two norms + FFN (MoE blocks include the bias).
    pub fn layer_params(&self, layer: usize) -> u64 {
        let ffn = match self.layer_kind(layer) {
            LayerKind::Dense => self.dense_ffn_params(),
            LayerKind::Moe => self.moe_block_params(),
        };
        self.attention_params() + 2 * self.hidden_size as u64 + ffn
    }

    /// Embedding table [V, d].
    pub fn embedding_params(&self) -> u64 {
        self.vocab_size as u64 * self.hidden_size as u64
    }

    /// Output head [V, d] (untied).
    pub fn head_params(&self) -> u64 {
        self.vocab_size as u64 * self.hidden_size as u64
    }

    /// Embedding + head + all decoder layers + final norm. V3: 671,026,419,200.
    pub fn main_model_params(&self) -> u64 {
        let layers: u64 = (0..self.num_hidden_layers)
            .map(|l| self.layer_params(l))
            .sum();
        self.embedding_params() + self.head_params() + layers + self.hidden_size as u64
    }

    /// Unique parameters of MTP module k (1-based): eh_proj [d, 2d] + one decoder layer + enorm, hnorm,
    /// shared_head.norm. The embedding and head are shared, so not counted. V3: 11,610,068,224.
    pub fn mtp_module_params(&self, k: usize) -> u64 {
        let d = self.hidden_size as u64;
        2 * d * d + self.layer_params(self.num_hidden_layers + k - 1) + 3 * d
    }

    /// Main model plus all MTP modules.
    pub fn total_params(&self) -> u64 {
        self.main_model_params()
            + (1..=self.num_nextn_predict_layers)
                .map(|k| self.mtp_module_params(k))
                .sum::<u64>()
    }

    /// Trainable parameters (the total without the routing biases, which are not gradient-trained).
    pub fn trainable_params(&self) -> u64 {
        self.total_params() - self.moe_layer_ids().len() as u64 * self.routing_bias_params()
    }

    /// Parameters touched by one token of the main model (embedding row counted as d).
    pub fn activated_params_per_token(&self) -> u64 {
        let mut n = self.hidden_size as u64 + self.head_params() + self.hidden_size as u64;
        for l in 0..self.num_hidden_layers {
            n += self.attention_params() + 2 * self.hidden_size as u64;
            n += match self.layer_kind(l) {
                LayerKind::Dense => self.dense_ffn_params(),
                LayerKind::Moe => {
                    (self.num_experts_per_tok as u64) * self.expert_params()
                        + self.shared_expert_params()
                        + self.router_params()
                }
            };
        }
        n
    }

    /// Elements one token saves for the backward pass of decoder layer `layer`, in the model crate's
    /// layout (rough but complete): the layer input and both norm outputs, the q/kv latents before and
    /// after their norms, full per-head q, k, v and the attention output, one log-sum-exp per head (the
    /// attention core is recomputed flash-style, so no T×T term), the post-attention residual, and the
    /// FFN's gate/up/activation (for MoE: router scores, and per routed expert its input copy plus
    /// gate/up/activation; the shared expert like a dense FFN). Norm statistics add one value each.
    pub fn activation_elems_per_token(&self, layer: usize) -> u64 {
        let d = self.hidden_size as u64;
        let h = self.num_attention_heads as u64;
        let rq = self.q_lora_rank.unwrap_or(0) as u64;
        let rkv = self.kv_lora_rank as u64;
        let dr = self.qk_rope_head_dim as u64;
        let dqk = self.qk_head_dim() as u64;
        let dv = self.v_head_dim as u64;
        let attn =
            d + 1 + d + 2 * rq + 1 + (rkv + dr) + rkv + 1 + h * dqk + h * dqk + h * dv + h * dv + h;
        let post = d + 1 + d;
        let ffn = match self.layer_kind(layer) {
            LayerKind::Dense => 3 * self.intermediate_size as u64,
            LayerKind::Moe => {
                let i = self.moe_intermediate_size as u64;
                let k = self.num_experts_per_tok as u64;
                self.n_routed_experts as u64
                    + k * (d + 3 * i)
                    + 3 * i * self.n_shared_experts as u64
            }
        };
        attn + post + ffn
    }

    /// [`Self::activation_elems_per_token`] times the storage width (4 for f32, 2 for bf16, ≈1 for FP8).
    pub fn activation_bytes_per_token(&self, layer: usize, bytes_per_elem: u64) -> u64 {
        self.activation_elems_per_token(layer) * bytes_per_elem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_671b_counts_match_the_spec() {
        let c = ModelConfig::preset("v3-671b").unwrap();
        assert_eq!(c.attention_params(), 187_107_328);
        assert_eq!(c.dense_ffn_params(), 396_361_728);
        assert_eq!(c.expert_params(), 44_040_192);
        assert_eq!(c.moe_block_params(), 11_320_164_608);
        assert_eq!(c.main_model_params(), 671_026_419_200);
        assert_eq!(c.mtp_module_params(1), 11_610_068_224);
        assert_eq!(c.n_moe_layers(), 58);
        assert_eq!(c.qk_head_dim(), 192);
        assert_eq!(c.moe_layer_ids().len(), 59);
    }

    #[test]
    fn tiny_counts_match_the_spec_and_are_fp8_friendly() {
        let c = ModelConfig::preset("tiny").unwrap();
        assert_eq!(c.attention_params(), 160_000);
        assert_eq!(c.dense_ffn_params(), 589_824);
        assert_eq!(c.expert_params(), 98_304);
        assert_eq!(c.moe_block_params(), 1_675_280);
        assert_eq!(c.main_model_params(), 6_782_256);
        assert_eq!(c.mtp_module_params(1), 1_967_632);
        // Every GEMM inner dimension K is a multiple of 128.
        let h = c.num_attention_heads;
        for k in [
            c.hidden_size,
            c.q_lora_rank.unwrap(),
            c.kv_lora_rank,
            h * c.v_head_dim,
            c.intermediate_size,
            c.moe_intermediate_size,
            2 * c.hidden_size,
            c.vocab_size,
        ] {
            assert_eq!(k % 128, 0, "{k}");
        }
        assert!(c.n_routed_experts >= 8 && c.n_group >= 4 && c.n_shared_experts == 1);
        assert_eq!(c.layer_kind(0), LayerKind::Dense);
        assert_eq!(c.layer_kind(1), LayerKind::Moe);
    }

    #[test]
    fn golden_config_parses_and_counts_its_parameters() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/golden/v3-tiny/config.json"
        );
        let c = ModelConfig::from_file(path).unwrap();
        assert_eq!(c.kv_lora_rank, 64);
        assert_eq!(c.n_routed_experts, 8);
        assert_eq!(c.num_nextn_predict_layers, 1);
        // summary.json's n_params counts every trainable tensor, MTP included, biases excluded.
        assert_eq!(c.trainable_params(), 4_972_992);
    }

    #[test]
    fn json_round_trip_and_unknown_keys() {
        let c = ModelConfig::preset("micro").unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&c.to_json_string()).unwrap();
        v["some_future_key"] = serde_json::json!(42);
        let back = ModelConfig::from_json_str(&v.to_string()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn missing_required_key_is_named() {
        let c = ModelConfig::preset("micro").unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&c.to_json_string()).unwrap();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        let err = ModelConfig::from_json_str(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("kv_lora_rank"), "{err}");
    }

    #[test]
    fn validation_names_the_bad_key() {
        let base = ModelConfig::preset("tiny").unwrap();
        type Edit = Box<dyn Fn(&mut ModelConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("n_group", Box::new(|c| c.n_group = 3)),
            ("n_group", Box::new(|c| c.n_group = 16)),
            ("topk_group", Box::new(|c| c.topk_group = 5)),
            (
                "num_experts_per_tok",
                Box::new(|c| c.num_experts_per_tok = 9),
            ),
            ("qk_rope_head_dim", Box::new(|c| c.qk_rope_head_dim = 15)),
            (
                "first_k_dense_replace",
                Box::new(|c| c.first_k_dense_replace = 5),
            ),
            (
                "scoring_func",
                Box::new(|c| c.scoring_func = "softmax".into()),
            ),
            ("hidden_size", Box::new(|c| c.hidden_size = 0)),
        ];
        for (key, edit) in cases {
            let mut c = base.clone();
            edit(&mut c);
            match c.validate() {
                Err(ArchError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: expected Invalid, got {other:?}"),
            }
        }
        assert!(matches!(
            ModelConfig::preset("nope"),
            Err(ArchError::UnknownPreset(_))
        ));
    }

    #[test]
    fn activation_bytes_are_positive_and_moe_differs() {
        let c = ModelConfig::preset("tiny").unwrap();
        assert!(c.activation_bytes_per_token(0, 4) > 0);
        assert_ne!(
            c.activation_elems_per_token(0),
            c.activation_elems_per_token(1)
        );
        assert_eq!(
            c.activation_bytes_per_token(1, 2) * 2,
            c.activation_bytes_per_token(1, 4)
        );
    }
}
