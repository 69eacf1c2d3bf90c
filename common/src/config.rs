//! The job config (TOML). Unknown keys are errors; `JobConfig::load` validates every value that
//! can be checked without data and names the offending field.

use crate::models::{ModelEntry, ModelFacts, ModelsInput};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job name; output goes to `runs/<name>/`. Defaults to the config file's stem.
    #[serde(default)]
    pub name: String,
    /// Changes the originals' inits, the merge data and the M/U init.
    #[serde(default)]
    pub seed: u64,
    /// Intra-op threads of libtorch; 0 = all cores. Results are deterministic for a fixed value.
    #[serde(default)]
    pub threads: usize,
    /// The originals and their data listed directly (`[[models]]`); the job's tasks, model
    /// shape and input come from them. Empty: the built-in datasets, `[[tasks]]` and
    /// `train.models_dir`.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub tasks: Vec<TaskConfig>,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub merge: MergeConfig,
    #[serde(default)]
    pub baselines: BaselinesConfig,
    /// How the SuperNet is laid out over workers (one stage, one replica by default).
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub output: OutputConfig,
}

/// How the merged model is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Largest safetensors shard of an HF output folder, in MB (10⁶ bytes): above it the
    /// weights are split into `model-0000i-of-0000N.safetensors` + an index, as
    /// `transformers`' `save_pretrained` does (its default is 5 GB).
    #[serde(default = "default_max_shard_mb")]
    pub max_shard_mb: f64,
}

fn default_max_shard_mb() -> f64 {
    5000.0
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            max_shard_mb: default_max_shard_mb(),
        }
    }
}

impl OutputConfig {
    /// `max_shard_mb` in bytes.
    pub fn max_shard_bytes(&self) -> u64 {
        (self.max_shard_mb * 1e6) as u64
    }
}

/// Collective backend of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// CPU ring all-reduce and point-to-point over QUIC between workers.
    #[default]
    Quic,
    /// NCCL on CUDA tensors (one GPU per worker).
    Nccl,
}

/// The `[cluster]` section: stages × replicas workers, where the coordinator is, liveness.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Contiguous groups of layers, trained by different workers (model parallel).
    #[serde(default = "one")]
    pub stages: usize,
    /// Data-parallel copies of each stage; they split every batch and sum gradients.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Micro-batches per step of the global pipeline (used when stages > 1).
    #[serde(default = "default_micro_batches")]
    pub micro_batches: usize,
    /// `host:port` workers dial; the coordinator listens on its port. Default: from torchrun or
    /// Slurm variables, else the coordinator picks a free port and writes it to
    /// `<work dir>/rendezvous.json`.
    #[serde(default)]
    pub coordinator: Option<String>,
    #[serde(default)]
    pub backend: Backend,
    /// Seconds between heartbeats.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: f64,
    /// A peer silent this long is dead and fails the job (naming it).
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout_secs: f64,
    /// How long the coordinator waits for every worker to register.
    #[serde(default = "default_register_timeout")]
    pub register_timeout_secs: f64,
    /// Watchdog of the data plane: a collective or transfer that makes no progress this long
    /// (plus one second per 10 MB it moves) fails the job, naming the collective and the peer;
    /// it catches a peer that stalls while its heartbeats flow. PyTorch's NCCL default.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_secs: f64,
    /// Every this many optimiser steps a training phase checkpoints its stage (M/U, Adam state,
    /// position), so that `--resume` continues mid-phase; 0: only at the end of a phase.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every_steps: u64,
    /// libtorch threads per worker (0 = the job's `threads`).
    #[serde(default)]
    pub worker_threads: usize,
    /// Memory of each worker, GB: a plan whose estimate for some stage exceeds it fails before
    /// any work, naming the stage (`fsmerge check` prints the estimates). Unset: not checked.
    #[serde(default)]
    pub memory_gb: Option<f64>,
}

fn one() -> usize {
    1
}
fn default_micro_batches() -> usize {
    4
}
fn default_heartbeat() -> f64 {
    1.0
}
fn default_peer_timeout() -> f64 {
    8.0
}
fn default_register_timeout() -> f64 {
    300.0
}
fn default_collective_timeout() -> f64 {
    600.0
}
fn default_checkpoint_every() -> u64 {
    500
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            stages: 1,
            replicas: 1,
            micro_batches: default_micro_batches(),
            coordinator: None,
            backend: Backend::Quic,
            heartbeat_secs: default_heartbeat(),
            peer_timeout_secs: default_peer_timeout(),
            register_timeout_secs: default_register_timeout(),
            collective_timeout_secs: default_collective_timeout(),
            checkpoint_every_steps: default_checkpoint_every(),
            worker_threads: 0,
            memory_gb: None,
        }
    }
}

impl ClusterConfig {
    /// Workers of the job: stages × replicas.
    pub fn world(&self) -> usize {
        self.stages * self.replicas
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    FashionMnist,
    Digits,
    /// Text: SpamAssassin mails (0 ham, 1 spam) and English first names (2 female, 3 male).
    SpamNames,
    /// Each `[[models]]` entry's own data (the default; a job without `[[models]]` names a
    /// built-in dataset).
    Models,
}

impl DataConfig {
    /// Classes of the data (of all tasks together for `[[models]]`).
    pub fn num_classes(&self) -> usize {
        match self.dataset {
            Dataset::SpamNames => 4,
            Dataset::Models => self.models_input.map_or(0, |m| m.classes),
            _ => 10,
        }
    }
    /// Side of the (square) images; 0 for text.
    pub fn image_side(&self) -> usize {
        match self.dataset {
            Dataset::FashionMnist => 28,
            Dataset::Digits => 8,
            Dataset::SpamNames => 0,
            Dataset::Models => self.models_input.map_or(0, |m| m.image_side),
        }
    }
    /// Channels of the images (the built-in datasets are grey); 0 for text.
    pub fn channels(&self) -> usize {
        match self.dataset {
            Dataset::Models => self.models_input.map_or(0, |m| m.channels),
            Dataset::SpamNames => 0,
            _ => 1,
        }
    }
    pub fn is_text(&self) -> bool {
        self.image_side() == 0
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A built-in dataset, or (the default) each `[[models]]` entry's own data.
    #[serde(default = "default_dataset")]
    pub dataset: Dataset,
    /// Directory (fashion-mnist: the IDX .gz files) or file (digits: digits.csv.gz). Relative
    /// paths are relative to the working directory. Defaults per dataset (see README).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Share of the training split held out as validation.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// digits and spam-names: share of the data used as the test split (no official one).
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Text: tokens per text (`[CLS] … [SEP]`, padded), the BERTs' maximum positions.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Text: the WordPiece vocabulary (`vocab.txt`, BERT uncased).
    #[serde(default = "default_vocab")]
    pub vocab: PathBuf,
    /// Text: keep only the vocabulary's first `vocab_size` tokens (BERT's `vocab.txt` lists
    /// the special tokens, the characters, then word pieces by frequency): a causal LM's
    /// output layer is vocabulary-sized. Absent: the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// `[[models]]` jobs: the input, from the models' `config.json` (filled when the config
    /// is loaded, never written by hand).
    #[serde(default)]
    pub models_input: Option<ModelsInput>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: default_dataset(),
            path: None,
            val_fraction: default_val_fraction(),
            test_fraction: default_test_fraction(),
            max_tokens: default_max_tokens(),
            vocab: default_vocab(),
            vocab_size: None,
            models_input: None,
        }
    }
}

fn default_dataset() -> Dataset {
    Dataset::Models
}
fn default_max_tokens() -> usize {
    64
}
fn default_vocab() -> PathBuf {
    PathBuf::from("data/all-MiniLM-L6-v2/vocab.txt")
}

fn default_val_fraction() -> f64 {
    0.15
}
fn default_test_fraction() -> f64 {
    0.2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    pub classes: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Which kind of original model the job trains and merges.
    #[serde(default)]
    pub arch: Arch,
    /// MLP: widths of the body's hidden layers (ReLU after each).
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// ViT: the shape of the originals `fsmerge train` builds (HF ViT layout).
    #[serde(default)]
    pub vit: VitShape,
    /// BERT: the shape of the originals `fsmerge train` builds (HF BERT layout).
    #[serde(default)]
    pub bert: BertShape,
    /// Llama: the shape of the decoders `fsmerge train` builds (HF Llama layout).
    #[serde(default)]
    pub llama: LlamaShape,
}

/// The originals' architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    #[default]
    Mlp,
    /// A Hugging Face `ViTForImageClassification` (pre-LN transformer).
    Vit,
    /// A Hugging Face `BertForSequenceClassification` (post-LN transformer) on text.
    Bert,
    /// A Llama-family decoder (`LlamaForSequenceClassification`; Mistral, Qwen2) on text.
    Llama,
}

impl Arch {
    /// Whether the originals read text (token ids), not images.
    pub fn reads_text(self) -> bool {
        matches!(self, Arch::Bert | Arch::Llama)
    }
}

/// A small Llama for the text tasks: width, depth, query and key/value heads (grouped-query
/// attention when fewer), SwiGLU intermediate size, RoPE base.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaShape {
    #[serde(default = "default_vit_width")]
    pub width: usize,
    #[serde(default = "default_bert_layers")]
    pub layers: usize,
    #[serde(default = "default_vit_heads")]
    pub heads: usize,
    #[serde(default = "default_kv_heads")]
    pub kv_heads: usize,
    #[serde(default = "default_vit_mlp")]
    pub mlp_dim: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// What the decoders are: sequence classifiers (`classify`), or causal language models
    /// of their task's texts (`lm`), scored by per-domain perplexity.
    #[serde(default)]
    pub objective: Objective,
}

/// What a job's originals are trained for and scored by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Class logits of each task's head (accuracy, fidelity of the predicted class).
    #[default]
    Classify,
    /// Next-token prediction over each task's texts (per-domain perplexity, next-token
    /// accuracy and agreement): a Llama `…ForCausalLM` per task.
    Lm,
}

fn default_kv_heads() -> usize {
    2
}
fn default_rope_theta() -> f64 {
    10000.0
}

impl Default for LlamaShape {
    fn default() -> Self {
        Self {
            width: default_vit_width(),
            layers: default_bert_layers(),
            heads: default_vit_heads(),
            kv_heads: default_kv_heads(),
            mlp_dim: default_vit_mlp(),
            rope_theta: default_rope_theta(),
            objective: Objective::Classify,
        }
    }
}

impl LlamaShape {
    /// Check the shape and return the width: key/value heads divide the heads, an even
    /// head size (RoPE rotates pairs), a positive RoPE base.
    fn check(&self) -> Result<usize> {
        let width = encoder_shape("llama", self.width, self.layers, self.heads, self.mlp_dim)?;
        count_in(self.kv_heads, 1024, "model.llama.kv_heads")?;
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::field(
                "model.llama.kv_heads",
                format!("{} does not divide heads {}", self.kv_heads, self.heads),
            ));
        }
        if !(width / self.heads).is_multiple_of(2) {
            return Err(Error::field(
                "model.llama.width",
                format!(
                    "head size {} (width / heads) must be even for RoPE",
                    width / self.heads
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(Error::field(
                "model.llama.rope_theta",
                format!("must be a finite number above 1, got {}", self.rope_theta),
            ));
        }
        Ok(width)
    }
}

/// A small BERT for the text tasks: width, depth, heads, intermediate (MLP) size.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertShape {
    #[serde(default = "default_vit_width")]
    pub width: usize,
    #[serde(default = "default_bert_layers")]
    pub layers: usize,
    #[serde(default = "default_vit_heads")]
    pub heads: usize,
    #[serde(default = "default_vit_mlp")]
    pub mlp_dim: usize,
}

fn default_bert_layers() -> usize {
    2
}

impl Default for BertShape {
    fn default() -> Self {
        Self {
            width: default_vit_width(),
            layers: default_bert_layers(),
            heads: default_vit_heads(),
            mlp_dim: default_vit_mlp(),
        }
    }
}

impl BertShape {
    /// Check the shape and return the width.
    fn check(&self) -> Result<usize> {
        encoder_shape("bert", self.width, self.layers, self.heads, self.mlp_dim)
    }
}

/// Check a transformer's shape in `[model.<section>]`: every size ≥ 1, width a multiple of the
/// heads. Returns the width.
fn encoder_shape(
    section: &str,
    width: usize,
    layers: usize,
    heads: usize,
    mlp: usize,
) -> Result<usize> {
    for (v, f, max) in [
        (width, "width", 1 << 16),
        (layers, "layers", 1024),
        (heads, "heads", 1024),
        (mlp, "mlp_dim", 1 << 18),
    ] {
        count_in(v, max, &format!("model.{section}.{f}"))?;
    }
    if !width.is_multiple_of(heads) {
        return Err(Error::field(
            format!("model.{section}.width"),
            format!("{width} is not a multiple of heads {heads}"),
        ));
    }
    Ok(width)
}

/// A small ViT for 28×28 grey images: patch size, width, depth, heads, MLP hidden size.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitShape {
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_vit_width")]
    pub width: usize,
    #[serde(default = "default_vit_layers")]
    pub layers: usize,
    #[serde(default = "default_vit_heads")]
    pub heads: usize,
    #[serde(default = "default_vit_mlp")]
    pub mlp_dim: usize,
}

fn default_patch() -> usize {
    7
}
fn default_vit_width() -> usize {
    64
}
fn default_vit_layers() -> usize {
    4
}
fn default_vit_heads() -> usize {
    4
}
fn default_vit_mlp() -> usize {
    128
}

impl VitShape {
    /// Check the shape against the images' side and return the width.
    fn check(&self, side: usize) -> Result<usize> {
        if self.patch_size == 0 || !side.is_multiple_of(self.patch_size) {
            return Err(Error::field(
                "model.vit.patch_size",
                format!("must divide the image side {side}, got {}", self.patch_size),
            ));
        }
        encoder_shape("vit", self.width, self.layers, self.heads, self.mlp_dim)
    }
}

impl Default for VitShape {
    fn default() -> Self {
        Self {
            patch_size: default_patch(),
            width: default_vit_width(),
            layers: default_vit_layers(),
            heads: default_vit_heads(),
            mlp_dim: default_vit_mlp(),
        }
    }
}

fn default_hidden() -> Vec<usize> {
    vec![256, 256, 256]
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Mlp,
            hidden: default_hidden(),
            vit: VitShape::default(),
            bert: BertShape::default(),
            llama: LlamaShape::default(),
        }
    }
}

/// How the original models are trained (`fsmerge train`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "default_train_epochs")]
    pub epochs: usize,
    #[serde(default = "default_train_lr")]
    pub lr: f64,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Where the originals live; default `<output>/originals`.
    #[serde(default)]
    pub models_dir: Option<PathBuf>,
}

fn default_train_epochs() -> usize {
    5
}
fn default_train_lr() -> f64 {
    1e-3
}
fn default_batch() -> usize {
    128
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: default_train_epochs(),
            lr: default_train_lr(),
            batch_size: default_batch(),
            models_dir: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Local,
    Global,
    LocalThenGlobal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MuType {
    Diagonal,
    LowRank,
    DiagonalAndLowRank,
    Full,
    /// Transformers: per-(model, head) d_h×d_h blocks and head-mixing scalars for the attention
    /// M/U (method.md §5.6, `first` init only); every other M/U is `diagonal_and_low_rank`.
    AttHeads,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    First,
    Average,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// Each input supervises only its own task's model (the authors' code).
    Own,
    /// Every model's features on every input (the paper's figure).
    All,
}

/// How the global step is computed: `fold` forms W* = Σ M W U and runs one plain network
/// (architecture.md §5); `literal` runs the n-branch SuperNet. Same function and gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepForm {
    Fold,
    Literal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Random shift: reflect-pad by this many pixels, then crop back.
    #[serde(default = "default_shift")]
    pub shift: usize,
    /// Horizontal flips (meaningful for clothes, not for digits).
    #[serde(default)]
    pub flip: bool,
    /// Std of additive Gaussian noise, in normalized units.
    #[serde(default = "default_noise")]
    pub noise_std: f64,
    #[serde(default = "default_mixup")]
    pub mixup_alpha: f64,
    #[serde(default = "default_cutmix")]
    pub cutmix_alpha: f64,
    /// Probability of cutmix instead of mixup for a batch.
    #[serde(default = "default_switch")]
    pub switch_prob: f64,
    /// Images mixed together per mixup/cutmix batch (same task).
    #[serde(default = "default_batch")]
    pub mix_batch: usize,
}

fn default_shift() -> usize {
    2
}
fn default_noise() -> f64 {
    0.1
}
fn default_mixup() -> f64 {
    0.8
}
fn default_cutmix() -> f64 {
    1.0
}
fn default_switch() -> f64 {
    0.5
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            shift: default_shift(),
            flip: false,
            noise_std: default_noise(),
            mixup_alpha: default_mixup(),
            cutmix_alpha: default_cutmix(),
            switch_prob: default_switch(),
            mix_batch: default_batch(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default = "default_mu_type")]
    pub mu_type: MuType,
    #[serde(default = "default_rank")]
    pub rank: usize,
    #[serde(default = "default_init")]
    pub init: Init,
    #[serde(default = "default_targets")]
    pub targets: Targets,
    /// Epochs of the main phase (local or global).
    #[serde(default = "default_merge_epochs")]
    pub epochs: usize,
    /// Epochs of the global phase after local in `local-then-global`.
    #[serde(default = "default_global_epochs")]
    pub global_epochs: usize,
    #[serde(default = "default_merge_lr")]
    pub lr: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Original (unaugmented) merge inputs per task, from the training split.
    #[serde(default = "default_n_originals")]
    pub n_originals: usize,
    /// Augmented copies per task.
    #[serde(default = "default_n_augmented")]
    pub n_augmented: usize,
    #[serde(default = "default_step_form")]
    pub step_form: StepForm,
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Transformers, global training: blocks whose attention-branch outputs are reconstructed
    /// too (method.md §9.2, `rec_with_inner_att_ids`, l1-scaled); empty = output loss only.
    #[serde(default)]
    pub inner_layers: Vec<usize>,
    /// Weight w_l of each inner-feature term.
    #[serde(default = "default_inner_weight")]
    pub inner_weight: f64,
    /// Transformers, local mode: weight of the term that keeps the shared residual merge and
    /// unmerge consistent (M_res·U_res ≈ I on the merged stream).
    #[serde(default = "default_inner_weight")]
    pub res_consistency: f64,
    /// Where each stage keeps its teacher features: `memory`, `disk` (a memory-mapped file in
    /// the work directory, read batch by batch), `recompute` (only the stage's input stream is
    /// kept; every batch's features are recomputed by the frozen originals), or `auto` (memory
    /// unless the stage would not fit `cluster.memory_gb` with them there).
    #[serde(default)]
    pub features: Features,
    /// The precision the frozen originals and their features are stored and run in, and the
    /// merged model is written in: `fp32`, `bf16`, `fp16`; absent = the originals' own
    /// (`torch_dtype`). M/U, gradients, optimiser state and the fold stay fp32.
    #[serde(default)]
    pub precision: Option<crate::precision::Precision>,
    /// Global phase: keep no activations between a micro-batch's forward and its backward
    /// but each block's input, and recompute each block's forward (through the fold) in the
    /// backward, one block at a time: memory of one block's graph instead of the stage's for
    /// every micro-batch in flight, for one more forward.
    #[serde(default)]
    pub checkpoint_activations: bool,
}

/// `merge.features`: where the teacher features live (architecture.md §2, step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Features {
    #[default]
    Auto,
    Memory,
    Disk,
    Recompute,
}

fn default_inner_weight() -> f64 {
    1.0
}

fn default_mode() -> Mode {
    Mode::LocalThenGlobal
}
fn default_mu_type() -> MuType {
    MuType::DiagonalAndLowRank
}
fn default_rank() -> usize {
    12
}
fn default_init() -> Init {
    Init::First
}
fn default_targets() -> Targets {
    Targets::All
}
fn default_merge_epochs() -> usize {
    100
}
fn default_global_epochs() -> usize {
    50
}
fn default_merge_lr() -> f64 {
    3e-3
}
fn default_wd() -> f64 {
    1e-3
}
fn default_n_originals() -> usize {
    100
}
fn default_n_augmented() -> usize {
    800
}
fn default_step_form() -> StepForm {
    StepForm::Fold
}

impl Default for MergeConfig {
    fn default() -> Self {
        Self {
            mode: default_mode(),
            mu_type: default_mu_type(),
            rank: default_rank(),
            init: default_init(),
            targets: default_targets(),
            epochs: default_merge_epochs(),
            global_epochs: default_global_epochs(),
            lr: default_merge_lr(),
            weight_decay: default_wd(),
            batch_size: default_batch(),
            n_originals: default_n_originals(),
            n_augmented: default_n_augmented(),
            step_form: default_step_form(),
            features: Features::Auto,
            precision: None,
            checkpoint_activations: false,
            augment: AugmentConfig::default(),
            inner_layers: Vec::new(),
            inner_weight: default_inner_weight(),
            res_consistency: default_inner_weight(),
        }
    }
}

impl MergeConfig {
    /// Total training epochs of the FS-Merge run (KD gets the same).
    pub fn total_epochs(&self) -> usize {
        match self.mode {
            Mode::LocalThenGlobal => self.epochs + self.global_epochs,
            _ => self.epochs,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    Ensemble,
    First,
    Average,
    Regmean,
    Kd,
}

impl Baseline {
    /// The method's name in the results table (as in the config).
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Ensemble => "ensemble",
            Baseline::First => "first",
            Baseline::Average => "average",
            Baseline::Regmean => "regmean",
            Baseline::Kd => "kd",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselinesConfig {
    #[serde(default = "default_baselines")]
    pub methods: Vec<Baseline>,
    #[serde(default = "default_regmean_alpha")]
    pub regmean_alpha: f64,
    /// KD rescales each task's targets to this mean |value| (method.md §13).
    #[serde(default = "default_kd_scale")]
    pub kd_target_scale: f64,
}

fn default_baselines() -> Vec<Baseline> {
    vec![
        Baseline::Ensemble,
        Baseline::First,
        Baseline::Average,
        Baseline::Regmean,
        Baseline::Kd,
    ]
}
fn default_regmean_alpha() -> f64 {
    0.7
}
fn default_kd_scale() -> f64 {
    0.5
}

impl Default for BaselinesConfig {
    fn default() -> Self {
        Self {
            methods: default_baselines(),
            regmean_alpha: default_regmean_alpha(),
            kd_target_scale: default_kd_scale(),
        }
    }
}

impl JobConfig {
    /// Read, parse and validate a config file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// Like `load`, with `key.path=value` overrides (values in TOML syntax; bare words are
    /// strings) applied before validation, e.g. `merge.lr=3e-3` or `merge.mode=global`.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path, overrides)
    }

    /// `load_with` of a config file's content `text` (`path` names it in errors and gives the
    /// job's default name).
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        let err = |msg: String| Error::Config {
            file: path.to_path_buf(),
            msg,
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        for o in overrides {
            apply_override(&mut doc, o).map_err(err)?;
        }
        let mut cfg: JobConfig = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| err(e.to_string()))?;
        if cfg.data.models_input.is_some() {
            return Err(err(
                "`data.models_input` is filled from `[[models]]`, not by hand".into(),
            ));
        }
        cfg.resolve_models().map_err(|e| Error::Config {
            file: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        if cfg.name.is_empty() {
            cfg.name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("job")
                .to_string();
        }
        cfg.validate().map_err(|e| Error::Config {
            file: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Text data and BERTs go together; what does not apply to text is refused.
    fn check_text(&self) -> Result<()> {
        let text = self.data.is_text();
        if text != self.model.arch.reads_text() {
            return Err(Error::field(
                "model.arch",
                if text {
                    "text data (`spam-names`) needs `bert` or `llama` originals"
                } else {
                    "`bert` and `llama` originals need text data (`data.dataset = \"spam-names\"`)"
                },
            ));
        }
        if !text {
            return Ok(());
        }
        if !(8..=512).contains(&self.data.max_tokens) {
            return Err(Error::field(
                "data.max_tokens",
                format!("must be in 8..=512, got {}", self.data.max_tokens),
            ));
        }
        let m = &self.merge;
        if m.n_augmented > 0 {
            return Err(Error::field(
                "merge.n_augmented",
                "image augmentation does not apply to text; set it to 0",
            ));
        }
        Ok(())
    }

    /// Check every value that can be checked without data.
    pub fn validate(&self) -> Result<()> {
        self.check_name()?;
        self.check_models()?;
        self.check_tasks()?;
        self.check_data()?;
        self.check_hidden()?;
        self.check_train()?;
        self.check_merge_optimizer()?;
        self.check_text()?;
        let width = self.model_width()?;
        self.check_mu(width)?;
        self.check_inner_terms()?;
        self.check_cluster()?;
        self.check_augment()?;
        self.check_baselines()?;
        positive(self.output.max_shard_mb, "output.max_shard_mb")
    }

    /// A `[[models]]` job takes its tasks and data from its models; a built-in one names its
    /// dataset.
    fn check_models(&self) -> Result<()> {
        let listed = !self.models.is_empty();
        if listed != (self.data.dataset == Dataset::Models) {
            return Err(Error::field(
                "data.dataset",
                if listed {
                    "a job with `[[models]]` reads each model's own data; remove `data.dataset`"
                } else {
                    "missing: name a built-in dataset, or list the models with `[[models]]`"
                },
            ));
        }
        for (i, m) in self.models.iter().enumerate() {
            m.merge_data.check(&format!("models[{i}].merge_data"))?;
            if let Some(e) = &m.eval_data {
                e.check(&format!("models[{i}].eval_data"))?;
            }
        }
        if listed && self.merge.n_augmented > 0 {
            return Err(Error::field(
                "merge.n_augmented",
                "augmentation applies to the built-in grey images only; set it to 0 with `[[models]]`",
            ));
        }
        Ok(())
    }

    /// Fill a `[[models]]` job's tasks, architecture, model shape and input from the models'
    /// `config.json`; nothing to do without `[[models]]`.
    fn resolve_models(&mut self) -> Result<()> {
        if self.models.is_empty() {
            return Ok(());
        }
        if !self.tasks.is_empty() {
            return Err(Error::field(
                "tasks",
                "a job with `[[models]]` has one task per model; remove `[[tasks]]`",
            ));
        }
        let mut classes = 0;
        let mut first: Option<(ModelFacts, PathBuf)> = None;
        for (i, m) in self.models.iter().enumerate() {
            let facts = ModelFacts::read(&m.path)?;
            let k = facts.labels.len();
            self.tasks.push(TaskConfig {
                name: m.task_name(),
                classes: (classes..classes + k).collect(),
            });
            classes += k;
            match &first {
                None => first = Some((facts, m.path.clone())),
                Some((f, p)) if f.model_type != facts.model_type => {
                    return Err(Error::field(
                        format!("models[{i}].path"),
                        format!(
                            "{} is a `{}` model, {} a `{}` one: a job merges one architecture",
                            m.path.display(),
                            facts.model_type,
                            p.display(),
                            f.model_type
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let Some((facts, path)) = first else {
            return Ok(());
        };
        let c = &facts.config;
        let size = |key: &str| c[key].as_u64().map(|v| v as usize).unwrap_or(0);
        let (image_side, channels) = match facts.model_type.as_str() {
            "vit" => {
                self.model.arch = Arch::Vit;
                self.model.vit = VitShape {
                    patch_size: size("patch_size"),
                    width: size("hidden_size"),
                    layers: size("num_hidden_layers"),
                    heads: size("num_attention_heads"),
                    mlp_dim: size("intermediate_size"),
                };
                (size("image_size"), size("num_channels"))
            }
            "bert" => {
                self.model.arch = Arch::Bert;
                self.model.bert = BertShape {
                    width: size("hidden_size"),
                    layers: size("num_hidden_layers"),
                    heads: size("num_attention_heads"),
                    mlp_dim: size("intermediate_size"),
                };
                (0, 0)
            }
            "llama" | "mistral" | "qwen2" => {
                self.model.arch = Arch::Llama;
                let heads = size("num_attention_heads");
                self.model.llama = LlamaShape {
                    width: size("hidden_size"),
                    layers: size("num_hidden_layers"),
                    heads,
                    kv_heads: c["num_key_value_heads"]
                        .as_u64()
                        .map_or(heads, |v| v as usize),
                    mlp_dim: size("intermediate_size"),
                    rope_theta: c["rope_theta"].as_f64().unwrap_or(default_rope_theta()),
                    // `[[models]]` Llamas are sequence classifiers (`fsmerge check` names a
                    // model without `score.weight`); causal LMs come from `fsmerge train`.
                    objective: Objective::Classify,
                };
                (0, 0)
            }
            other => {
                return Err(Error::field(
                    "models[0].path",
                    format!(
                    "{}: model_type `{other}` is not supported (vit, bert, llama, mistral, qwen2)",
                    path.display()
                ),
                ))
            }
        };
        self.data.models_input = Some(ModelsInput {
            image_side,
            channels,
            classes,
        });
        Ok(())
    }

    /// Floats per sample of one model's stream between units, from the config's model shape
    /// (a transformer's tokens × width, an MLP's widest layer): the memory estimate's fallback
    /// when a plan does not record the models' own.
    pub fn stream_floats(&self) -> usize {
        let m = &self.model;
        match m.arch {
            Arch::Mlp => m.hidden.iter().copied().max().unwrap_or(0),
            Arch::Vit => {
                let side = self.data.image_side() / m.vit.patch_size.max(1);
                (side * side + 1) * m.vit.width
            }
            Arch::Bert => self.data.max_tokens * m.bert.width,
            Arch::Llama => self.data.max_tokens * m.llama.width,
        }
    }

    /// What the originals are trained for and scored by (only Llamas can be causal LMs).
    pub fn objective(&self) -> Objective {
        match self.model.arch {
            Arch::Llama => self.model.llama.objective,
            _ => Objective::Classify,
        }
    }

    /// The folder of task `t`'s original: its `[[models]]` path, else `<models_dir>/<task>`.
    pub fn original_dir(&self, models_dir: &Path, t: usize) -> PathBuf {
        match self.models.get(t) {
            Some(m) => m.path.clone(),
            None => models_dir.join(&self.tasks[t].name),
        }
    }

    /// Whether task `t` has labeled evaluation data: every built-in task, a `[[models]]` entry
    /// with `eval_data`. An unlabeled task is scored by fidelity alone, on held-out merge inputs.
    pub fn labeled(&self, t: usize) -> bool {
        self.models.get(t).is_none_or(|m| m.eval_data.is_some())
    }

    /// Every task's original folder, in task order.
    pub fn original_dirs(&self, models_dir: &Path) -> Vec<PathBuf> {
        (0..self.tasks.len())
            .map(|t| self.original_dir(models_dir, t))
            .collect()
    }

    /// The job name becomes a directory, so it must be a plain, visible one.
    fn check_name(&self) -> Result<()> {
        if !file_name_ok(&self.name) {
            return Err(Error::field(
                "name",
                format!(
                    "{:?} is not a usable directory name (letters, digits, `.`, `_`, `-`; not starting with `.`)",
                    self.name
                ),
            ));
        }
        at_most(self.threads, 1024, "threads")
    }

    /// Merging needs at least two distinct, well-formed tasks over existing classes.
    fn check_tasks(&self) -> Result<()> {
        if self.tasks.len() < 2 {
            return Err(Error::field(
                "tasks",
                format!("merging needs at least 2 tasks, got {}", self.tasks.len()),
            ));
        }
        let classes = self.data.num_classes();
        for (i, t) in self.tasks.iter().enumerate() {
            if !file_name_ok(&t.name) {
                return Err(Error::field(
                    format!("tasks[{i}].name"),
                    format!(
                        "{:?} is not a usable task name (letters, digits, `.`, `_`, `-`; not starting with `.`)",
                        t.name
                    ),
                ));
            }
            if self.tasks[..i].iter().any(|o| o.name == t.name) {
                return Err(Error::field(
                    format!("tasks[{i}].name"),
                    format!("task name `{}` is used twice", t.name),
                ));
            }
            if t.classes.len() < 2 {
                return Err(Error::field(
                    format!("tasks[{i}].classes"),
                    "a task needs at least 2 classes",
                ));
            }
            if let Some(c) = t.classes.iter().find(|&&c| c >= classes) {
                return Err(Error::field(
                    format!("tasks[{i}].classes"),
                    format!("class {c} does not exist (dataset has {classes})"),
                ));
            }
            let mut sorted = t.classes.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != t.classes.len() {
                return Err(Error::field(
                    format!("tasks[{i}].classes"),
                    "a class is listed twice",
                ));
            }
        }
        Ok(())
    }

    /// The validation and test splits must each take a proper fraction of the data.
    fn check_data(&self) -> Result<()> {
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return Err(Error::field(
                "data.val_fraction",
                format!("must be in (0, 1), got {}", self.data.val_fraction),
            ));
        }
        if !(self.data.test_fraction > 0.0 && self.data.test_fraction < 1.0) {
            return Err(Error::field(
                "data.test_fraction",
                format!("must be in (0, 1), got {}", self.data.test_fraction),
            ));
        }
        Ok(())
    }

    /// The hidden widths (an MLP's layers) must name at least one layer, none of width 0.
    fn check_hidden(&self) -> Result<()> {
        let h = &self.model.hidden;
        if h.is_empty() || h.len() > 1024 || h.iter().any(|&w| w == 0 || w > 1 << 20) {
            return Err(Error::field(
                "model.hidden",
                "needs 1 to 1024 layers, every width from 1 to 1048576",
            ));
        }
        Ok(())
    }

    /// Training the originals needs positive epochs, learning rate and batch size.
    fn check_train(&self) -> Result<()> {
        count_in(self.train.epochs, MAX_EPOCHS, "train.epochs")?;
        positive(self.train.lr, "train.lr")?;
        count_in(self.train.batch_size, 1 << 20, "train.batch_size")
    }

    /// The merge's own optimisation needs usable step sizes, batches and decay.
    fn check_merge_optimizer(&self) -> Result<()> {
        let m = &self.merge;
        positive(m.lr, "merge.lr")?;
        count_in(m.batch_size, 1 << 20, "merge.batch_size")?;
        count_in(m.n_originals, MAX_ROWS_PER_TASK, "merge.n_originals")?;
        at_most(m.n_augmented, MAX_ROWS_PER_TASK, "merge.n_augmented")?;
        // Every phase the mode runs trains: an untrained model is no FS-Merge result.
        count_in(m.epochs, MAX_EPOCHS, "merge.epochs")?;
        if m.mode == Mode::LocalThenGlobal {
            count_in(m.global_epochs, MAX_EPOCHS, "merge.global_epochs")?;
        }
        if m.weight_decay.is_nan() || m.weight_decay < 0.0 {
            return Err(Error::field(
                "merge.weight_decay",
                format!("must be ≥ 0, got {}", m.weight_decay),
            ));
        }
        Ok(())
    }

    /// Check the architecture's own settings and return the layer width that bounds the M/U rank.
    fn model_width(&self) -> Result<usize> {
        Ok(match self.model.arch {
            Arch::Mlp => *self.model.hidden.iter().min().unwrap_or(&0),
            Arch::Vit => self.model.vit.check(self.data.image_side())?,
            Arch::Bert => self.model.bert.check()?,
            Arch::Llama => self.model.llama.check()?,
        })
    }

    /// The M/U structure must fit the model: a usable rank, a compatible init and architecture.
    fn check_mu(&self, width: usize) -> Result<()> {
        let m = &self.merge;
        if matches!(
            m.mu_type,
            MuType::LowRank | MuType::DiagonalAndLowRank | MuType::AttHeads
        ) && (m.rank == 0 || m.rank > width)
        {
            return Err(Error::field(
                "merge.rank",
                format!(
                    "must be between 1 and the layer width {width}, got {}",
                    m.rank
                ),
            ));
        }
        if m.mu_type == MuType::LowRank && m.init != Init::Random {
            return Err(Error::field(
                "merge.init",
                format!("a pure low_rank M/U cannot express `{:?}` init (it needs a full-rank block); use `random` or mu_type `diagonal_and_low_rank`", m.init).to_lowercase(),
            ));
        }
        if m.mu_type == MuType::AttHeads {
            if self.model.arch == Arch::Mlp {
                return Err(Error::field(
                    "merge.mu_type",
                    "`att_heads` structures a transformer's attention; this job merges MLPs",
                ));
            }
            if m.init != Init::First {
                return Err(Error::field(
                    "merge.init",
                    "`att_heads` M/U support only `first` init (method.md §3.3)",
                ));
            }
        }
        Ok(())
    }

    /// Inner-feature terms exist only for a ViT's real blocks, and their weights cannot be negative.
    fn check_inner_terms(&self) -> Result<()> {
        let m = &self.merge;
        if self.model.arch == Arch::Vit {
            if let Some(l) = m.inner_layers.iter().find(|&&l| l >= self.model.vit.layers) {
                return Err(Error::field(
                    "merge.inner_layers",
                    format!(
                        "block {l} does not exist (the ViT has {})",
                        self.model.vit.layers
                    ),
                ));
            }
        } else if !m.inner_layers.is_empty() {
            return Err(Error::field(
                "merge.inner_layers",
                "inner-feature terms are defined for ViTs only (method.md §9.2: the reference code raises for BERT)",
            ));
        }
        if m.inner_weight.is_nan() || m.inner_weight < 0.0 {
            return Err(Error::field("merge.inner_weight", "must be ≥ 0"));
        }
        if m.res_consistency.is_nan() || m.res_consistency < 0.0 {
            return Err(Error::field("merge.res_consistency", "must be ≥ 0"));
        }
        Ok(())
    }

    /// The pipeline plan must fit the model, and failure detection must have sane timings.
    fn check_cluster(&self) -> Result<()> {
        let c = &self.cluster;
        count_in(c.stages, MAX_WORKERS, "cluster.stages")?;
        count_in(c.replicas, MAX_WORKERS, "cluster.replicas")?;
        count_in(c.micro_batches, MAX_WORKERS, "cluster.micro_batches")?;
        // The plan's units: an MLP's layers; a transformer's embeddings and blocks.
        let (units, what) = match self.model.arch {
            Arch::Mlp => (self.model.hidden.len(), "layers"),
            Arch::Vit => (self.model.vit.layers + 1, "units (embeddings + blocks)"),
            Arch::Bert => (self.model.bert.layers + 1, "units (embeddings + blocks)"),
            Arch::Llama => (self.model.llama.layers + 1, "units (embeddings + blocks)"),
        };
        if c.stages > units {
            return Err(Error::field(
                "cluster.stages",
                format!("{} stages but the model has only {units} {what}", c.stages),
            ));
        }
        seconds_in(c.heartbeat_secs, 0.01, 3600.0, "cluster.heartbeat_secs")?;
        seconds_in(
            c.register_timeout_secs,
            0.1,
            7.0 * 86400.0,
            "cluster.register_timeout_secs",
        )?;
        seconds_in(
            c.peer_timeout_secs,
            0.02,
            86400.0,
            "cluster.peer_timeout_secs",
        )?;
        if let Some(gb) = c.memory_gb {
            if !(0.01..=1e6).contains(&gb) {
                return Err(Error::field(
                    "cluster.memory_gb",
                    format!("must be between 0.01 and 1000000 GB, got {gb:e}"),
                ));
            }
        }
        at_most(
            usize::try_from(c.checkpoint_every_steps).unwrap_or(usize::MAX),
            1_000_000_000,
            "cluster.checkpoint_every_steps",
        )?;
        seconds_in(
            c.collective_timeout_secs,
            0.1,
            86400.0,
            "cluster.collective_timeout_secs",
        )?;
        if c.peer_timeout_secs < 2.0 * c.heartbeat_secs {
            return Err(Error::field(
                "cluster.peer_timeout_secs",
                format!(
                    "must be at least twice `cluster.heartbeat_secs` ({}), got {}",
                    c.heartbeat_secs, c.peer_timeout_secs
                ),
            ));
        }
        Ok(())
    }

    /// Augmentation strengths and probabilities must be meaningful, and mixing needs pairs.
    fn check_augment(&self) -> Result<()> {
        let a = &self.merge.augment;
        if [a.noise_std, a.mixup_alpha, a.cutmix_alpha]
            .iter()
            .any(|v| v.is_nan() || *v < 0.0)
        {
            return Err(Error::field(
                "merge.augment",
                "noise_std, mixup_alpha and cutmix_alpha must be ≥ 0",
            ));
        }
        if !(0.0..=1.0).contains(&a.switch_prob) {
            return Err(Error::field(
                "merge.augment.switch_prob",
                format!("must be in [0, 1], got {}", a.switch_prob),
            ));
        }
        if a.mix_batch < 2 || !a.mix_batch.is_multiple_of(2) {
            return Err(Error::field(
                "merge.augment.mix_batch",
                format!("must be an even number ≥ 2, got {}", a.mix_batch),
            ));
        }
        Ok(())
    }

    /// The baselines' knobs must lie in the ranges their methods are defined on.
    fn check_baselines(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.baselines.regmean_alpha) {
            return Err(Error::field(
                "baselines.regmean_alpha",
                format!("must be in [0, 1], got {}", self.baselines.regmean_alpha),
            ));
        }
        positive(self.baselines.kd_target_scale, "baselines.kd_target_scale")
    }
}

fn apply_override(doc: &mut toml::Table, o: &str) -> std::result::Result<(), String> {
    let (key, raw) = o
        .split_once('=')
        .ok_or_else(|| format!("override `{o}` is not KEY=VALUE"))?;
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("override `{o}`: `{p}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// A count from 1 to `max`: 0 would silently skip a step, a huge one would exhaust memory or
/// wrap an arithmetic step count.
fn count_in(v: usize, max: usize, field: &str) -> Result<()> {
    if v == 0 || v > max {
        return Err(Error::field(
            field,
            format!("must be between 1 and {max}, got {v}"),
        ));
    }
    Ok(())
}

/// A count from 0 to `max`.
fn at_most(v: usize, max: usize, field: &str) -> Result<()> {
    if v > max {
        return Err(Error::field(
            field,
            format!("must be at most {max}, got {v}"),
        ));
    }
    Ok(())
}

/// Seconds in [`min`, `max`]: `Duration` and `Instant` arithmetic cannot overflow, and no
/// timer spins.
fn seconds_in(v: f64, min: f64, max: f64, field: &str) -> Result<()> {
    if !(min..=max).contains(&v) {
        return Err(Error::field(
            field,
            // `{:e}` above a million, so that 1e300 is not printed as 301 digits.
            format!(
                "must be between {min} and {max} seconds, got {}",
                if v.abs() >= 1e6 {
                    format!("{v:e}")
                } else {
                    v.to_string()
                }
            ),
        ));
    }
    Ok(())
}

/// A name that becomes a file or directory name: letters, digits, `.`, `_`, `-`, not starting
/// with `.`, at most 100 characters.
fn file_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Upper bound of epochs in any phase.
pub const MAX_EPOCHS: usize = 100_000;
/// Upper bound of merge inputs per task (originals, and augmented copies).
pub const MAX_ROWS_PER_TASK: usize = 1_000_000;
/// Upper bound of stages, replicas and micro-batches.
pub const MAX_WORKERS: usize = 4096;

fn positive(v: f64, field: &str) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(Error::field(field, format!("must be > 0, got {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [data]
        dataset = "digits"
        [[tasks]]
        name = "a"
        classes = [0, 1, 2, 3, 4]
        [[tasks]]
        name = "b"
        classes = [5, 6, 7, 8, 9]
    "#;

    fn load(extra: &str) -> Result<JobConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.toml");
        std::fs::write(&p, format!("{BASE}\n{extra}")).unwrap();
        JobConfig::load(&p)
    }

    #[test]
    fn defaults_and_name_from_file() {
        let c = load("").unwrap();
        assert_eq!(c.name, "job");
        assert_eq!(c.merge.mu_type, MuType::DiagonalAndLowRank);
        assert_eq!(c.merge.n_originals, 100);
        assert_eq!(c.merge.n_augmented, 800);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load("[merge]\nrnak = 3").unwrap_err().to_string();
        assert!(e.contains("rnak") && e.contains("job.toml"), "{e}");
    }

    #[test]
    fn rank_larger_than_width() {
        let e = load("[merge]\nrank = 300").unwrap_err().to_string();
        assert!(e.contains("merge.rank") && e.contains("256"), "{e}");
    }

    #[test]
    fn low_rank_first_is_refused() {
        let e = load("[merge]\nmu_type = \"low_rank\"\ninit = \"first\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("merge.init") && e.contains("low_rank"), "{e}");
        assert!(load("[merge]\nmu_type = \"low_rank\"\ninit = \"random\"").is_ok());
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("job.toml");
        std::fs::write(&p, BASE).unwrap();
        let c = JobConfig::load_with(
            &p,
            &[
                "merge.lr=3e-3".into(),
                "merge.mode=global".into(),
                "seed=4".into(),
            ],
        )
        .unwrap();
        assert_eq!((c.merge.lr, c.merge.mode, c.seed), (3e-3, Mode::Global, 4));
        let e = JobConfig::load_with(&p, &["merge.bogus=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn vit_shape_and_att_heads_are_checked() {
        let vit = "[model]\narch = \"vit\"\n[model.vit]\npatch_size = 4";
        let c = load(&format!("{vit}\n[merge]\nmu_type = \"att_heads\"")).unwrap();
        assert_eq!((c.model.arch, c.model.vit.width), (Arch::Vit, 64));
        let e = load(&format!("{vit}\nwidth = 66")).unwrap_err().to_string();
        assert!(e.contains("model.vit.width"), "{e}");
        // Digits are 8×8: patch 7 does not tile them.
        let e = load("[model]\narch = \"vit\"").unwrap_err().to_string();
        assert!(e.contains("model.vit.patch_size") && e.contains('8'), "{e}");
        let e = load("[merge]\nmu_type = \"att_heads\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("merge.mu_type"), "{e}");
        let e = load(&format!("{vit}\n[merge]\ninner_layers = [4]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("merge.inner_layers"), "{e}");
    }

    #[test]
    fn llama_shape_is_checked_by_field() {
        let job = |llama: &str| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("job.toml");
            let text = format!(
                "[data]\ndataset = \"spam-names\"\n[[tasks]]\nname = \"spam\"\nclasses = [0, 1]\n\
                 [[tasks]]\nname = \"names\"\nclasses = [2, 3]\n\
                 [model]\narch = \"llama\"\n[model.llama]\n{llama}\n[merge]\nn_augmented = 0"
            );
            std::fs::write(&p, text).unwrap();
            JobConfig::load(&p)
        };
        let c = job("").unwrap();
        assert_eq!((c.model.arch, c.model.llama.kv_heads), (Arch::Llama, 2));
        assert_eq!(c.stream_floats(), 64 * 64);
        for (shape, field) in [
            ("kv_heads = 3", "model.llama.kv_heads"),
            ("width = 60\nheads = 4", "model.llama.width"),
            ("width = 66", "model.llama.width"),
            ("rope_theta = 0.5", "model.llama.rope_theta"),
        ] {
            let e = job(shape).unwrap_err().to_string();
            assert!(e.contains(field), "{shape}: {e}");
        }
    }

    #[test]
    fn bad_class_and_duplicate_task() {
        let e = load("[[tasks]]\nname = \"a\"\nclasses = [1, 2]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tasks[2].name"), "{e}");
        let e = load("[[tasks]]\nname = \"c\"\nclasses = [1, 12]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tasks[2].classes") && e.contains("12"), "{e}");
    }

    #[test]
    fn counts_durations_and_names_are_bounded() {
        let cases = [
            ("[merge]\nepochs = 0", "merge.epochs"),
            (
                "[merge]\nmode = \"local-then-global\"\nglobal_epochs = 0",
                "merge.global_epochs",
            ),
            ("[merge]\nn_augmented = 1000000000", "merge.n_augmented"),
            ("[merge]\nepochs = 1000000000", "merge.epochs"),
            (
                "[cluster]\nheartbeat_secs = 1e300",
                "cluster.heartbeat_secs",
            ),
            ("[cluster]\nheartbeat_secs = 1e-9", "cluster.heartbeat_secs"),
            (
                "[cluster]\nregister_timeout_secs = 1e19",
                "cluster.register_timeout_secs",
            ),
            (
                "[cluster]\npeer_timeout_secs = nan",
                "cluster.peer_timeout_secs",
            ),
            (
                "[cluster]\ncollective_timeout_secs = 1e12",
                "cluster.collective_timeout_secs",
            ),
            ("[cluster]\nstages = 100000", "cluster.stages"),
            ("threads = 100000", "threads"),
            ("[model]\nhidden = [0]", "model.hidden"),
            (
                "[[tasks]]\nname = \"..\"\nclasses = [1, 2]",
                "tasks[2].name",
            ),
            (
                "[[tasks]]\nname = \"x\\ny\"\nclasses = [1, 2]",
                "tasks[2].name",
            ),
        ];
        for (extra, field) in cases {
            // `threads` is a top-level key: it must come before the first table.
            let e = if extra.starts_with("threads") {
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("job.toml");
                std::fs::write(&p, format!("{extra}\n{BASE}")).unwrap();
                JobConfig::load(&p)
            } else {
                load(extra)
            };
            let e = e.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(field), "{extra:?}: {e}");
        }
    }
}
