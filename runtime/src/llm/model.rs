//! The LLaMA-family causal language model: weights, full-sequence f32 forward, and named access to its linear layers.

use super::config::LlamaConfig;
use super::error::{Result, RuntimeError};
use super::tokenizer::TextTokenizer;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

/// The seven linear layers of one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// All projections in the order the block uses them.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The Hugging Face module path inside a block (`self_attn.q_proj`, `mlp.down_proj`, ...).
    pub fn hf_module(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// The activation this projection reads; projections with the same input share statistics.
    pub fn input(self) -> LinearInput {
        match self {
            Proj::Q | Proj::K | Proj::V => LinearInput::Attention,
            Proj::O => LinearInput::AttentionOutput,
            Proj::Gate | Proj::Up => LinearInput::Mlp,
            Proj::Down => LinearInput::MlpDown,
        }
    }
}

/// The Hugging Face parameter name of a block's linear weight, e.g. `model.layers.3.mlp.up_proj.weight`.
pub fn linear_name(layer: usize, proj: Proj) -> String {
    format!("model.layers.{layer}.{}.weight", proj.hf_module())
}

/// The four distinct inputs of a block's linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearInput {
    /// Normalised residual stream read by q, k and v.
    Attention,
    /// Concatenated head outputs read by o.
    AttentionOutput,
    /// Normalised residual stream read by gate and up.
    Mlp,
    /// `silu(gate) * up`, read by down.
    MlpDown,
}

impl LinearInput {
    /// All four, in the order the block computes them.
    pub const ALL: [LinearInput; 4] = [
        LinearInput::Attention,
        LinearInput::AttentionOutput,
        LinearInput::Mlp,
        LinearInput::MlpDown,
    ];
}

/// A linear layer's weight: f32 (prunable) or a quantized tensor run by candle's quantized kernels.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(std::sync::Arc<QMatMul>),
}

impl LinearWeight {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            LinearWeight::Dense(w) => crate::gemm::matmul(x, &w.to_dtype(DType::F32)?.t()?)?,
            LinearWeight::Quantized(q) => q.forward(x)?,
        })
    }
}

/// Which RoPE convention the q/k weights follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Hugging Face layout: rotate the first half of each head against the second half.
    HalfSplit,
    /// llama.cpp / GGUF layout: rotate adjacent pairs (2i, 2i+1).
    AdjacentPairs,
}

/// The attention parameters only some architectures have (f32).
#[derive(Debug, Clone, Default)]
pub struct AttnExtras {
    /// Biases of the q, k and v projections (Qwen2).
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    /// RMSNorm weights applied to each q and k head before RoPE (Qwen3).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// The output projection's bias (`attention_bias`).
    pub o_bias: Option<Tensor>,
    /// The feed-forward biases (`mlp_bias`).
    pub gate_bias: Option<Tensor>,
    pub up_bias: Option<Tensor>,
    pub down_bias: Option<Tensor>,
}

impl AttnExtras {
    /// Each present parameter under its Hugging Face name suffix inside a block.
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        [
            ("self_attn.q_proj.bias", &self.q_bias),
            ("self_attn.k_proj.bias", &self.k_bias),
            ("self_attn.v_proj.bias", &self.v_bias),
            ("self_attn.q_norm.weight", &self.q_norm),
            ("self_attn.k_norm.weight", &self.k_norm),
            ("self_attn.o_proj.bias", &self.o_bias),
            ("mlp.gate_proj.bias", &self.gate_bias),
            ("mlp.up_proj.bias", &self.up_bias),
            ("mlp.down_proj.bias", &self.down_bias),
        ]
        .into_iter()
        .filter_map(|(n, t)| t.as_ref().map(|t| (n, t)))
        .collect()
    }
}

/// One transformer block's parameters.
///
/// Linear weights keep the dtype they were stored in (f32, or bf16/f16 from a
/// Hugging Face checkpoint, widened to f32 only while the block runs); norms
/// and biases are f32.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Tensor,
    pub q: LinearWeight,
    pub k: LinearWeight,
    pub v: LinearWeight,
    pub o: LinearWeight,
    pub ffn_norm: Tensor,
    pub gate: LinearWeight,
    pub up: LinearWeight,
    pub down: LinearWeight,
    pub extra: AttnExtras,
    /// The experts that replace the dense MLP in a mixture-of-experts block
    /// (its `gate`, `up` and `down` are then empty and not parameters).
    pub moe: Option<MoeBlock>,
}

/// A mixture-of-experts feed-forward block: a router (`experts x hidden`)
/// and the experts, each a SwiGLU MLP of its own width.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    pub router: Tensor,
    pub experts: Vec<Expert>,
}

/// One expert: `down(silu(gate x) * up x)`; row `i` of `gate` and `up` with
/// column `i` of `down` is its atomic expert `i`.
#[derive(Debug, Clone)]
pub struct Expert {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl Expert {
    /// Its intermediate width (atomic experts).
    pub fn width(&self) -> usize {
        self.gate.dims().first().copied().unwrap_or(0)
    }
}

/// The projections of a block's attention.
pub const ATTENTION: [Proj; 4] = [Proj::Q, Proj::K, Proj::V, Proj::O];

impl Block {
    /// The block's linear layers: all seven, or the attention's four in a
    /// mixture-of-experts block (its experts are not among them).
    pub fn projs(&self) -> &'static [Proj] {
        if self.moe.is_some() {
            &ATTENTION
        } else {
            &Proj::ALL
        }
    }

    /// The weight of one projection.
    pub fn linear(&self, proj: Proj) -> &LinearWeight {
        match proj {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }

    /// Replaces a projection's weight whatever its shape (removing units
    /// changes shapes together with the configuration).
    pub(crate) fn set_linear_unchecked(&mut self, proj: Proj, w: LinearWeight) {
        *self.linear_mut(proj) = w;
    }

    fn linear_mut(&mut self, proj: Proj) -> &mut LinearWeight {
        match proj {
            Proj::Q => &mut self.q,
            Proj::K => &mut self.k,
            Proj::V => &mut self.v,
            Proj::O => &mut self.o,
            Proj::Gate => &mut self.gate,
            Proj::Up => &mut self.up,
            Proj::Down => &mut self.down,
        }
    }
}

/// A LLaMA-family causal language model held in memory (f32 weights on the CPU).
#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    /// The tokenizer that came with the model, if any.
    pub tokenizer: Option<TextTokenizer>,
    pub(crate) embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Tensor,
    /// `None` when the output projection is tied to the embedding.
    pub(crate) lm_head: Option<LinearWeight>,
    /// Quantized output projection used by the reference path (tied to a quantized embedding).
    pub(crate) lm_head_quantized: Option<std::sync::Arc<QMatMul>>,
    pub(crate) rope: RopeStyle,
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain values (positions x head_dim/2), for the slice forward.
    pub(crate) cos_v: Vec<f32>,
    pub(crate) sin_v: Vec<f32>,
    /// Weights packed for the slice forward's products.
    pub(crate) packs: super::forward::Packs,
    /// Where a Hugging Face checkpoint came from, for an export like it.
    pub hf_source: Option<super::hf::HfSource>,
    /// Linear layers pruned by ARMOR, by name: the layer computes
    /// `A (S ∘ M) B` (stored as its weight); `S` is what it holds as pruned.
    pub(crate) armor: std::collections::BTreeMap<String, ArmorWrap>,
}

/// The factors of an ARMOR layer: its sparse core and block-diagonal
/// wrappers (`blocks` square blocks of `block x block`, row-major).
#[derive(Debug, Clone)]
pub struct ArmorWrap {
    pub s: Tensor,
    pub a: Tensor,
    pub b: Tensor,
}

/// Receives a mixture-of-experts block's output `(layer, output, what each
/// expert saw)` and returns what the block adds to the residual stream.
pub(crate) type MoeTap<'a> =
    &'a mut dyn FnMut(usize, Tensor, Vec<super::moe::ExpertRecord>) -> Result<Tensor>;

/// Called with every linear-layer input during a block forward, as a (tokens, features) matrix.
pub type ActivationSink<'a> = &'a mut dyn FnMut(LinearInput, &Tensor) -> Result<()>;

impl LlamaModel {
    /// Assembles a model from its parts and checks every shape against the configuration.
    pub(crate) fn from_parts(
        config: LlamaConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: Tensor,
        lm_head: Option<LinearWeight>,
        rope: RopeStyle,
    ) -> Result<Self> {
        let c = &config;
        let (d, hd) = (c.hidden_size, c.head_dim());
        let (qd, kv) = (c.q_dim(), c.kv_dim());
        check_shape("model.embed_tokens.weight", &embed, &[c.vocab_size, d])?;
        check_shape("model.norm.weight", &norm, &[d])?;
        if blocks.len() != c.num_hidden_layers {
            return Err(RuntimeError::Invalid(format!(
                "config says {} layers but {} blocks were loaded",
                c.num_hidden_layers,
                blocks.len()
            )));
        }
        for (l, b) in blocks.iter().enumerate() {
            check_shape(
                &format!("model.layers.{l}.input_layernorm.weight"),
                &b.attn_norm,
                &[d],
            )?;
            check_shape(
                &format!("model.layers.{l}.post_attention_layernorm.weight"),
                &b.ffn_norm,
                &[d],
            )?;
            if b.moe.is_some() != c.is_sparse(l) {
                return Err(RuntimeError::Invalid(format!(
                    "block {l} {} experts but the configuration says it {}",
                    if b.moe.is_some() { "holds" } else { "holds no" },
                    if c.is_sparse(l) { "does" } else { "does not" },
                )));
            }
            if let (Some(moe), Some(mc)) = (&b.moe, &c.moe) {
                check_moe(l, moe, mc, d)?;
            }
            for &proj in b.projs() {
                let expected = match proj {
                    Proj::Q => [qd, d],
                    Proj::O => [d, qd],
                    Proj::K | Proj::V => [kv, d],
                    Proj::Gate | Proj::Up => [c.intermediate_size, d],
                    Proj::Down => [d, c.intermediate_size],
                };
                if let LinearWeight::Dense(w) = b.linear(proj) {
                    check_shape(&linear_name(l, proj), w, &expected)?;
                }
            }
            let arch = c.architecture;
            let e = &b.extra;
            let (qkv, ob, mb) = (c.has_qkv_bias(), c.attention_bias, c.mlp_bias);
            let inter = c.intermediate_size;
            let want: [(&str, &Option<Tensor>, bool, usize); 9] = [
                ("self_attn.q_proj.bias", &e.q_bias, qkv, qd),
                ("self_attn.k_proj.bias", &e.k_bias, qkv, kv),
                ("self_attn.v_proj.bias", &e.v_bias, qkv, kv),
                ("self_attn.q_norm.weight", &e.q_norm, arch.qk_norm(), hd),
                ("self_attn.k_norm.weight", &e.k_norm, arch.qk_norm(), hd),
                ("self_attn.o_proj.bias", &e.o_bias, ob, d),
                ("mlp.gate_proj.bias", &e.gate_bias, mb, inter),
                ("mlp.up_proj.bias", &e.up_bias, mb, inter),
                ("mlp.down_proj.bias", &e.down_bias, mb, d),
            ];
            for (suffix, t, needed, len) in want {
                let name = format!("model.layers.{l}.{suffix}");
                match (t, needed) {
                    (Some(t), true) => check_shape(&name, t, &[len])?,
                    (None, false) => {}
                    (Some(_), false) => {
                        return Err(RuntimeError::Invalid(format!(
                            "`{name}` does not belong to a {} model",
                            arch.class_name()
                        )))
                    }
                    (None, true) => {
                        return Err(RuntimeError::Invalid(format!(
                            "a {} model needs `{name}`",
                            arch.class_name()
                        )))
                    }
                }
            }
        }
        if let Some(LinearWeight::Dense(w)) = &lm_head {
            check_shape("lm_head.weight", w, &[c.vocab_size, d])?;
        }
        let (cos, sin) = rope_tables(c, embed.device())?;
        let (cos_v, sin_v) = (
            cos.flatten_all()?.to_vec1::<f32>()?,
            sin.flatten_all()?.to_vec1::<f32>()?,
        );
        Ok(LlamaModel {
            config,
            tokenizer: None,
            embed,
            blocks,
            norm,
            lm_head,
            lm_head_quantized: None,
            rope,
            cos,
            sin,
            cos_v,
            sin_v,
            packs: Default::default(),
            hf_source: None,
            armor: Default::default(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Number of transformer blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The token embedding (vocab, hidden).
    pub fn embedding(&self) -> &Tensor {
        &self.embed
    }

    /// Keeps only the first `layers` blocks (a smaller model for quick experiments and tests).
    pub fn truncate_layers(&mut self, layers: usize) {
        self.blocks.truncate(layers);
        self.config.num_hidden_layers = self.blocks.len();
        if let Some(m) = self.config.moe.as_mut() {
            m.sparse.truncate(layers);
        }
        let kept: std::collections::BTreeSet<String> = self.linear_names().into_iter().collect();
        self.armor.retain(|name, _| kept.contains(name));
    }

    /// Names of every block linear weight, in model order.
    pub fn linear_names(&self) -> Vec<String> {
        self.blocks
            .iter()
            .enumerate()
            .flat_map(|(l, b)| b.projs().iter().map(move |&p| linear_name(l, p)))
            .collect()
    }

    /// The weight (out, in) of a block's linear layer, widened to f32 when
    /// stored narrower.
    pub fn linear_weight(&self, layer: usize, proj: Proj) -> Result<Tensor> {
        Ok(self.stored_linear(layer, proj)?.to_dtype(DType::F32)?)
    }

    /// The weight of a block's linear layer in the dtype it is stored in.
    pub fn stored_linear(&self, layer: usize, proj: Proj) -> Result<&Tensor> {
        let block = self.blocks.get(layer).ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "layer {layer} does not exist (model has {})",
                self.blocks.len()
            ))
        })?;
        match block.linear(proj) {
            LinearWeight::Dense(w) => Ok(w),
            LinearWeight::Quantized(_) => Err(RuntimeError::Invalid(format!(
                "`{}` is quantized; load the model dequantized to prune it",
                linear_name(layer, proj)
            ))),
        }
    }

    /// Replaces the weight of a block's linear layer; the shape must not
    /// change, and the weight is stored in the layer's dtype (a bf16 model
    /// stays bf16, as its export will be).
    pub fn set_linear_weight(&mut self, layer: usize, proj: Proj, weight: Tensor) -> Result<()> {
        let old = self.stored_linear(layer, proj)?;
        check_shape(&linear_name(layer, proj), &weight, old.dims())?;
        let weight = weight.to_dtype(old.dtype())?.contiguous()?;
        *self.blocks[layer].linear_mut(proj) = LinearWeight::Dense(weight);
        self.armor.remove(&linear_name(layer, proj));
        Ok(())
    }

    /// Makes a block linear an ARMOR layer: it computes `A S B` (held as its
    /// weight, for every forward), and reports `S` as its weight with the
    /// wrappers beside it (`.armor_a`, `.armor_b`).
    pub fn set_armor(
        &mut self,
        layer: usize,
        proj: Proj,
        armor: &super::armor::Armor,
    ) -> Result<()> {
        let device = self.device().clone();
        let (rows, cols, k) = (armor.rows, armor.cols, armor.block);
        let dtype = self.stored_linear(layer, proj)?.dtype();
        let effective = Tensor::from_vec(armor.effective(), (rows, cols), &device)?;
        self.set_linear_weight(layer, proj, effective)?;
        let s = Tensor::from_vec(armor.s.clone(), (rows, cols), &device)?.to_dtype(dtype)?;
        let a = Tensor::from_vec(armor.a.clone(), (rows / k, k, k), &device)?.to_dtype(dtype)?;
        let b = Tensor::from_vec(armor.b.clone(), (cols / k, k, k), &device)?.to_dtype(dtype)?;
        self.armor
            .insert(linear_name(layer, proj), ArmorWrap { s, a, b });
        Ok(())
    }

    /// The experts of block `layer`, if it holds any.
    pub fn moe_block(&self, layer: usize) -> Option<&MoeBlock> {
        self.blocks.get(layer).and_then(|b| b.moe.as_ref())
    }

    /// The experts of block `layer` to change in place (shapes are the
    /// caller's to keep consistent with the configuration).
    pub fn moe_block_mut(&mut self, layer: usize) -> Option<&mut MoeBlock> {
        self.blocks.get_mut(layer).and_then(|b| b.moe.as_mut())
    }

    /// Whether any layer carries ARMOR wrappers (formats without a place for
    /// them cannot hold the model).
    pub fn has_armor(&self) -> bool {
        !self.armor.is_empty()
    }

    /// Every parameter under its Hugging Face name (norms, embedding, linears; `lm_head` only if untied).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, b) in self.blocks.iter().enumerate() {
            out.push((
                format!("model.layers.{l}.input_layernorm.weight"),
                b.attn_norm.clone(),
            ));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                b.ffn_norm.clone(),
            ));
            for &proj in b.projs() {
                let name = linear_name(l, proj);
                match self.armor.get(&name) {
                    Some(w) => {
                        let stem = name.trim_end_matches(".weight");
                        out.push((format!("{stem}.armor_a"), w.a.clone()));
                        out.push((format!("{stem}.armor_b"), w.b.clone()));
                        out.push((name, w.s.clone()));
                    }
                    None => out.push((name, self.stored_linear(l, proj)?.clone())),
                }
            }
            for (suffix, t) in b.extra.named() {
                out.push((format!("model.layers.{l}.{suffix}"), t.clone()));
            }
            if let (Some(moe), Some(mc)) = (&b.moe, &self.config.moe) {
                out.push((mc.router_name(l), moe.router.clone()));
                for (e, x) in moe.experts.iter().enumerate() {
                    for (p, t) in [("gate", &x.gate), ("up", &x.up), ("down", &x.down)] {
                        out.push((mc.expert_name(l, e, p), t.clone()));
                    }
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        match &self.lm_head {
            Some(LinearWeight::Dense(w)) => out.push(("lm_head.weight".to_string(), w.clone())),
            Some(LinearWeight::Quantized(_)) => {
                return Err(RuntimeError::Invalid("lm_head is quantized".into()))
            }
            None => {}
        }
        Ok(out)
    }

    /// Embeds token ids (batch, time) into the residual stream (batch, time, hidden).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// Runs block `layer` on the residual stream `x` (batch, time, hidden), reporting each linear input to `sink`.
    pub fn block_forward(
        &self,
        layer: usize,
        x: &Tensor,
        mut sink: Option<ActivationSink<'_>>,
    ) -> Result<Tensor> {
        if !self.runs_on_slices() {
            return self.block_forward_candle(layer, x, sink);
        }
        let (b, t, d) = x.dims3()?;
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        let device = x.device().clone();
        match sink.as_mut() {
            Some(s) => {
                let mut each = |input: LinearInput, a: &[f32], cols: usize| -> Result<()> {
                    s(
                        input,
                        &Tensor::from_slice(a, (a.len() / cols, cols), &device)?,
                    )
                };
                self.block_slices(layer, &mut v, b, t, Some(&mut each), None)?;
            }
            None => self.block_slices(layer, &mut v, b, t, None, None)?,
        }
        Ok(Tensor::from_vec(v, (b, t, d), &device)?)
    }

    /// Block `layer`'s linear inputs on `x`, up to and including `last`, to
    /// `sink`; the block's output is not computed where the slice forward
    /// runs (the products after `last` are skipped), only discarded.
    pub fn block_inputs(
        &self,
        layer: usize,
        x: &Tensor,
        last: LinearInput,
        sink: ActivationSink<'_>,
    ) -> Result<()> {
        if !self.runs_on_slices() {
            self.block_forward_candle(layer, x, Some(sink))?;
            return Ok(());
        }
        let (b, t, _) = x.dims3()?;
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        let device = x.device().clone();
        let mut each = |input: LinearInput, a: &[f32], cols: usize| -> Result<()> {
            sink(
                input,
                &Tensor::from_slice(a, (a.len() / cols, cols), &device)?,
            )
        };
        self.block_slices(layer, &mut v, b, t, Some(&mut each), Some(last))
    }

    /// [`Self::block_forward`] as candle operations: the reference the
    /// slice forward is tested against, and the path of quantized weights.
    pub fn block_forward_candle(
        &self,
        layer: usize,
        x: &Tensor,
        sink: Option<ActivationSink<'_>>,
    ) -> Result<Tensor> {
        self.block_candle(layer, x, sink, false, &mut |_, y, _| Ok(y))
    }

    /// Block `layer` as candle operations; with `diff`, only operations
    /// candle can differentiate (norms, softmax and RoPE written out). A
    /// mixture-of-experts block hands its experts' output, with what each
    /// expert saw, to `tap`, which returns what the block adds to the
    /// residual stream (HEAPr taps the gradient there).
    pub(crate) fn block_candle(
        &self,
        layer: usize,
        x: &Tensor,
        mut sink: Option<ActivationSink<'_>>,
        diff: bool,
        tap: MoeTap<'_>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let blk = &self.blocks[layer];
        let (b, t, d) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let eps = c.rms_norm_eps as f32;
        let mut observe = |input: LinearInput, a: &Tensor| -> Result<()> {
            match sink.as_mut() {
                Some(s) => s(input, a),
                None => Ok(()),
            }
        };
        let norm = |x: &Tensor, g: &Tensor| -> Result<Tensor> {
            Ok(if diff {
                candle_nn::ops::rms_norm_slow(x, g, eps)?
            } else {
                candle_nn::ops::rms_norm(x, g, eps)?
            })
        };

        let h = norm(x, &blk.attn_norm)?.reshape((b * t, d))?;
        observe(LinearInput::Attention, &h)?;
        let heads = |w: &LinearWeight,
                     bias: &Option<Tensor>,
                     g: &Option<Tensor>,
                     n: usize|
         -> Result<Tensor> {
            let mut y = w.forward(&h)?;
            if let Some(bias) = bias {
                y = y.broadcast_add(bias)?;
            }
            let mut y = y.reshape((b, t, n, hd))?;
            if let Some(g) = g {
                y = norm(&y.contiguous()?, g)?;
            }
            Ok(y.transpose(1, 2)?.contiguous()?)
        };
        let e = &blk.extra;
        let q = self.apply_rope(&heads(&blk.q, &e.q_bias, &e.q_norm, nh)?, t, diff)?;
        let k = self.apply_rope(&heads(&blk.k, &e.k_bias, &e.k_norm, nkv)?, t, diff)?;
        let v = heads(&blk.v, &e.v_bias, &None, nkv)?;
        let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (crate::gemm::matmul(&q, &k.t()?)? * scale)?;
        let mask = causal_mask(t, c.sliding_window, x.device())?;
        let masked = scores.broadcast_add(&mask)?;
        let probs = if diff {
            candle_nn::ops::softmax(&masked, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&masked)?
        };
        let att = crate::gemm::matmul(&probs, &v)?
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?
            .contiguous()?;
        observe(LinearInput::AttentionOutput, &att)?;
        let mut o = blk.o.forward(&att)?;
        if let Some(bias) = &e.o_bias {
            o = o.broadcast_add(bias)?;
        }
        let x = (x + o.reshape((b, t, d))?)?;

        let h = norm(&x, &blk.ffn_norm)?.reshape((b * t, d))?;
        observe(LinearInput::Mlp, &h)?;
        if let Some(moe) = &blk.moe {
            let mut records = Vec::new();
            let y = super::moe::moe_forward_candle(c, moe, &h, diff, Some(&mut records))?;
            let y = tap(layer, y, records)?;
            return Ok((x + y.reshape((b, t, d))?)?);
        }
        let with = |y: Tensor, bias: &Option<Tensor>| -> Result<Tensor> {
            Ok(match bias {
                Some(bias) => y.broadcast_add(bias)?,
                None => y,
            })
        };
        let gate = with(blk.gate.forward(&h)?, &e.gate_bias)?;
        let up = with(blk.up.forward(&h)?, &e.up_bias)?;
        let act = (gate.silu()? * up)?;
        observe(LinearInput::MlpDown, &act)?;
        let down = with(blk.down.forward(&act)?, &e.down_bias)?.reshape((b, t, d))?;
        Ok((x + down)?)
    }

    /// Final norm and output projection: residual stream (batch, time, hidden) to logits (batch, time, vocab).
    pub fn head_forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.runs_on_slices() {
            return self.head_forward_candle(x);
        }
        let (b, t, _) = x.dims3()?;
        let logits = self.head_slices(&x.flatten_all()?.to_vec1::<f32>()?, b * t)?;
        Ok(Tensor::from_vec(
            logits,
            (b, t, self.config.vocab_size),
            x.device(),
        )?)
    }

    /// [`Self::head_forward`] as candle operations.
    pub fn head_forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        self.head_candle(x, false)
    }

    /// The head as candle operations, differentiable with `diff`.
    pub(crate) fn head_candle(&self, x: &Tensor, diff: bool) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let eps = self.config.rms_norm_eps as f32;
        let h = if diff {
            candle_nn::ops::rms_norm_slow(x, &self.norm, eps)?
        } else {
            candle_nn::ops::rms_norm(x, &self.norm, eps)?
        }
        .reshape((b * t, d))?;
        let logits = if let Some(q) = &self.lm_head_quantized {
            q.forward(&h)?
        } else {
            match &self.lm_head {
                Some(w) => w.forward(&h)?,
                None => crate::gemm::matmul(&h, &self.embed.to_dtype(DType::F32)?.t()?)?,
            }
        };
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Full-sequence forward: token ids (batch, time) to every position's logits (batch, time, vocab).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if self.runs_on_slices() {
            let (b, t) = ids.dims2()?;
            let flat = ids.flatten_all()?.to_vec1::<u32>()?;
            let logits = self.logits_slices(&flat, b, t)?;
            return Ok(Tensor::from_vec(
                logits,
                (b, t, self.config.vocab_size),
                ids.device(),
            )?);
        }
        self.forward_candle(ids)
    }

    /// [`Self::forward`] as candle operations (the reference of the slice forward).
    pub fn forward_candle(&self, ids: &Tensor) -> Result<Tensor> {
        let mut x = self.embed_tokens(ids)?;
        for l in 0..self.blocks.len() {
            x = self.block_forward_candle(l, &x, None)?;
        }
        self.head_forward_candle(&x)
    }

    /// Logits of the last position of one sequence.
    pub fn last_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(RuntimeError::Invalid(
                "cannot run the model on an empty sequence".into(),
            ));
        }
        let ids = Tensor::new(ids, self.device())?.unsqueeze(0)?;
        let mut x = self.embed_tokens(&ids)?;
        for l in 0..self.blocks.len() {
            x = self.block_forward(l, &x, None)?;
        }
        let t = x.dim(1)?;
        let last = x.narrow(1, t - 1, 1)?;
        Ok(self.head_forward(&last)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Greedy continuation of `prompt` by `max_new` tokens (full recompute per token; for checks, not serving).
    pub fn greedy_continue(&self, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        for _ in 0..max_new {
            let logits = self.last_logits(&ids)?;
            ids.push(argmax(&logits) as u32);
        }
        Ok(ids[prompt.len()..].to_vec())
    }

    fn apply_rope(&self, x: &Tensor, t: usize, diff: bool) -> Result<Tensor> {
        if t > self.cos.dim(0)? {
            return Err(RuntimeError::Invalid(format!(
                "sequence of {t} tokens is longer than the model's {} positions",
                self.cos.dim(0)?
            )));
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        Ok(match (self.rope, diff) {
            (RopeStyle::HalfSplit, false) => candle_nn::rotary_emb::rope(x, &cos, &sin)?,
            (RopeStyle::AdjacentPairs, false) => candle_nn::rotary_emb::rope_i(x, &cos, &sin)?,
            (RopeStyle::HalfSplit, true) => candle_nn::rotary_emb::rope_slow(x, &cos, &sin)?,
            (RopeStyle::AdjacentPairs, true) => candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin)?,
        })
    }
}

/// Index of the largest value (first one on ties).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// A mixture-of-experts block's shapes against the configuration: as many
/// experts as the router's rows (at least `top_k`), each between one and
/// `moe_intermediate_size` wide.
fn check_moe(l: usize, moe: &MoeBlock, mc: &super::config::MoeConfig, d: usize) -> Result<()> {
    let n = moe.experts.len();
    check_shape(
        &format!("model.layers.{l}.mlp.gate.weight"),
        &moe.router,
        &[n, d],
    )?;
    if n != mc.num_experts || n < mc.top_k {
        return Err(RuntimeError::Invalid(format!(
            "block {l} holds {n} experts; the configuration says {} (each token uses {})",
            mc.num_experts, mc.top_k
        )));
    }
    for (e, x) in moe.experts.iter().enumerate() {
        let w = x.width();
        if w == 0 || w > mc.moe_intermediate_size {
            return Err(RuntimeError::Invalid(format!(
                "expert {e} of block {l} is {w} wide; experts are 1 to {} wide",
                mc.moe_intermediate_size
            )));
        }
        check_shape(&mc.expert_name(l, e, "gate"), &x.gate, &[w, d])?;
        check_shape(&mc.expert_name(l, e, "up"), &x.up, &[w, d])?;
        check_shape(&mc.expert_name(l, e, "down"), &x.down, &[d, w])?;
    }
    Ok(())
}

fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(RuntimeError::ShapeMismatch {
            name: name.to_string(),
            context: "the model's configuration".into(),
            expected: expected.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(())
}

fn rope_tables(c: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = c.head_dim() / 2;
    let positions = c.max_position_embeddings.max(1);
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for i in 0..half {
            let inv_freq = 1.0 / c.rope_theta.powf(2.0 * i as f64 / c.head_dim() as f64);
            let angle = (p as f64 * inv_freq) as f32;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (positions, half), device)?,
        Tensor::from_vec(sin, (positions, half), device)?,
    ))
}

fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, n, rep, t, hd))?
        .reshape((b, n * rep, t, hd))?)
}

/// Query `i` sees keys `j <= i`, and with a sliding window `w` only `j > i - w`.
fn causal_mask(t: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let w = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j > i || i - j >= w {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), device)?)
}
