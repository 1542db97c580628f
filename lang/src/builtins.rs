//! The one table of built-ins: constructors, criteria functions, schedules,
//! optimizers, metrics and stage options, with parameter types, defaults and
//! ranges. The checker validates calls against it and `prunec explain` prints it.

use std::fmt;

/// The type a parameter or an option expects.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ty {
    Int,
    Float,
    /// `92%` or `0.92`.
    Fraction,
    /// A fraction or a count (`2%` or `500`), optionally `per layer`.
    FractionOrCount,
    Bool,
    Str,
    /// `N:M`
    Pattern,
    /// `100 steps`, `epoch 3`, or a plain count.
    Duration,
    /// A list of strings (name globs).
    Globs,
    /// A list of integers.
    Ints,
    /// A number, or a list of numbers (one per channel).
    Floats,
    /// A non-empty list of fractions (`[50%, 90%]`), each a sparsity.
    Fractions,
    /// One of a fixed set of words.
    Enum(&'static [&'static str]),
    /// A declared or inline value of a kind.
    Of(Kind),
    /// A criterion expression (a tensor-valued score).
    Score,
    /// A list of metric names.
    Metrics,
    /// The label of an earlier stage (`as NAME`).
    Label,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Int => f.write_str("an integer"),
            Ty::Float => f.write_str("a number"),
            Ty::Fraction => f.write_str("a fraction (`90%` or `0.9`)"),
            Ty::FractionOrCount => f.write_str("a fraction or a count (`2%`, `0.02` or `500`)"),
            Ty::Bool => f.write_str("`true` or `false`"),
            Ty::Str => f.write_str("a string"),
            Ty::Pattern => {
                f.write_str("an N:M pattern such as `2:4` or a block pattern such as `block(4, 1)`")
            }
            Ty::Duration => f.write_str("a duration (`100 steps`, `2 epochs`, `step 0`)"),
            Ty::Globs => f.write_str("a list of name patterns such as `[\"*.weight\"]`"),
            Ty::Ints => f.write_str("a list of integers"),
            Ty::Floats => f.write_str("a number, or a list of numbers (one per channel)"),
            Ty::Fractions => f.write_str("a list of fractions such as `[50%, 90%]`"),
            Ty::Enum(v) => {
                let quoted: Vec<String> = v.iter().map(|s| format!("`{s}`")).collect();
                write!(f, "one of {}", quoted.join(", "))
            }
            Ty::Of(k) => write!(f, "{}", k.article()),
            Ty::Score => f.write_str("a criterion expression"),
            Ty::Metrics => f.write_str("a list of metrics"),
            Ty::Label => f.write_str("the label of an earlier stage (`as NAME`)"),
        }
    }
}

/// What a built-in is or produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Model,
    Dataset,
    Criterion,
    Schedule,
    Constraints,
    Optimizer,
    LrSchedule,
    /// A weight-updating or adaptive pruning method used after `by`.
    Method,
    /// A structured sparsity pattern (`pattern = block(4, 1)`).
    Pattern,
    /// A function inside criterion expressions.
    ScoreFn,
    /// A per-sample score a data set is pruned by (`prune DATA by el2n(net)`).
    DataScore,
    /// A study an `analyze` stage runs (`analyze net by oracle(...)`).
    Analysis,
    /// How a language model's target is spread over its blocks (`allocation = owl(...)`).
    Allocation,
    /// An input of criterion expressions (`w`, `step`).
    ScoreInput,
    Metric,
    /// An option of a pipeline stage.
    StageOption,
}

impl Kind {
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Dataset => "dataset",
            Kind::Criterion => "criterion",
            Kind::Schedule => "schedule",
            Kind::Constraints => "constraint set",
            Kind::Optimizer => "optimizer",
            Kind::LrSchedule => "learning-rate schedule",
            Kind::Method => "pruning method",
            Kind::Pattern => "sparsity pattern",
            Kind::ScoreFn => "criterion function",
            Kind::ScoreInput => "criterion input",
            Kind::DataScore => "data score",
            Kind::Analysis => "analysis",
            Kind::Allocation => "sparsity allocation",
            Kind::Metric => "metric",
            Kind::StageOption => "stage option",
        }
    }

    pub fn article(self) -> String {
        let n = self.noun();
        let a = if n.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{a} {n}")
    }
}

/// Bounds of a numeric parameter; `true` marks an inclusive bound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Range {
    pub min: Option<(f64, bool)>,
    pub max: Option<(f64, bool)>,
}

impl Range {
    pub const fn any() -> Range {
        Range {
            min: None,
            max: None,
        }
    }
    pub const fn positive() -> Range {
        Range {
            min: Some((0.0, false)),
            max: None,
        }
    }
    pub const fn non_negative() -> Range {
        Range {
            min: Some((0.0, true)),
            max: None,
        }
    }
    pub const fn at_least(v: f64) -> Range {
        Range {
            min: Some((v, true)),
            max: None,
        }
    }
    /// `[0, 1)`: a sparsity.
    pub const fn sparsity() -> Range {
        Range {
            min: Some((0.0, true)),
            max: Some((1.0, false)),
        }
    }
    /// `[0, 1]`
    pub const fn unit() -> Range {
        Range {
            min: Some((0.0, true)),
            max: Some((1.0, true)),
        }
    }
    /// `(0, 1]`: a share that must hold something.
    pub const fn share() -> Range {
        Range {
            min: Some((0.0, false)),
            max: Some((1.0, true)),
        }
    }
    pub const fn open_unit() -> Range {
        Range {
            min: Some((0.0, false)),
            max: Some((1.0, false)),
        }
    }

    pub fn contains(&self, v: f64) -> bool {
        let lo = self
            .min
            .is_none_or(|(m, inc)| if inc { v >= m } else { v > m });
        let hi = self
            .max
            .is_none_or(|(m, inc)| if inc { v <= m } else { v < m });
        lo && hi && !v.is_nan()
    }

    pub fn is_any(&self) -> bool {
        self.min.is_none() && self.max.is_none()
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lo = match self.min {
            Some((v, true)) => format!("[{v}"),
            Some((v, false)) => format!("({v}"),
            None => "(-inf".to_string(),
        };
        let hi = match self.max {
            Some((v, true)) => format!("{v}]"),
            Some((v, false)) => format!("{v})"),
            None => "inf)".to_string(),
        };
        write!(f, "{lo}, {hi}")
    }
}

/// One parameter of a built-in.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub name: &'static str,
    pub ty: Ty,
    /// The default as written in a recipe; `None` means required.
    pub default: Option<&'static str>,
    pub range: Range,
    pub doc: &'static str,
}

const fn p(
    name: &'static str,
    ty: Ty,
    default: Option<&'static str>,
    range: Range,
    doc: &'static str,
) -> Param {
    Param {
        name,
        ty,
        default,
        range,
        doc,
    }
}

/// What a criterion built-in reads, so the checker can demand data for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub grad: bool,
    pub activations: bool,
    /// Accumulated over training steps (needs a `during` or a round block).
    pub training: bool,
}

/// One built-in.
#[derive(Clone, Copy, Debug)]
pub struct Builtin {
    pub name: &'static str,
    pub kind: Kind,
    pub params: &'static [Param],
    pub doc: &'static str,
    pub needs: Needs,
    /// Lives in the standard library: needs `use std.NAME`.
    pub stdlib: bool,
}

const NO_NEEDS: Needs = Needs {
    grad: false,
    activations: false,
    training: false,
};

const fn b(name: &'static str, kind: Kind, params: &'static [Param], doc: &'static str) -> Builtin {
    Builtin {
        name,
        kind,
        params,
        doc,
        needs: NO_NEEDS,
        stdlib: false,
    }
}

const fn std_b(
    name: &'static str,
    kind: Kind,
    params: &'static [Param],
    doc: &'static str,
) -> Builtin {
    Builtin {
        name,
        kind,
        params,
        doc,
        needs: NO_NEEDS,
        stdlib: true,
    }
}

const fn needs(mut bi: Builtin, n: Needs) -> Builtin {
    bi.needs = n;
    bi
}

const SPLITS: Ty = Ty::Enum(&["train", "validation", "test"]);
const ACTIVATIONS: Ty = Ty::Enum(&["relu", "tanh", "sigmoid", "gelu"]);
const SCOPES: Ty = Ty::Enum(&["global", "layer", "row", "neuron"]);
const NORMALIZE: Ty = Ty::Enum(&["none", "mean", "max", "l2"]);
const UNITS: Ty = Ty::Enum(&[
    "neuron",
    "channel",
    "ffn",
    "kv_group",
    "head",
    "expert",
    "expert_neuron",
]);
const AXES: Ty = Ty::Enum(&["out_channel", "row"]);
const FORMATS: Ty = Ty::Enum(&["safetensors", "onnx", "hf", "compressed_24"]);
const REWINDS: Ty = Ty::Enum(&["none", "init"]);

const DATA_PARAMS: [Param; 6] = [
    p(
        "path",
        Ty::Str,
        None,
        Range::any(),
        "folder (or file) holding the data",
    ),
    p(
        "split",
        SPLITS,
        Some("train"),
        Range::any(),
        "which part of the data set (`validation`: the train file's held-out end, see `validation`)",
    ),
    p(
        "batch",
        Ty::Int,
        Some("64"),
        Range::at_least(1.0),
        "samples per batch",
    ),
    p(
        "shuffle",
        Ty::Bool,
        Some("false"),
        Range::any(),
        "reshuffle every epoch (seeded by the recipe's seed)",
    ),
    p(
        "limit",
        Ty::Int,
        Some("0"),
        Range::non_negative(),
        "use only the first N samples (0: all)",
    ),
    p(
        "validation",
        Ty::Fraction,
        Some("0%"),
        Range::sparsity(),
        "hold out this last fraction of the train file: the `train` split leaves it out, the `validation` split reads it",
    ),
];

const TEST_PARAM: Param = p(
    "test",
    Ty::Fraction,
    Some("0%"),
    Range::sparsity(),
    "hold out this last fraction of the samples as the `test` split; the rest is the train file (0%: every split reads all samples, for a folder or file that is itself a train or test set)",
);

/// `images(...)`: the common data parameters, the test hold-out, and how
/// images become samples.
const IMAGE_PARAMS: [Param; 11] = [
    p(
        "path",
        Ty::Str,
        None,
        Range::any(),
        "a folder with one subfolder of PNG or JPEG images per class (classes in name order)",
    ),
    DATA_PARAMS[1],
    DATA_PARAMS[2],
    DATA_PARAMS[3],
    DATA_PARAMS[4],
    DATA_PARAMS[5],
    TEST_PARAM,
    p(
        "size",
        Ty::Ints,
        Some("[]"),
        Range::at_least(1.0),
        "`[height, width]` every image is resized to (bilinear); `[]` keeps the images' own size, which must be the same for all",
    ),
    p(
        "color",
        Ty::Enum(&["rgb", "gray"]),
        Some("rgb"),
        Range::any(),
        "three channels (`rgb`) or one (`gray`, the luma)",
    ),
    p(
        "mean",
        Ty::Floats,
        Some("0"),
        Range::any(),
        "subtracted from every pixel after scaling to [0, 1]: one number, or one per channel (`[0.485, 0.456, 0.406]`)",
    ),
    p(
        "std",
        Ty::Floats,
        Some("1"),
        Range::positive(),
        "every pixel is divided by it after subtracting `mean`: one number, or one per channel",
    ),
];

/// `tensors(...)`: a file, the names of its two tensors, and the common data parameters.
const TENSOR_PARAMS: [Param; 9] = [
    p(
        "path",
        Ty::Str,
        None,
        Range::any(),
        "a `.safetensors` file",
    ),
    p(
        "inputs",
        Ty::Str,
        None,
        Range::any(),
        "the tensor of inputs, one row per sample: `[samples, ...]`, any numeric dtype (read as f32)",
    ),
    p(
        "labels",
        Ty::Str,
        None,
        Range::any(),
        "the tensor of class indices: `[samples]` (or `[samples, 1]`), integers or integral floats from 0",
    ),
    DATA_PARAMS[1],
    DATA_PARAMS[2],
    DATA_PARAMS[3],
    DATA_PARAMS[4],
    DATA_PARAMS[5],
    TEST_PARAM,
];

/// Every built-in, in the order `prunec explain --all` lists them.
pub static BUILTINS: &[Builtin] = &[
    // ---- models
    b("mlp", Kind::Model, &[
        p("inputs", Ty::Int, None, Range::at_least(1.0), "input features (784 for MNIST)"),
        p("hidden", Ty::Ints, Some("[]"), Range::at_least(1.0), "widths of the hidden layers"),
        p("classes", Ty::Int, None, Range::at_least(2.0), "output classes"),
        p("act", ACTIVATIONS, Some("relu"), Range::any(), "activation between layers"),
    ], "A fully connected network; `mlp(inputs = 784, hidden = [300, 100], classes = 10)` is LeNet-300-100. Parameters are `fc1.weight`, `fc1.bias`, ..."),
    b("lenet5", Kind::Model, &[
        p("classes", Ty::Int, Some("10"), Range::at_least(2.0), "output classes"),
    ], "LeNet-5 for 28x28 inputs: conv 5x5 (6) → pool → conv 5x5 (16) → pool → fc 120 → fc 84 → fc classes."),
    b("pretrained_cnn", Kind::Model, &[
        p("path", Ty::Str, None, Range::any(), "the `.pth` state dict (data/digit-recognizer/handwriting_model.pth)"),
    ], "The pretrained digit-recognizer CNN (conv3x3 32→64→128, FC 1152→256→10), loaded from its PyTorch state dict."),
    b("safetensors", Kind::Model, &[
        p("path", Ty::Str, None, Range::any(), "a `.safetensors` file or a Hugging Face model folder"),
    ], "A classifier from safetensors weights; the architecture follows from the tensor names and shapes (`fc1.weight`, ... for MLPs, `conv1.weight`, ... for CNNs)."),
    b("onnx", Kind::Model, &[
        p("path", Ty::Str, None, Range::any(), "a `.onnx` file with its weights inside (opset 13 or later; tests/models/digits_cnn.onnx)"),
    ], "A vision classifier from an ONNX graph (float32, NCHW; ops Conv, Gemm, MatMul, Add/Sub/Mul/Div, Relu/Sigmoid/Tanh, MaxPool, AveragePool, GlobalAveragePool, BatchNormalization, Flatten, Reshape, Transpose, Softmax, Identity, Dropout, Constant). Its parameters are the Conv, Gemm and MatMul weights and biases, named by their initializers; it is pruned one-shot (no `train` or `finetune`) and exported as `format = onnx`: the same graph with the pruned weights."),
    b("gguf", Kind::Model, &[
        p("path", Ty::Str, None, Range::any(), "a `.gguf` file (data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)"),
    ], "A LLaMA-family causal language model from GGUF, dequantized to f32, with its tokenizer."),
    b("hf", Kind::Model, &[
        p("path", Ty::Str, None, Range::any(), "a Hugging Face model folder: config.json, model.safetensors (or shards with model.safetensors.index.json), tokenizer.json"),
    ], "A causal language model from a Hugging Face folder: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM, tied or untied, in f32, f16 or bf16. Weights are memory-mapped and stay in their dtype; a block is widened to f32 only while it runs. `format = hf` writes it back in the same dtypes and shards."),
    // ---- datasets
    b("mnist", Kind::Dataset, &DATA_PARAMS, "MNIST digits (IDX files from `scripts/fetch-data.sh mnist`): 1x28x28, 10 classes."),
    b("fashion_mnist", Kind::Dataset, &DATA_PARAMS, "Fashion-MNIST (gzipped IDX from `scripts/fetch-data.sh fashion`): 1x28x28, 10 classes."),
    b("digits", Kind::Dataset, &DATA_PARAMS, "The 8x8 digits CSV (1797 samples, from `scripts/fetch-data.sh digits`): 64 features, 10 classes."),
    b("images", Kind::Dataset, &IMAGE_PARAMS, "An image folder (the ImageFolder layout): one subfolder per class, named anything, holding PNG or JPEG images; labels follow the sorted subfolder names. Samples are `[channels, height, width]`, pixels scaled to [0, 1] then normalised; the classes are interleaved so a `limit`, `validation` or `test` part holds every class."),
    b("tensors", Kind::Dataset, &TENSOR_PARAMS, "Inputs and class labels as two tensors of one `.safetensors` file, in file order."),
    b("text", Kind::Dataset, &[
        p("path", Ty::Str, None, Range::any(), "a text file, a folder of `.txt` files, or a `.jsonl` file (one JSON object per line)"),
        p("tokenizer", Ty::Of(Kind::Model), None, Range::any(), "the model whose tokenizer cuts the text"),
        p("seq", Ty::Int, Some("256"), Range::at_least(2.0), "tokens per sequence"),
        p("samples", Ty::Int, Some("0"), Range::non_negative(), "number of sequences (0: all)"),
        p("offset", Ty::Int, Some("0"), Range::non_negative(), "skip this many tokens first (for disjoint splits)"),
        p("batch", Ty::Int, Some("1"), Range::at_least(1.0), "sequences per batch"),
        p("field", Ty::Str, Some("\"text\""), Range::any(), "the string field of each `.jsonl` record (records are joined by a blank line)"),
    ], "Plain text cut into fixed-length token sequences."),
    // ---- criterion inputs and functions
    b("w", Kind::ScoreInput, &[], "The weight being scored."),
    b("x", Kind::ScoreInput, &[], "The layer's input activations (only inside `act(x)`)."),
    b("step", Kind::ScoreInput, &[], "The current training step (inside `during` schedules)."),
    needs(b("grad", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "the weight: `grad(w)`")],
        "The loss gradient of the weight, averaged over the stage's data."), Needs { grad: true, activations: false, training: false }),
    needs(b("act", Kind::ScoreFn, &[
        p("of", Ty::Score, None, Range::any(), "the layer input: `act(x)`"),
        p("stat", Ty::Enum(&["norm"]), Some("norm"), Range::any(), "which per-input-column statistic (`norm` is the one the runtime computes)"),
    ], "A per-input-column statistic of the layer's input over the calibration data (`norm`: the L2 norm, Wanda's ||X_j||)."),
        Needs { grad: false, activations: true, training: false }),
    b("init", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "the weight: `init(w)`")], "The weight's value at initialisation."),
    needs(b("accumulate", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "the per-step score")],
        "The sum of a per-step score over the training steps so far (movement pruning)."), Needs { grad: false, activations: false, training: true }),
    b("abs", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "")], "Absolute value."),
    b("sq", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "")], "Square."),
    b("sqrt", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "")], "Square root."),
    b("log", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "")], "Natural logarithm."),
    b("exp", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "")], "Exponential."),
    b("sign", Kind::ScoreFn, &[p("of", Ty::Score, None, Range::any(), "")], "-1, 0 or 1."),
    b("min", Kind::ScoreFn, &[p("a", Ty::Score, None, Range::any(), ""), p("b", Ty::Score, None, Range::any(), "")], "The smaller of two scores."),
    b("max", Kind::ScoreFn, &[p("a", Ty::Score, None, Range::any(), ""), p("b", Ty::Score, None, Range::any(), "")], "The larger of two scores."),
    b("where", Kind::ScoreFn, &[
        p("cond", Ty::Score, None, Range::any(), "a comparison"),
        p("then", Ty::Score, None, Range::any(), ""),
        p("else", Ty::Score, None, Range::any(), ""),
    ], "`then` where `cond` holds, `else` elsewhere."),
    b("sum", Kind::ScoreFn, &[
        p("of", Ty::Score, None, Range::any(), ""),
        p("over", AXES, Some("out_channel"), Range::any(), "the group summed over (an output channel, i.e. a weight row); every element of a group gets the group's sum"),
    ], "Sum of a score over a group (`out_channel` for channel criteria)."),
    b("dist", Kind::ScoreFn, &[
        p("of", Ty::Score, None, Range::any(), ""),
        p("over", AXES, Some("out_channel"), Range::any(), "the group compared (an output channel, i.e. a weight row); every element of a group gets the group's value"),
    ], "Sum of the Euclidean distances from a group's values to every other group's in the same tensor: low for a group near the geometric median, which the others can replace (FPGM, He et al. 2019)."),
    b("rand", Kind::ScoreFn, &[], "A uniform draw in [0, 1) from the recipe's seeded generator (random pruning)."),
    // ---- standard-library criteria and methods (`use std.NAME`)
    std_b("magnitude", Kind::Criterion, &[], "`abs(w)` — Han et al. 2015; Global MP."),
    needs(std_b("taylor", Kind::Criterion, &[], "`abs(w * grad(w))` — first-order Taylor (Molchanov et al. 2019)."), Needs { grad: true, activations: false, training: false }),
    needs(std_b("snip", Kind::Criterion, &[], "`abs(w * grad(w))` on one batch at initialisation (Lee et al. 2019)."), Needs { grad: true, activations: false, training: false }),
    needs(std_b("movement", Kind::Criterion, &[], "`accumulate(-w * grad(w))` over fine-tuning steps (Sanh et al. 2020)."), Needs { grad: true, activations: false, training: true }),
    needs(std_b("wanda", Kind::Criterion, &[], "`abs(w) * act(x)`, compared per output row (Sun et al. 2023)."), Needs { grad: false, activations: true, training: false }),
    std_b("random", Kind::Criterion, &[], "`rand()` — the seeded random baseline."),
    std_b("l1_channel", Kind::Criterion, &[], "`sum(abs(w), over = out_channel)` (Li et al. 2017)."),
    std_b("l2_channel", Kind::Criterion, &[], "`sqrt(sum(sq(w), over = out_channel))` (Li et al. 2017)."),
    std_b("fpgm", Kind::Criterion, &[], "`dist(w, over = out_channel)`: filter pruning via the geometric median (He et al. 2019); the filters closest to the others go first."),
    needs(std_b("taylor_channel", Kind::Criterion, &[], "`sq(sum(w * grad(w), over = out_channel))`: group Taylor importance of an output channel (Molchanov et al. 2019); reads loss gradients (`on DATA`)."), Needs { grad: true, activations: false, training: false }),
    needs(std_b("sparsegpt", Kind::Method, &[
        p("block", Ty::Int, Some("128"), Range::at_least(1.0), "columns per block sweep"),
        p("damp", Ty::Float, Some("0.01"), Range::positive(), "dampening, as a fraction of the mean Hessian diagonal"),
        p("precision", Ty::Enum(&["f32", "f64"]), Some("f32"), Range::any(), "precision of the dampened Hessian and of its inverse's Cholesky factor: `f32` through the explicit inverse, as the reference code and llm-compressor, or `f64` (one Cholesky of the reversed Hessian and a triangular inverse); the column sweep is f32 either way"),
    ], "SparseGPT (Frantar & Alistarh 2023): layer-wise OBS reconstruction with the Hessian XᵀX."), Needs { grad: false, activations: true, training: false }),
    needs(std_b("armor", Kind::Method, &[
        p("block", Ty::Int, Some("64"), Range { min: Some((1.0, true)), max: Some((4096.0, true)) }, "size of the square blocks of the wrappers A and B (it must divide every targeted layer's rows and columns)"),
        p("iters", Ty::Int, Some("3"), Range { min: Some((0.0, true)), max: Some((1000.0, true)) }, "rounds of block coordinate descent (each: A, B, then two steps on the kept weights); more rounds fit the calibration inputs closer and may generalise worse"),
        p("init", Ty::Enum(&["sparsegpt", "wanda"]), Some("sparsegpt"), Range::any(), "the method whose N:M result ARMOR starts from (SparseGPT with its default block and dampening, or Wanda)"),
    ], "ARMOR (2025): each targeted linear layer, pruned to its N:M pattern by `init`, is refined to W ≈ A (S ∘ M) B with block-diagonal A and B (blocks of `block` x `block`, starting at the identity) and S the kept weights (starting at the initial result): block coordinate descent on the layer proxy loss ‖(W − A S B) X‖² with X the layer's calibration inputs (XᵀX, as SparseGPT reads it); A and each block of B are solved exactly, S takes projected gradient steps with an exact line search, and no step raises the loss. The layer then computes A S B; the report counts S's zeros. For N:M targets of language models (`prune lm by armor(block = 64) (pattern = 2:4, calibrate = calib)`); no export format holds the wrappers yet."), Needs { grad: false, activations: true, training: false }),
    needs(std_b("woodfisher", Kind::Method, &[
        p("block", Ty::Int, Some("128"), Range { min: Some((1.0, true)), max: Some((4096.0, true)) }, "weights per diagonal block of the Fisher (consecutive in each flattened weight tensor)"),
        p("damp", Ty::Float, Some("1e-5"), Range::positive(), "dampening λ added to the Fisher's diagonal"),
        p("grads", Ty::Int, Some("1000"), Range::at_least(1.0), "gradients averaged into the empirical Fisher (from the first samples of `on DATA`)"),
        p("batch", Ty::Int, Some("1"), Range::at_least(1.0), "samples per gradient (1: per-sample gradients)"),
    ], "WoodFisher (Singh & Alistarh 2020): OBS pruning with the empirical Fisher F = λI + (1/m) Σ g gᵀ inverted per diagonal block; a weight's saliency is w² / (2 [F⁻¹]_qq), and the survivors of each block take the joint OBS update δw = −F⁻¹ E_Q (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q."), Needs { grad: true, activations: false, training: false }),
    needs(std_b("mfac", Kind::Method, &[
        p("grads", Ty::Int, Some("64"), Range { min: Some((1.0, true)), max: Some((1024.0, true)) }, "m: the gradients kept (from the first samples of `on DATA`)"),
        p("block", Ty::Int, Some("2048"), Range::at_least(1.0), "weights per block (consecutive in each flattened weight tensor); the Fisher is never formed"),
        p("damp", Ty::Float, Some("1e-5"), Range::positive(), "dampening λ added to the Fisher's diagonal"),
        p("batch", Ty::Int, Some("1"), Range::at_least(1.0), "samples per gradient (1: per-sample gradients)"),
    ], "M-FAC (Frantar, Kurtic & Alistarh 2021): OBS pruning like `woodfisher`, with inverse-Fisher products from m gradients by the Woodbury identity applied recursively (O(m² d) set-up, O(m d) per product), so blocks can be large."), Needs { grad: true, activations: false, training: false }),
    needs(std_b("heapr", Kind::Method, &[], "HEAPr (Li et al. 2025): the second-order importance of each atomic expert (one intermediate neuron of an expert) in the expert's output space, `½ · mean_t(a_ti²) · Σ_t (w_te · d_iᵀ g_t)²` over the calibration tokens t routed to the expert, with a_ti its activation, d_i its down-projection column, w_te the routing weight and g_t the gradient of the mean next-token loss at the block's output (one forward and one backward pass on the dense model, the activations read in the same forward; the paper runs a second forward for them); a whole expert's importance is the same second-order term for its whole output o_t, `½ · Σ_t (w_te · o_tᵀ g_t)²`. With `unit = expert | expert_neuron` on a mixture-of-experts model and `calibrate = DATA`."), Needs { grad: false, activations: true, training: false }),
    needs(std_b("reap", Kind::Method, &[], "REAP (Lasby et al. 2025): an expert's score is the mean over the calibration tokens routed to it of routing weight × the norm of its output; an atomic expert's (`unit = expert_neuron`) the mean of routing weight × |a_i| × ‖d_i‖. With `unit = expert | expert_neuron` on a mixture-of-experts model and `calibrate = DATA`."), Needs { grad: false, activations: true, training: false }),
    needs(std_b("frequency", Kind::Method, &[], "Expert frequency: an expert's score is the number of calibration tokens the router sends to it (among each token's top-k), the usage baseline of expert pruning. With `unit = expert` on a mixture-of-experts model and `calibrate = DATA`."), Needs { grad: false, activations: true, training: false }),
    std_b("sap", Kind::Method, &[
        p("p", Ty::Float, Some("0.5"), Range::positive(), "PQ index p (0 < p < q)"),
        p("q", Ty::Float, Some("1.0"), Range::positive(), "PQ index q"),
        p("eta", Ty::Float, Some("0.001"), Range::non_negative(), "slack of the kept-count bound"),
        p("gamma", Ty::Float, Some("1.2"), Range::positive(), "prune-ratio multiplier"),
        p("beta", Ty::Float, Some("0.9"), Range::unit(), "largest prune ratio per round"),
    ], "Sparsity-informed adaptive pruning driven by the PQ index (Diao et al. 2023)."),
    b("sensitivity", Kind::Analysis, &[
        p("a", Ty::Score, None, Range::any(), "the criterion that prunes (`magnitude`, `taylor`, an expression)"),
        p("levels", Ty::Fractions, Some("[50%, 70%, 90%, 95%]"), Range::sparsity(), "the sparsities each tensor is pruned to"),
    ], "Sensitivity analysis: every weight tensor (`*.weight`) of a copy of the model is pruned alone by the criterion to each of `levels` (per tensor, its statistics read from the `on` data), and the copy's accuracy and loss on the `on` data are measured right after pruning; the table (tensors by levels) and a plot (accuracy against sparsity, one curve per tensor, `-> \"sensitivity.svg\"`) land in the report. The model is not changed."),
    b("agreement", Kind::Analysis, &[
        p("a", Ty::Score, None, Range::any(), "a criterion (`magnitude`, `taylor`, `wanda`, an expression)"),
        p("b", Ty::Score, None, Range::any(), "the criterion it is compared with"),
    ], "Criterion agreement: both criteria score every weight tensor (`*.weight`) of the model as it is, reading loss gradients and activation norms from the `on` data; per tensor and over all of them, Spearman's rank correlation of the two scores and the overlap of the weights each would prune at `to` (the share of the lowest-scored fraction `to` that both pick) land in the report with a table and a plot (`-> \"agreement.svg\"`), and as the metrics `spearman` and `overlap` (over all tensors) of the stage's label. The model is not changed."),
    // ---- data scores (`prune DATA by SCORE to FRACTION`)
    b("el2n", Kind::DataScore, &[
        p("model", Ty::Of(Kind::Model), None, Range::any(), "the classifier that scores, in its state when the stage runs (a few epochs into training, as in the paper)"),
    ], "EL2N (Paul et al. 2021): a sample's score is `‖softmax(f(x)) − onehot(y)‖₂`, the error of the model's prediction; `prune DATA by el2n(net) to 70%` keeps the 30% with the highest scores (`keep = easiest`: the lowest)."),
    b("grand", Kind::DataScore, &[
        p("model", Ty::Of(Kind::Model), None, Range::any(), "the classifier that scores, in its state when the stage runs"),
    ], "GraNd (Paul et al. 2021): a sample's score is `‖∇θ ℓ(f(x), y)‖₂`, the norm of its own loss gradient over every parameter of the model."),
    b("forgetting", Kind::DataScore, &[
        p("model", Ty::Of(Kind::Model), None, Range::any(), "the classifier whose training (`during train MODEL on DATA`) is watched"),
    ], "Forgetting events (Toneva et al. 2019): how often a sample goes from classified correctly to misclassified between two presentations while the model trains on the data set (`prune DATA by forgetting(net) to 50% during train net on DATA (...)`); a sample never classified correctly counts as forgotten infinitely often."),
    b("random", Kind::DataScore, &[], "Random data pruning: a uniform draw per sample from the recipe's seed and the stage (`prune DATA by random() to 90%`)."),
    // ---- per-block sparsity allocations of language models
    b("owl", Kind::Allocation, &[
        p("m", Ty::Float, Some("5"), Range::positive(), "a weight is an outlier when its Wanda score exceeds m times the mean over its block's targeted weights"),
        p("lambda", Ty::Float, Some("0.08"), Range::non_negative(), "half the spread of the block sparsities: the scaled outlier ratios span [0, 2 lambda]"),
    ], "OWL (Yin et al. 2024): each block's outlier ratio is the share of its targeted weights whose Wanda score |W_ij| · ‖X_j‖₂ (dense model, the stage's calibration data) exceeds m times the mean over the block's targeted weights; the ratios scaled to [0, 2 lambda] are subtracted from the target, shifted so that the blocks' sparsities average to it: blocks with more outliers keep more weights. For unstructured targets of language models (`prune lm by wanda to 50% (allocation = owl(), calibrate = calib)`)."),
    b("pareto", Kind::Allocation, &[
        p("front", Ty::Label, None, Range::any(), "the label of an earlier `analyze MODEL on DATA by search(...) as NAME` stage on the same model"),
        p("pick", Ty::Enum(&["target", "knee"]), Some("target"), Range::any(), "`target`: the point meeting the stage's `to` (kept weights at most 1 − to) with the lowest calibration perplexity, moved to the target exactly; `knee`: the front's knee, as it is, the stage without `to`"),
    ], "A point of a searched Pareto front (`analyze lm on calib by search(wanda) as front`) as the blocks' sparsities: `pick = target` takes, among the front's points at least as sparse as the stage's `to` (the constraint kept weights ≤ 1 − to), the one with the lowest calibration perplexity (the sparsest when none is) and shifts every block by the same amount so that they average to `to` exactly; `pick = knee` takes the knee of the front (the point farthest from the line through its two ends on the ideal side, both objectives scaled to [0, 1]; the smallest sum of the scaled objectives when no point lies on that side) and its own sparsity, the stage giving no `to`. The shift weights every block linear the search masked (all of them), whatever the stage's `targets`."),
    // ---- analyses (`analyze MODEL on DATA by ANALYSIS to FRACTION -> "PLOT.svg"`)
    b("search", Kind::Analysis, &[
        p("a", Ty::Score, None, Range::any(), "the criterion whose per-row selection masks each candidate: `wanda` or `magnitude`"),
        p("population", Ty::Int, Some("12"), Range { min: Some((4.0, true)), max: Some((512.0, true)) }, "candidates per generation"),
        p("generations", Ty::Int, Some("8"), Range { min: Some((0.0, true)), max: Some((1000.0, true)) }, "rounds of offspring after the initial population"),
        p("range", Ty::Fractions, Some("[30%, 70%]"), Range::sparsity(), "the lowest and highest sparsity a block may take"),
    ], "Multi-objective search of per-block sparsities of a language model (EMO-PMS; NSGA-II, Deb et al. 2002): every candidate gives each block a sparsity within `range`; each block linear is masked per output row by the criterion's scores on the dense model (activations from the `on` data), and the candidate is scored by two objectives, both minimised: the perplexity of the masked copy on the `on` data and the fraction of the targeted weights it keeps. The initial population holds uniform allocations at evenly spaced levels and seeded random ones; offspring come from tournament selection, SBX crossover and polynomial mutation, survivors from non-dominated sorting and crowding distance; seeded and deterministic. The Pareto front of every candidate evaluated lands in the report (a table and a plot, `-> \"front.svg\"`), its size, knee perplexity and knee sparsity as the metrics `points`, `knee_perplexity` and `knee_sparsity` of the stage's label; a later prune stage takes a point with `allocation = pareto(LABEL)`. The model is not changed."),
    b("oracle", Kind::Analysis, &[
        p("test", Ty::Of(Kind::Dataset), None, Range::any(), "the data the accuracy after retraining is measured on"),
        p("candidates", Ty::Int, Some("32"), Range { min: Some((2.0, true)), max: Some((1000.0, true)) }, "candidate masks, each removing a fresh random choice of units"),
        p("unit", Ty::Enum(&["neuron", "channel"]), Some("neuron"), Range::any(), "what a candidate removes: hidden neurons of linear layers or output channels of convolutions (in every layer that has them, the fraction `to` of each)"),
    ], "The oracle study of \"Is Oracle Pruning the True Oracle?\" (Feng et al. 2024): `candidates` masks at one sparsity, each removing a seeded random choice of the fraction `to` of every layer's units from a copy of the model; for each, the loss on the `on` data right after pruning (what oracle pruning minimises) and the accuracy on `test` after retraining the copy with the stage's `epochs`/`steps`/`optimizer`/`lr_schedule`; Kendall's τ-b between the two (−1: lower loss always retrains better) lands in the report with a table and a scatter plot (`-> \"oracle.svg\"`), and as the metric `kendall_tau` of the stage's label. The model itself is not changed."),

    b("block", Kind::Pattern, &[
        p("rows", Ty::Int, None, Range { min: Some((1.0, true)), max: Some((4096.0, true)) }, "block height (output rows)"),
        p("cols", Ty::Int, None, Range { min: Some((1.0, true)), max: Some((4096.0, true)) }, "block width (input columns)"),
    ], "Blocks of rows x cols weights, scored by the sum of their weights' scores and kept or pruned whole; every tensor keeps the same fraction of its blocks."),
    // ---- schedules
    b("oneshot", Kind::Schedule, &[], "Reach the target at once."),
    b("iterative", Kind::Schedule, &[
        p("rounds", Ty::Int, None, Range::at_least(1.0), "pruning rounds"),
        p("rewind", REWINDS, Some("none"), Range::any(), "rewind survivors to `init` (lottery ticket) or to `epoch k` before retraining"),
    ], "Iterative magnitude pruning: each round removes the same fraction of the survivors, reaching the target after the last round."),
    b("gradual", Kind::Schedule, &[
        p("from", Ty::Fraction, Some("0%"), Range::sparsity(), "initial sparsity"),
        p("to", Ty::Fraction, None, Range::sparsity(), "final sparsity"),
        p("start", Ty::Duration, Some("step 0"), Range::non_negative(), "first pruning step"),
        p("end", Ty::Duration, None, Range::non_negative(), "last pruning step"),
        p("every", Ty::Duration, Some("100 steps"), Range::at_least(1.0), "steps between pruning steps"),
        p("curve", Ty::Enum(&["cubic", "linear"]), Some("cubic"), Range::any(), "sparsity curve (AGP: cubic)"),
    ], "Gradual pruning during training (AGP, Zhu & Gupta 2017)."),
    b("pdp", Kind::Schedule, &[
        p("from", Ty::Fraction, Some("0%"), Range::sparsity(), "initial sparsity"),
        p("to", Ty::Fraction, None, Range::sparsity(), "final sparsity (with an N:M `pattern`, the pattern's)"),
        p("start", Ty::Duration, Some("step 0"), Range::non_negative(), "first step of the ramp"),
        p("end", Ty::Duration, None, Range::non_negative(), "step the target is reached"),
        p("tau", Ty::Float, Some("1e-4"), Range::positive(), "temperature of the soft mask, in units of w²"),
        p("curve", Ty::Enum(&["cubic", "linear"]), Some("cubic"), Range::any(), "sparsity curve of the ramp"),
    ], "PDP (Cho et al. 2023): differentiable soft masks trained with the weights during a `train` stage (`prune ... during train ...`): every step each targeted weight enters the forward pass as `w · sigmoid((w² − t²)/tau)`, `t²` halfway between the largest pruned and the smallest kept `w²` at the step's sparsity (global, per layer, or per N:M group), and gradients flow through the mask; after training the masks are hardened by magnitude at the final sparsity. The criterion must be `magnitude`."),
    // ---- optimizers and learning-rate schedules
    b("sgd", Kind::Optimizer, &[
        p("lr", Ty::Float, None, Range::positive(), "learning rate"),
        p("momentum", Ty::Float, Some("0"), Range { min: Some((0.0, true)), max: Some((1.0, false)) }, "momentum"),
        p("weight_decay", Ty::Float, Some("0"), Range::non_negative(), "L2 weight decay"),
        p("nesterov", Ty::Bool, Some("false"), Range::any(), "Nesterov momentum"),
    ], "Stochastic gradient descent."),
    b("adam", Kind::Optimizer, &[
        p("lr", Ty::Float, Some("0.001"), Range::positive(), "learning rate"),
        p("beta1", Ty::Float, Some("0.9"), Range { min: Some((0.0, true)), max: Some((1.0, false)) }, ""),
        p("beta2", Ty::Float, Some("0.999"), Range { min: Some((0.0, true)), max: Some((1.0, false)) }, ""),
        p("eps", Ty::Float, Some("1e-8"), Range::positive(), ""),
        p("weight_decay", Ty::Float, Some("0"), Range::non_negative(), "L2 penalty added to the gradient"),
    ], "Adam."),
    b("adamw", Kind::Optimizer, &[
        p("lr", Ty::Float, Some("0.001"), Range::positive(), "learning rate"),
        p("beta1", Ty::Float, Some("0.9"), Range { min: Some((0.0, true)), max: Some((1.0, false)) }, ""),
        p("beta2", Ty::Float, Some("0.999"), Range { min: Some((0.0, true)), max: Some((1.0, false)) }, ""),
        p("eps", Ty::Float, Some("1e-8"), Range::positive(), ""),
        p("weight_decay", Ty::Float, Some("0.01"), Range::non_negative(), "decoupled weight decay"),
    ], "AdamW (decoupled weight decay)."),
    b("constant", Kind::LrSchedule, &[], "A constant learning rate."),
    b("step_decay", Kind::LrSchedule, &[
        p("every", Ty::Duration, None, Range::at_least(1.0), "decay period"),
        p("gamma", Ty::Float, Some("0.1"), Range::positive(), "factor per period"),
    ], "Multiply the learning rate by `gamma` every period."),
    b("cosine", Kind::LrSchedule, &[
        p("warmup", Ty::Duration, Some("0 steps"), Range::non_negative(), "linear warm-up"),
    ], "Cosine decay to zero over the stage, after an optional warm-up."),
    // ---- metrics
    b("accuracy", Kind::Metric, &[], "Top-1 accuracy on the stage's data."),
    b("loss", Kind::Metric, &[], "Mean cross-entropy on the stage's data."),
    b("perplexity", Kind::Metric, &[], "exp(mean token cross-entropy) over the stage's text windows."),
    b("sparsity", Kind::Metric, &[], "Fraction of targeted weights that are zero."),
    b("pqi", Kind::Metric, &[], "PQ index of the kept weights (p = 0.5, q = 1): 0 dense-like, towards 1 sparse."),
    b("params", Kind::Metric, &[], "Kept (non-zero) parameters."),
    b("flops", Kind::Metric, &[], "FLOPs of one forward pass counting kept weights only."),
    b("kendall_tau", Kind::Metric, &[], "Kendall's τ-b of an `analyze ... by oracle(...)` study between each candidate's loss right after pruning and its accuracy after retraining (read as `LABEL.kendall_tau` or the latest; not an evaluation)."),
    b("spearman", Kind::Metric, &[], "Spearman's rank correlation of two criteria's scores over every weight, from an `analyze ... by agreement(a, b)` stage (not an evaluation)."),
    b("overlap", Kind::Metric, &[], "The share of the weights one criterion would prune at the stage's `to` that the other would prune too, from an `analyze ... by agreement(a, b)` stage (not an evaluation)."),
    b("latency", Kind::Metric, &[], "Milliseconds of one forward pass of the model as it is over a batch of the stage's data (the data set's `batch` is the batch size): the median of 20 timed passes after 3 warm-up passes. A timing of the machine at hand: in the report, never in a locked output (not plotted)."),
    b("throughput", Kind::Metric, &[], "Samples per second (classifiers) or tokens per second (language models) of the forward pass `latency` times: the batch over the median time."),
    // ---- stage options
    b("epochs", Kind::StageOption, &[p("value", Ty::Int, None, Range::at_least(1.0), "")], "Passes over the data (train, finetune)."),
    b("steps", Kind::StageOption, &[p("value", Ty::Int, None, Range::at_least(1.0), "")], "Optimizer steps (train, finetune); overrides `epochs`."),
    b("optimizer", Kind::StageOption, &[p("value", Ty::Of(Kind::Optimizer), Some("sgd(lr = 0.01)"), Range::any(), "")], "The optimizer (train, finetune)."),
    b("lr_schedule", Kind::StageOption, &[p("value", Ty::Of(Kind::LrSchedule), Some("constant()"), Range::any(), "")], "The learning-rate schedule (train, finetune)."),
    b("reinit", Kind::StageOption, &[p("value", Ty::Bool, Some("false"), Range::any(), "")], "Re-initialise the kept weights before training, keeping the mask (scratch-E, Liu et al. 2019): fresh draws at the model's current widths (after removed units, the smaller ones), also for a model read from a file."),
    b("distill", Kind::StageOption, &[p("value", Ty::Of(Kind::Model), None, Range::any(), "")], "Knowledge distillation (Hinton et al. 2015) from another declared classifier, in its state when the stage runs (train, finetune): each step's loss is `(1 - a) CE + a T² KL(softmax(teacher/T) ‖ softmax(student/T))` with `a = distill_weight` and `T = temperature`; the teacher is not trained."),
    b("temperature", Kind::StageOption, &[p("value", Ty::Float, Some("4"), Range::positive(), "")], "Softmax temperature T of `distill` (train, finetune)."),
    b("distill_weight", Kind::StageOption, &[p("value", Ty::Float, Some("0.5"), Range::unit(), "")], "Weight a of the distillation term against the cross-entropy with the labels (`distill`; 1: the teacher alone) (train, finetune)."),
    b("schedule", Kind::StageOption, &[p("value", Ty::Of(Kind::Schedule), Some("oneshot()"), Range::any(), "")], "How the target is reached (prune)."),
    b("constraints", Kind::StageOption, &[p("value", Ty::Of(Kind::Constraints), None, Range::any(), "")], "A constraint set (prune)."),
    b("scope", Kind::StageOption, &[p("value", SCOPES, Some("global"), Range::any(), "")], "Where scores are compared: one global threshold, per layer, or per output row (prune). The default is `row` for criteria that read `act(x)` (Wanda compares within each output row, as in the paper) and `global` for the others, on classifiers and language models alike (a language model takes `global` only for criteria that read the weights alone: the others are calibrated layer by layer)."),
    b("unit", Kind::StageOption, &[p("value", UNITS, None, Range::any(), "")], "Remove whole units instead of single weights, and shrink the model (prune). Classifiers: `neuron` removes output neurons of linear layers, `channel` output channels of convolutions, each with its bias entry and the inputs of the next layer that read it; a unit's score is the mean of its weights' scores (a channel criterion such as `l1_channel` gives the filter norm itself); `to` is the fraction of units removed, per layer by default (`scope = global` ranks the units of every targeted layer together, with `keep_min`/`keep_max` counted in units); the output layer's units are the classes and are never removed. Language models: `ffn` removes FFN neurons (gate/up rows, down column), `kv_group` key/value heads with their query heads (q/k/v rows, o columns), `head` single query heads (q rows, o columns; every kv group keeps as many), the same number in every block (the Hugging Face config holds one size); a unit is scored on the weights that read it (`down_proj`, `o_proj`) with their input activations on the dense model (`wanda` gives Wanda-sp). Mixture-of-experts language models (`Qwen3MoeForCausalLM`, `MixtralForCausalLM`): `expert` removes whole experts (router row and expert), the same number from every sparse block (at least the experts each token uses stay), ranked within each block; `expert_neuron` removes atomic experts (an expert's gate/up row and down column) ranked across all experts of a block, each expert keeping at least one, the Hugging Face export padding every expert with zeros to the widest, rounded up to a multiple of 8 (the config holds one expert width); both are scored by `heapr`, `reap` or `frequency` with `calibrate = DATA`. Training, evaluation and export then run on the smaller tensors."),
    b("equal_widths", Kind::StageOption, &[p("value", Ty::Bool, Some("false"), Range::any(), "")], "With `unit = expert_neuron`: every expert loses the same share of its own atomic experts (its lowest-scored), so all experts keep one width and the Hugging Face export, which holds one expert width, is smaller by the removed share. Without it the atomic experts are ranked across the block's experts (`scope = global`: across every sparse block's, HEAPr's setting), experts end at different widths and the export pads each with zeros to the widest (prune)."),
    b("compensate", Kind::StageOption, &[p("value", Ty::Bool, Some("false"), Range::any(), "")], "With `unit = ffn | kv_group | head` on a language model: FLAP's bias compensation (An et al. 2024): the removed units' mean contribution over the calibration tokens, `W[:, removed] · mean(X[:, removed])`, is added to the bias of `down_proj` or `o_proj` (created, with the other biases of `mlp_bias` / `attention_bias`, where the model has none). Needs a criterion that reads `act(x)` with `calibrate = DATA`, and an architecture that can hold the bias: Llama (and GGUF models), or Qwen3 for attention units (prune)."),
    b("normalize", Kind::StageOption, &[p("value", NORMALIZE, Some("none"), Range::any(), "")], "With `unit = ...` and `scope = global`: divide each layer's unit scores by their `mean`, `max` or L2 norm (`l2`) before ranking the units of all layers together, so layers whose scores run on different scales compete fairly (`none` ranks the raw scores) (prune)."),
    b("allocation", Kind::StageOption, &[p("value", Ty::Of(Kind::Allocation), None, Range::any(), "")], "Language models: spread an unstructured target over the blocks unevenly, each block at its own sparsity (`owl(m, lambda)`), the blocks averaging to the target (prune)."),
    b("per_class", Kind::StageOption, &[p("value", Ty::Bool, Some("false"), Range::any(), "")], "Data set prunes: every class keeps its share of the kept samples (its count times the kept fraction, the remainder to the largest fractions), chosen within the class; `false` ranks all samples together (prune)."),
    b("keep", Kind::StageOption, &[p("value", Ty::Enum(&["hardest", "easiest"]), Some("hardest"), Range::any(), "")], "Data set prunes: keep the samples with the highest scores (`hardest`: the least learned, as in the papers) or the lowest (`easiest`) (prune)."),
    b("kv_budget", Kind::StageOption, &[p("value", Ty::Fraction, None, Range::share(), "")], "Language models: evaluate `perplexity` with a bounded key-value cache: each window is decoded one token at a time and every query attends to at most this share of the window's length in keys (`floor(kv_budget x seq)`, at least one), its own included; `kv_policy` chooses which earlier tokens stay, per layer and sequence (evaluate)."),
    b("kv_policy", Kind::StageOption, &[p("value", Ty::Enum(&["recent", "h2o", "kvcrush"]), Some("recent"), Range::any(), "")], "Which tokens a bounded cache (`kv_budget`) keeps: `recent` the latest (a sliding window); `h2o` (Zhang et al. 2023) the latest half and the heavy hitters, the tokens that received the most attention so far (summed over the layer's heads); `kvcrush` (Jha et al. 2025) H2O's choice on three quarters of the slots and, on the last quarter, one representative per bucket of the tokens H2O would evict, bucketed by the Hamming distance of their per-head attention bits to an anchor (evaluate)."),
    b("pattern", Kind::StageOption, &[p("value", Ty::Pattern, None, Range::any(), "")], "`N:M`: keep N of every M consecutive weights along the input dimension (also written as the target: `to 2:4`); `block(rows, cols)`: keep or prune whole blocks (prune)."),
    b("targets", Kind::StageOption, &[p("value", Ty::Globs, Some("[\"*.weight\"]"), Range::any(), "")], "Parameters to prune, by name pattern (prune)."),
    b("skip", Kind::StageOption, &[p("value", Ty::Globs, Some("[]"), Range::any(), "")], "Parameters never pruned, by name pattern (prune)."),
    b("keep_min", Kind::StageOption, &[p("value", Ty::FractionOrCount, Some("0"), Range::non_negative(), "")], "Least kept per layer (`2% per layer` or a count): Global MP's guard against layer collapse (prune)."),
    b("keep_max", Kind::StageOption, &[p("value", Ty::FractionOrCount, Some("100%"), Range::non_negative(), "")], "Most kept per layer (prune)."),
    b("calibrate", Kind::StageOption, &[p("value", Ty::Of(Kind::Dataset), None, Range::any(), "")], "Calibration data for activation statistics and Hessians (prune)."),
    b("sequential", Kind::StageOption, &[p("value", Ty::Bool, Some("true"), Range::any(), "")], "Language models: calibrate each block on the outputs of the already-pruned blocks (`true`), or every block on the dense model's activations (`false`) (prune)."),
    b("true_sequential", Kind::StageOption, &[p("value", Ty::Bool, Some("false"), Range::any(), "")], "Language models: within each block, prune the linear layers group by group in the order the block runs them (q, k, v; then o; then gate, up; then down), each group calibrated on the outputs of the groups already pruned, as the SparseGPT and Wanda reference code's `--true-sequential` does (one calibration forward per group); `false` calibrates every layer of a block on the block's dense activations, as llm-compressor does (prune)."),
    b("rounds", Kind::StageOption, &[p("value", Ty::Int, None, Range::at_least(1.0), "")], "Rounds of an adaptive method (prune)."),
    b("allow_nonfinite", Kind::StageOption, &[p("value", Ty::Bool, Some("false"), Range::any(), "")], "Accept NaN/inf weights, scoring them lowest, instead of stopping (prune)."),
    b("format", Kind::StageOption, &[p("value", FORMATS, Some("safetensors"), Range::any(), "")], "Output format (export): `safetensors` for classifiers (their default); `onnx` for `onnx(...)` models (their default and only format: the source graph with the pruned weights); `hf` (a Hugging Face folder, their default) or `compressed_24` for language models."),
];

/// The built-in with this name.
pub fn lookup(name: &str) -> Option<&'static Builtin> {
    BUILTINS
        .iter()
        .find(|b| b.name == name && b.kind != Kind::StageOption)
}

/// The data score with this name (`random` is also a weight criterion).
pub fn data_score(name: &str) -> Option<&'static Builtin> {
    BUILTINS
        .iter()
        .find(|b| b.name == name && b.kind == Kind::DataScore)
}

/// The stage option with this name.
pub fn stage_option(name: &str) -> Option<&'static Builtin> {
    BUILTINS
        .iter()
        .find(|b| b.name == name && b.kind == Kind::StageOption)
}

/// The numeric default of a stage option (`temperature`), or of a
/// parameter of a built-in call (`pdp`, `tau`), as the table writes it: the
/// one place the executor and the plan read an unwritten value from.
pub fn default_number(builtin: &str, param: Option<&str>) -> Option<f64> {
    let b = match param {
        None => stage_option(builtin)?,
        Some(_) => lookup(builtin)?,
    };
    let p = match param {
        None => b.params.first()?,
        Some(name) => b.params.iter().find(|p| p.name == name)?,
    };
    p.default?.parse().ok()
}

/// Every built-in of a kind.
pub fn of_kind(kind: Kind) -> impl Iterator<Item = &'static Builtin> {
    BUILTINS.iter().filter(move |b| b.kind == kind)
}

/// The constraint-set fields: the prune options that may also be declared in a `constraints` block.
pub const CONSTRAINT_FIELDS: [&str; 7] = [
    "targets",
    "skip",
    "scope",
    "keep_min",
    "keep_max",
    "pattern",
    "allow_nonfinite",
];

/// Which options each stage accepts.
pub fn stage_options(kind: crate::ast::StageKind) -> &'static [&'static str] {
    use crate::ast::StageKind::*;
    match kind {
        Train | Finetune => &[
            "epochs",
            "steps",
            "optimizer",
            "lr_schedule",
            "reinit",
            "distill",
            "temperature",
            "distill_weight",
        ],
        Calibrate => &[],
        Prune => &[
            "schedule",
            "constraints",
            "scope",
            "pattern",
            "targets",
            "skip",
            "keep_min",
            "keep_max",
            "calibrate",
            "sequential",
            "true_sequential",
            "rounds",
            "allow_nonfinite",
            "unit",
            "normalize",
            "compensate",
            "equal_widths",
            "per_class",
            "keep",
            "allocation",
        ],
        Evaluate => &["kv_budget", "kv_policy"],
        Assert | Report => &[],
        Analyze => &["epochs", "steps", "optimizer", "lr_schedule"],
        Export => &["format"],
    }
}

/// Renders the documentation of one built-in, for `prunec explain NAME`.
pub fn explain(name: &str) -> Option<String> {
    let hits: Vec<&Builtin> = BUILTINS.iter().filter(|b| b.name == name).collect();
    if hits.is_empty() {
        return None;
    }
    let mut out = String::new();
    for bi in hits {
        let import = if bi.stdlib {
            format!(" (standard library: `use std.{}`)", bi.name)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{} — {}{}\n\n  {}\n",
            bi.name,
            bi.kind.noun(),
            import,
            bi.doc
        ));
        let shown: Vec<&Param> = bi
            .params
            .iter()
            .filter(|p| bi.kind != Kind::StageOption || p.name == "value")
            .collect();
        if !shown.is_empty() {
            out.push('\n');
            if bi.kind == Kind::StageOption {
                let p = shown[0];
                out.push_str(&format!("  value: {}", p.ty));
                if let Some(d) = p.default {
                    out.push_str(&format!(", default {d}"));
                }
                if !p.range.is_any() {
                    out.push_str(&format!(", in {}", p.range));
                }
                out.push('\n');
            } else {
                out.push_str("  parameters:\n");
                for p in shown {
                    let default = match p.default {
                        Some(d) => format!(" = {d}"),
                        None => " (required)".to_string(),
                    };
                    let range = if p.range.is_any() {
                        String::new()
                    } else {
                        format!(", in {}", p.range)
                    };
                    let doc = if p.doc.is_empty() {
                        String::new()
                    } else {
                        format!(" — {}", p.doc)
                    };
                    out.push_str(&format!(
                        "    {}{}: {}{}{}\n",
                        p.name, default, p.ty, range, doc
                    ));
                }
            }
        }
        out.push('\n');
    }
    Some(out.trim_end().to_string() + "\n")
}

#[cfg(test)]
mod tests {
    use super::default_number;

    #[test]
    fn numeric_defaults_come_from_the_table() {
        assert_eq!(default_number("temperature", None), Some(4.0));
        assert_eq!(default_number("distill_weight", None), Some(0.5));
        assert_eq!(default_number("pdp", Some("tau")), Some(1e-4));
        assert_eq!(default_number("pdp", Some("to")), None);
        assert_eq!(default_number("distill", None), None);
    }
}
