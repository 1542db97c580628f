//! Nothing a recipe says is silently ignored: every built-in of
//! `lang/src/builtins.rs` — each parameter of a constructor, method, schedule
//! or optimizer, each stage option, each criterion function, input and metric —
//! has evidence here that it is read. The test walks the built-in table and
//! fails for any entry without evidence, and for evidence that does not hold:
//!
//! - `Changes`: a small recipe, run with the option changed, gives different
//!   outputs (models, evaluations, per-layer counts) than the recipe as it was;
//!   both runs must succeed. The runs are on the 8x8 digits (and MNIST, and
//!   two blocks of SmolLM2 for language-model options), so they take seconds.
//! - `Checked`: an invalid fixture under `tests/recipes/invalid` in which
//!   `check` reads the value and rejects it with a span (paths that do not
//!   exist, enum values no kernel computes).
//! - `Tested`: a named run test in `compiler/tests/run.rs` that uses it.

use prunec_lang::builtins::{Kind, Ty, BUILTINS};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

mod fixtures;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The evidence that a built-in has an effect.
enum Ev {
    /// `base` with `from` (which occurs exactly once) replaced by `to`.
    Changes(Base, &'static str, &'static str),
    /// An invalid fixture (file stem) whose text uses the built-in.
    Checked(&'static str),
    /// A test in `compiler/tests/run.rs` whose body uses the built-in, for
    /// effects a small recipe cannot show (a model file with NaN weights).
    Tested(&'static str),
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Base {
    /// An MLP on the digits: train, calibrate, prune, fine-tune, evaluate, export.
    Digits,
    /// The same on MNIST (a few hundred images).
    Mnist,
    /// The same on Fashion-MNIST.
    Fashion,
    /// `Digits` with Adam, AdamW, a step decay or a cosine schedule.
    Adam,
    AdamW,
    StepDecay,
    Cosine,
    /// `Digits` pruned by the criterion `c`.
    Criterion,
    /// Gradual pruning `during` training by the criterion `c`.
    Gradual,
    /// Iterative pruning with a round block.
    Iterative,
    /// Iterative Taylor pruning without retraining (gradients re-read each round).
    IterativeTaylor,
    /// An N:M pattern; a block pattern.
    Pattern,
    Block,
    /// Two constraint sets.
    Constraints,
    /// Wanda with `calibrate = DATA` on the stage.
    Calibrate,
    /// SAP with a round block.
    Sap,
    /// WoodFisher and M-FAC with every argument written.
    WoodFisher,
    MFac,
    /// Fine-tuning distilled from one of two teachers.
    Distill,
    /// PDP's soft masks during training.
    Pdp,
    /// The training data pruned by EL2N, GraNd and at random first.
    DataPrune,
    /// An oracle study of the trained model.
    Oracle,
    /// A sensitivity analysis of the trained model.
    Sensitivity,
    /// LeNet-5 on MNIST.
    Lenet,
    /// `Digits` trained on an image folder of the digits.
    Images,
    /// `Digits` trained on the digits in a safetensors file.
    Tensors,
    /// SparseGPT on two blocks of SmolLM2, then perplexity.
    Llm,
    /// Wanda 2:4 on one block of SmolLM2, exported.
    LlmExport,
    /// SparseGPT on four blocks of SmolLM2 with OWL's allocation.
    Owl,
    /// `Llm` evaluated with a bounded key-value cache.
    LlmKv,
    /// ARMOR at 2:4 on the tiny Llama.
    Armor,
    /// A per-block sparsity search on the tiny Llama, a copy pruned with a
    /// point of its front.
    Search,
}

const DIGITS: &str = r#"recipe t { version = 1, seed = 1 }
use std.{magnitude, random, taylor, snip, wanda, l1_channel, l2_channel, taylor_channel, fpgm, movement, sap, woodfisher, mfac}
model net = mlp(inputs = 64, hidden = [32], classes = 10, act = relu)
dataset train = DATA(PATH, split = "train", batch = 64, shuffle = false, limit = LIMIT, validation = 0%)
dataset test = DATA(PATH, split = "test", batch = 360, limit = 300)
criterion c = w
pipeline {
  train net on train (epochs = 2, optimizer = sgd(lr = 0.05, momentum = 0.9, weight_decay = 0, nesterov = false), lr_schedule = constant())
  calibrate net on train
  prune net by magnitude to 70% (scope = global, targets = ["*.weight"], skip = [], allow_nonfinite = false, keep_min = 0, keep_max = 100%) on train
  finetune net on train (epochs = 1, reinit = false)
  evaluate net on test -> [accuracy]
  export net to "net.safetensors" (format = safetensors)
}
"#;

const LLM: &str = r#"recipe t { version = 1, seed = 1 }
use std.{wanda, sparsegpt}
model lm = gguf("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
dataset calib = text("data/text/sotu", tokenizer = lm, seq = 32, samples = 4, offset = 0, batch = 1)
dataset heldout = text("data/text/moby-dick.txt", tokenizer = lm, seq = 32, samples = 2)
pipeline {
  prune lm by sparsegpt(block = 128, damp = 0.01, precision = f32) to 50% (targets = ["model.layers.0.*", "model.layers.1.*"], calibrate = calib, sequential = true)
  evaluate lm on heldout -> [perplexity]
}
"#;

const ARMOR: &str = r#"recipe t { version = 1, seed = 1 }
use std.armor
model lm = hf("tests/models/tiny-llama")
dataset calib = text("tests/models/tiny.txt", tokenizer = lm, seq = 32, samples = 4)
pipeline {
  prune lm by armor(block = 8, iters = 2, init = sparsegpt) to 2:4 (calibrate = calib)
  evaluate lm on calib -> [perplexity]
}
"#;

const SEARCH: &str = r#"recipe t { version = 1, seed = 1 }
use std.wanda
model lm = hf("tests/models/tiny-llama")
model pruned = hf("tests/models/tiny-llama")
dataset calib = text("tests/models/tiny.txt", tokenizer = lm, seq = 32, samples = 4)
pipeline {
  analyze lm on calib by search(wanda, population = 6, generations = 2, range = [20%, 80%]) as front
  prune pruned by wanda to 50% (calibrate = calib, allocation = pareto(front, pick = target))
  evaluate pruned on calib -> [perplexity]
}
"#;

const LLM_EXPORT: &str = r#"recipe t { version = 1, seed = 1 }
use std.wanda
model lm = gguf("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
dataset calib = text("data/text/sotu", tokenizer = lm, seq = 32, samples = 2)
pipeline {
  prune lm by wanda (pattern = 2:4, targets = ["model.layers.0.*"], calibrate = calib)
  export lm to "model" (format = hf)
}
"#;

const PRUNE_LINE: &str = r#"  prune net by magnitude to 70% (scope = global, targets = ["*.weight"], skip = [], allow_nonfinite = false, keep_min = 0, keep_max = 100%) on train"#;

fn digits_on(data: &str, path: &str, inputs: usize, limit: usize) -> String {
    DIGITS
        .replace("DATA(PATH", &format!("{data}({path:?}"))
        .replace("inputs = 64", &format!("inputs = {inputs}"))
        .replace("LIMIT", &limit.to_string())
}

/// The data files of the `Images` and `Tensors` bases, written once per run
/// of the test: two image folders (all digits, and the first 900) and two
/// safetensors files (the second with `x` and `x2` exchanged).
fn data_fixtures() -> &'static [String; 4] {
    static PATHS: std::sync::OnceLock<[String; 4]> = std::sync::OnceLock::new();
    PATHS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("builtin-effects-data");
        let _ = std::fs::remove_dir_all(&dir);
        let show = |p: PathBuf| p.display().to_string();
        [
            show(fixtures::image_folder(&dir, "all", 1797)),
            show(fixtures::image_folder(&dir, "some", 900)),
            show(fixtures::digits_safetensors(&dir, "a.safetensors", false)),
            show(fixtures::digits_safetensors(&dir, "b.safetensors", true)),
        ]
    })
}

const TRAIN_LINE: &str = r#"dataset train = DATA(PATH, split = "train", batch = 64, shuffle = false, limit = LIMIT, validation = 0%)"#;

fn base_text(b: Base) -> String {
    let digits = digits_on("digits", "data/digits/digits.csv.gz", 64, 0);
    let sgd = "sgd(lr = 0.05, momentum = 0.9, weight_decay = 0, nesterov = false)";
    match b {
        Base::Digits => digits,
        Base::Mnist => digits_on("mnist", "data/mnist", 784, 600),
        Base::Fashion => digits_on("fashion_mnist", "data/fashion-mnist", 784, 600),
        Base::Adam => digits.replace(
            sgd,
            "adam(lr = 0.001, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0)",
        ),
        Base::AdamW => digits.replace(
            sgd,
            "adamw(lr = 0.001, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01)",
        ),
        Base::StepDecay => digits.replace(
            "constant()",
            "step_decay(every = 10 steps, gamma = 0.1)",
        ),
        Base::Cosine => digits.replace("constant()", "cosine(warmup = 0 steps)"),
        Base::Criterion => digits.replace("by magnitude", "by c"),
        Base::Gradual => digits.replace("criterion c = w", "criterion c = abs(w)").replace(
            PRUNE_LINE,
            "  prune net by c (schedule = gradual(from = 0%, to = 60%, start = step 0, end = step 30, every = 10 steps, curve = cubic)) during\n    train net on train (epochs = 2)",
        ),
        Base::Iterative => digits.replace(
            PRUNE_LINE,
            "  prune net by magnitude to 70% (schedule = iterative(rounds = 2, rewind = none)) {\n    each round:\n      train net on train (epochs = 1)\n  }",
        ),
        Base::IterativeTaylor => digits.replace(
            "by magnitude to 70% (scope",
            "by taylor to 70% (schedule = iterative(rounds = 3), scope",
        ),
        Base::Pattern => digits.replace(PRUNE_LINE, "  prune net by magnitude (pattern = 2:4)"),
        Base::Block => digits.replace(
            PRUNE_LINE,
            "  prune net by magnitude to 50% (pattern = block(4, 4), targets = [\"fc1.weight\"])",
        ),
        Base::Constraints => digits
            .replace(
                "criterion c = w",
                "constraints first { targets = [\"fc1.weight\"] }\nconstraints all { targets = [\"*.weight\"] }",
            )
            .replace(PRUNE_LINE, "  prune net by magnitude to 70% (constraints = all)"),
        Base::Calibrate => digits
            .replace("  calibrate net on train\n", "")
            .replace(PRUNE_LINE, "  prune net by wanda to 50% (calibrate = train)"),
        Base::Sap => digits.replace(
            PRUNE_LINE,
            "  prune net by sap(p = 0.5, q = 1.0, eta = 0.001, gamma = 1.2, beta = 0.9) (rounds = 2, scope = neuron) {\n    each round:\n      finetune net on train (epochs = 1)\n  }",
        ),
        Base::WoodFisher => digits.replace(
            "by magnitude to 70%",
            "by woodfisher(block = 128, damp = 1e-5, grads = 300, batch = 1) to 70%",
        ),
        Base::MFac => digits.replace(
            "by magnitude to 70%",
            "by mfac(grads = 64, block = 2048, damp = 1e-5, batch = 1) to 70%",
        ),
        Base::Pdp => digits.replace(
            PRUNE_LINE,
            "  prune net by magnitude (schedule = pdp(from = 0%, to = 60%, start = step 0, end = step 30, tau = 1e-4, curve = cubic)) during\n    train net on train (epochs = 2)",
        ),
        Base::Oracle => digits.replace(
            "  evaluate net on test -> [accuracy]",
            "  analyze net on train by oracle(test = test, candidates = 4, unit = neuron) to 50% -> \"oracle.svg\" as study (epochs = 1)\n  evaluate net on test -> [accuracy]",
        ),
        Base::Sensitivity => digits.replace(
            "  evaluate net on test -> [accuracy]",
            "  analyze net on test by sensitivity(magnitude, levels = [50%, 90%]) -> \"s.svg\"\n  evaluate net on test -> [accuracy]",
        ),
        Base::DataPrune => digits
            .replace(
                "model net = ",
                "model probe = mlp(inputs = 64, hidden = [16], classes = 10)\nmodel probe2 = mlp(inputs = 64, hidden = [24], classes = 10)\nmodel net = ",
            )
            .replace(
                "  train net on train (epochs = 2",
                "  train probe on train (epochs = 1)\n  train probe2 on train (epochs = 2)\n  prune train by el2n(model = probe) to 20% (per_class = false, keep = hardest)\n  prune train by grand(model = probe2) to 20%\n  prune train by random() to 20%\n  train net on train (epochs = 2",
            ),
        Base::Distill => digits
            .replace(
                "model net = ",
                "model teacher = mlp(inputs = 64, hidden = [48], classes = 10)\nmodel teacher2 = mlp(inputs = 64, hidden = [16], classes = 10)\nmodel net = ",
            )
            .replace(
                "  calibrate net on train\n",
                "  train teacher on train (epochs = 3)\n  train teacher2 on train (epochs = 1)\n",
            )
            .replace(
                "finetune net on train (epochs = 1, reinit = false)",
                "finetune net on train (epochs = 1, reinit = false, distill = teacher, temperature = 4, distill_weight = 0.5)",
            ),
        Base::Lenet => digits_on("mnist", "data/mnist", 784, 300)
            .replace(
                "mlp(inputs = 784, hidden = [32], classes = 10, act = relu)",
                "lenet5(classes = 10)",
            )
            .replace("epochs = 2,", "epochs = 1,"),
        Base::Images => digits.replace(
            &TRAIN_LINE.replace("DATA(PATH", "digits(\"data/digits/digits.csv.gz\"").replace("LIMIT", "0"),
            &format!(
                "dataset train = images({:?}, split = \"train\", batch = 64, shuffle = false, limit = 0, validation = 0%, test = 20%, size = [8, 8], color = gray, mean = 0, std = 1)",
                data_fixtures()[0]
            ),
        ),
        Base::Tensors => digits.replace(
            &TRAIN_LINE.replace("DATA(PATH", "digits(\"data/digits/digits.csv.gz\"").replace("LIMIT", "0"),
            &format!(
                "dataset train = tensors({:?}, inputs = \"x\", labels = \"y\", split = \"train\", batch = 64, shuffle = false, limit = 0, validation = 0%, test = 20%)",
                data_fixtures()[2]
            ),
        ),
        Base::Llm => LLM.to_string(),
        Base::LlmExport => LLM_EXPORT.to_string(),
        Base::Owl => LLM.replace(
            "targets = [\"model.layers.0.*\", \"model.layers.1.*\"], calibrate = calib, sequential = true)",
            "targets = [\"model.layers.0.*\", \"model.layers.1.*\", \"model.layers.2.*\", \"model.layers.3.*\"], calibrate = calib, sequential = true, allocation = owl(m = 5, lambda = 0.08))",
        ),
        Base::Search => SEARCH.to_string(),
        Base::Armor => ARMOR.to_string(),
        Base::LlmKv => LLM.replace(
            "evaluate lm on heldout -> [perplexity]",
            "evaluate lm on heldout -> [perplexity] (kv_budget = 25%, kv_policy = h2o)",
        ),
    }
}

/// The evidence for each key (`name` or `name.param`) of the built-in table.
fn evidence() -> BTreeMap<&'static str, Ev> {
    use Base::*;
    use Ev::*;
    let mut e: BTreeMap<&'static str, Ev> = BTreeMap::new();
    let mut add = |k: &'static str, ev: Ev| assert!(e.insert(k, ev).is_none(), "{k} twice");
    // Models.
    add("mlp.inputs", Checked("P061_samples_do_not_fit"));
    add(
        "mlp.hidden",
        Changes(Digits, "hidden = [32]", "hidden = [24]"),
    );
    add(
        "mlp.classes",
        Changes(Digits, "classes = 10", "classes = 12"),
    );
    add("mlp.act", Changes(Digits, "act = relu", "act = tanh"));
    add(
        "lenet5.classes",
        Changes(Lenet, "classes = 10", "classes = 11"),
    );
    add("pretrained_cnn.path", Checked("P060_missing_model_file"));
    add(
        "safetensors.path",
        Checked("P060_missing_model_and_data_files"),
    );
    add("gguf.path", Checked("P060_missing_model_and_data_files"));
    add("onnx.path", Checked("P060_missing_onnx_file"));
    add("hf.path", Checked("P060_hf_folder_without_weights"));
    // Data sets: the same parameters for the three image/feature sets.
    for (base, name) in [
        (Digits, "digits"),
        (Mnist, "mnist"),
        (Fashion, "fashion_mnist"),
    ] {
        let key = |p: &str| -> &'static str { Box::leak(format!("{name}.{p}").into_boxed_str()) };
        add(
            key("split"),
            Changes(base, "split = \"train\"", "split = \"test\""),
        );
        add(key("batch"), Changes(base, "batch = 64", "batch = 16"));
        add(
            key("shuffle"),
            Changes(base, "shuffle = false", "shuffle = true"),
        );
        add(
            key("validation"),
            Changes(base, "validation = 0%", "validation = 99.5%"),
        );
    }
    add("digits.path", Checked("P060_missing_model_and_data_files"));
    // Image folders and arrays: the common parameters, the test hold-out,
    // and their own options.
    for (base, name) in [(Images, "images"), (Tensors, "tensors")] {
        let key = |p: &str| -> &'static str { Box::leak(format!("{name}.{p}").into_boxed_str()) };
        add(
            key("split"),
            Changes(base, "split = \"train\"", "split = \"test\""),
        );
        add(key("batch"), Changes(base, "batch = 64", "batch = 16"));
        add(
            key("shuffle"),
            Changes(base, "shuffle = false", "shuffle = true"),
        );
        add(key("limit"), Changes(base, "limit = 0", "limit = 500"));
        add(
            key("validation"),
            Changes(base, "validation = 0%", "validation = 50%"),
        );
        add(key("test"), Changes(base, "test = 20%", "test = 60%"));
    }
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let [all, some, a, b] = data_fixtures();
    add(
        "images.path",
        Changes(
            Images,
            leak(format!("images({all:?}")),
            leak(format!("images(path = {some:?}")),
        ),
    );
    add(
        "images.size",
        Changes(Images, "size = [8, 8]", "size = [4, 16]"),
    );
    add("images.color", Checked("P061_image_size_does_not_fit"));
    add("images.mean", Changes(Images, "mean = 0,", "mean = 0.5,"));
    add("images.std", Changes(Images, "std = 1)", "std = 0.25)"));
    add(
        "tensors.path",
        Changes(
            Tensors,
            leak(format!("tensors({a:?}")),
            leak(format!("tensors(path = {b:?}")),
        ),
    );
    add(
        "tensors.inputs",
        Changes(Tensors, "inputs = \"x\"", "inputs = \"x2\""),
    );
    add(
        "tensors.labels",
        Changes(Tensors, "labels = \"y\"", "labels = \"y2\""),
    );
    add("text.field", Checked("P063_text_jsonl_missing_field"));
    add(
        "mnist.path",
        Changes(
            Mnist,
            "mnist(\"data/mnist\", split = \"train\"",
            "mnist(path = \"data/fashion-mnist\", split = \"train\"",
        ),
    );
    add(
        "fashion_mnist.path",
        Changes(
            Fashion,
            "fashion_mnist(\"data/fashion-mnist\", split = \"train\"",
            "fashion_mnist(path = \"data/mnist\", split = \"train\"",
        ),
    );
    add("digits.limit", Changes(Digits, "limit = 0", "limit = 500"));
    add("mnist.limit", Changes(Mnist, "limit = 600", "limit = 400"));
    add(
        "fashion_mnist.limit",
        Changes(Fashion, "limit = 600", "limit = 400"),
    );
    add(
        "text.path",
        Changes(
            Llm,
            "text(\"data/text/sotu\"",
            "text(path = \"data/text/moby-dick.txt\"",
        ),
    );
    add("text.tokenizer", Checked("P045_text_data_for_classifier"));
    add(
        "text.seq",
        Changes(Llm, "seq = 32, samples = 4", "seq = 24, samples = 4"),
    );
    add("text.samples", Changes(Llm, "samples = 4", "samples = 3"));
    add("text.offset", Changes(Llm, "offset = 0", "offset = 500"));
    add("text.batch", Changes(Llm, "batch = 1", "batch = 3"));
    // Criterion inputs and functions.
    add("w", Changes(Criterion, "c = w", "c = rand()"));
    add("x", Changes(Criterion, "c = w", "c = abs(w) * act(x)"));
    add(
        "step",
        Changes(
            Gradual,
            "c = abs(w)",
            "c = where(step > 15, abs(w), 0 - abs(w))",
        ),
    );
    add("grad", Changes(Criterion, "c = w", "c = abs(grad(w))"));
    add("act", Changes(Criterion, "c = w", "c = act(x)"));
    add("act.stat", Checked("P023_act_statistic_not_computed"));
    add("init", Changes(Criterion, "c = w", "c = init(w)"));
    add(
        "accumulate",
        Changes(Gradual, "c = abs(w)", "c = accumulate(abs(w))"),
    );
    add("abs", Changes(Criterion, "c = w", "c = abs(w)"));
    add("sq", Changes(Criterion, "c = w", "c = sq(w)"));
    add("sqrt", Changes(Criterion, "c = w", "c = sqrt(abs(w))"));
    add("log", Changes(Criterion, "c = w", "c = log(abs(w) + 1e-6)"));
    add("exp", Changes(Criterion, "c = w", "c = exp(abs(w))"));
    add("sign", Changes(Criterion, "c = w", "c = sign(w)"));
    add("min", Changes(Criterion, "c = w", "c = min(w, 0 - w)"));
    add("max", Changes(Criterion, "c = w", "c = max(w, 0 - w)"));
    add(
        "where",
        Changes(Criterion, "c = w", "c = where(w > 0, w, 0 - w)"),
    );
    add(
        "sum",
        Changes(Criterion, "c = w", "c = sum(abs(w), over = out_channel)"),
    );
    add("sum.over", Checked("P023_sum_over_input_channels"));
    add(
        "dist",
        Changes(Criterion, "c = w", "c = dist(w, over = out_channel)"),
    );
    add("dist.over", Checked("P023_dist_over_input_channels"));
    add("rand", Changes(Criterion, "c = w", "c = w + rand()"));
    // Standard-library criteria and methods.
    for (k, by) in [
        ("random", "by random"),
        ("taylor", "by taylor"),
        ("snip", "by snip"),
        ("wanda", "by wanda"),
        ("l1_channel", "by l1_channel"),
        ("l2_channel", "by l2_channel"),
        ("taylor_channel", "by taylor_channel"),
        ("fpgm", "by fpgm"),
    ] {
        add(k, Changes(Digits, "by magnitude", by));
    }
    add("magnitude", Changes(Iterative, "by magnitude", "by random"));
    add("movement", Changes(Gradual, "by c", "by movement"));
    add("sparsegpt.block", Changes(Llm, "block = 128", "block = 16"));
    add("owl.m", Changes(Owl, "m = 5", "m = 2"));
    add("owl.lambda", Changes(Owl, "lambda = 0.08", "lambda = 0.2"));
    add(
        "allocation",
        Changes(Owl, ", allocation = owl(m = 5, lambda = 0.08)", ""),
    );
    add("sparsegpt.damp", Changes(Llm, "damp = 0.01", "damp = 0.5"));
    add(
        "sparsegpt.precision",
        Changes(Llm, "precision = f32", "precision = f64"),
    );
    add(
        "search.population",
        Changes(Search, "population = 6", "population = 8"),
    );
    add(
        "search.generations",
        Changes(Search, "generations = 2", "generations = 4"),
    );
    add(
        "search.range",
        Changes(Search, "range = [20%, 80%]", "range = [40%, 60%]"),
    );
    add(
        "pareto.pick",
        Changes(
            Search,
            "to 50% (calibrate = calib, allocation = pareto(front, pick = target))",
            "(calibrate = calib, allocation = pareto(front, pick = knee))",
        ),
    );
    add("pareto.front", Checked("P010_pareto_front_unknown"));
    add(
        "equal_widths",
        Tested("experts_and_atomic_experts_leave_a_smaller_moe_that_reads_back_alike"),
    );
    for k in ["heapr", "reap", "frequency"] {
        add(
            k,
            Tested("experts_and_atomic_experts_leave_a_smaller_moe_that_reads_back_alike"),
        );
    }
    add("armor.block", Changes(Armor, "block = 8", "block = 16"));
    add("armor.iters", Changes(Armor, "iters = 2", "iters = 3"));
    add(
        "armor.init",
        Changes(Armor, "init = sparsegpt", "init = wanda"),
    );
    add(
        "kv_budget",
        Changes(LlmKv, "kv_budget = 25%", "kv_budget = 50%"),
    );
    add(
        "kv_policy",
        Changes(LlmKv, "kv_policy = h2o", "kv_policy = kvcrush"),
    );
    add(
        "woodfisher.block",
        Changes(WoodFisher, "block = 128", "block = 16"),
    );
    add(
        "woodfisher.damp",
        Changes(WoodFisher, "damp = 1e-5", "damp = 1"),
    );
    add(
        "woodfisher.grads",
        Changes(WoodFisher, "grads = 300", "grads = 50"),
    );
    add(
        "woodfisher.batch",
        Changes(WoodFisher, "batch = 1)", "batch = 4)"),
    );
    add("mfac.grads", Changes(MFac, "grads = 64", "grads = 8"));
    add("mfac.block", Changes(MFac, "block = 2048", "block = 64"));
    add("mfac.damp", Changes(MFac, "damp = 1e-5", "damp = 1"));
    add("mfac.batch", Changes(MFac, "batch = 1)", "batch = 4)"));
    add(
        "oracle.candidates",
        Changes(Oracle, "candidates = 4", "candidates = 5"),
    );
    add(
        "oracle.test",
        Changes(Oracle, "test = test,", "test = train,"),
    );
    add("oracle.unit", Checked("P061_oracle_does_not_fit"));
    add(
        "sensitivity.levels",
        Changes(Sensitivity, "levels = [50%, 90%]", "levels = [50%, 80%]"),
    );
    for k in ["agreement", "spearman", "overlap"] {
        add(
            k,
            Tested("criterion_agreement_compares_scores_tensor_by_tensor"),
        );
    }
    add(
        "kendall_tau",
        Tested("an_oracle_study_reports_every_candidate_and_their_kendall_tau"),
    );
    add(
        "el2n.model",
        Changes(DataPrune, "el2n(model = probe)", "el2n(model = probe2)"),
    );
    add(
        "grand.model",
        Changes(DataPrune, "grand(model = probe2)", "grand(model = probe)"),
    );
    add(
        "data_score:random",
        Changes(DataPrune, "by random()", "by grand(probe)"),
    );
    add(
        "forgetting.model",
        Tested("data_pruning_keeps_what_each_score_ranks_best"),
    );
    add(
        "per_class",
        Changes(DataPrune, "per_class = false", "per_class = true"),
    );
    add(
        "keep",
        Changes(DataPrune, "keep = hardest", "keep = easiest"),
    );
    add(
        "distill",
        Changes(Distill, "distill = teacher,", "distill = teacher2,"),
    );
    add(
        "temperature",
        Changes(Distill, "temperature = 4", "temperature = 1"),
    );
    add(
        "distill_weight",
        Changes(Distill, "distill_weight = 0.5", "distill_weight = 0.9"),
    );
    add("sap.p", Changes(Sap, "p = 0.5", "p = 0.8"));
    add("sap.q", Changes(Sap, "q = 1.0", "q = 2.0"));
    add("sap.eta", Changes(Sap, "eta = 0.001", "eta = 0.5"));
    add("sap.gamma", Changes(Sap, "gamma = 1.2", "gamma = 2.0"));
    add("sap.beta", Changes(Sap, "beta = 0.9", "beta = 0.02"));
    // Patterns and schedules.
    add(
        "block.rows",
        Changes(Block, "block(4, 4)", "block(rows = 2, cols = 4)"),
    );
    add(
        "block.cols",
        Changes(Block, "block(4, 4)", "block(rows = 4, cols = 2)"),
    );
    add(
        "oneshot",
        Changes(IterativeTaylor, "iterative(rounds = 3)", "oneshot()"),
    );
    add(
        "iterative.rounds",
        Changes(Iterative, "rounds = 2", "rounds = 3"),
    );
    add(
        "iterative.rewind",
        Changes(Iterative, "rewind = none", "rewind = init"),
    );
    add("pdp.from", Changes(Pdp, "from = 0%", "from = 30%"));
    add("pdp.to", Changes(Pdp, "to = 60%", "to = 70%"));
    add(
        "pdp.start",
        Changes(Pdp, "start = step 0", "start = step 10"),
    );
    add("pdp.end", Changes(Pdp, "end = step 30", "end = step 20"));
    add("pdp.tau", Changes(Pdp, "tau = 1e-4", "tau = 1e-2"));
    add("pdp.curve", Changes(Pdp, "curve = cubic", "curve = linear"));
    add("gradual.from", Changes(Gradual, "from = 0%", "from = 30%"));
    add("gradual.to", Changes(Gradual, "to = 60%", "to = 70%"));
    add(
        "gradual.start",
        Changes(Gradual, "start = step 0", "start = step 10"),
    );
    add(
        "gradual.end",
        Changes(Gradual, "end = step 30", "end = step 40"),
    );
    add(
        "gradual.every",
        Changes(Gradual, "every = 10 steps", "every = 5 steps"),
    );
    add(
        "gradual.curve",
        Changes(Gradual, "curve = cubic", "curve = linear"),
    );
    // Optimizers and learning-rate schedules.
    add("sgd.lr", Changes(Digits, "lr = 0.05", "lr = 0.02"));
    add(
        "sgd.momentum",
        Changes(Digits, "momentum = 0.9", "momentum = 0.5"),
    );
    add(
        "sgd.weight_decay",
        Changes(Digits, "weight_decay = 0,", "weight_decay = 0.01,"),
    );
    add(
        "sgd.nesterov",
        Changes(Digits, "nesterov = false", "nesterov = true"),
    );
    for (base, name, wd_from, wd_to) in [
        (Adam, "adam", "weight_decay = 0)", "weight_decay = 0.1)"),
        (
            AdamW,
            "adamw",
            "weight_decay = 0.01)",
            "weight_decay = 0.5)",
        ),
    ] {
        let key = |p: &str| -> &'static str { Box::leak(format!("{name}.{p}").into_boxed_str()) };
        add(key("lr"), Changes(base, "lr = 0.001", "lr = 0.003"));
        add(key("beta1"), Changes(base, "beta1 = 0.9", "beta1 = 0.5"));
        add(key("beta2"), Changes(base, "beta2 = 0.999", "beta2 = 0.9"));
        add(key("eps"), Changes(base, "eps = 1e-8", "eps = 0.01"));
        add(key("weight_decay"), Changes(base, wd_from, wd_to));
    }
    add(
        "constant",
        Changes(Cosine, "cosine(warmup = 0 steps)", "constant()"),
    );
    add(
        "step_decay.every",
        Changes(StepDecay, "every = 10 steps", "every = 5 steps"),
    );
    add(
        "step_decay.gamma",
        Changes(StepDecay, "gamma = 0.1", "gamma = 0.5"),
    );
    add(
        "cosine.warmup",
        Changes(Cosine, "warmup = 0 steps", "warmup = 10 steps"),
    );
    // Metrics.
    add("accuracy", Changes(Digits, "-> [accuracy]", "-> [loss]"));
    add(
        "loss",
        Changes(Digits, "-> [accuracy]", "-> [accuracy, loss]"),
    );
    add(
        "sparsity",
        Changes(Digits, "-> [accuracy]", "-> [accuracy, sparsity]"),
    );
    add(
        "pqi",
        Changes(Digits, "-> [accuracy]", "-> [accuracy, pqi]"),
    );
    add(
        "params",
        Changes(Digits, "-> [accuracy]", "-> [accuracy, params]"),
    );
    add(
        "flops",
        Changes(Digits, "-> [accuracy]", "-> [accuracy, flops]"),
    );
    add(
        "perplexity",
        Changes(Llm, "-> [perplexity]", "-> [sparsity]"),
    );
    add(
        "latency",
        Changes(Digits, "-> [accuracy]", "-> [accuracy, latency]"),
    );
    add(
        "throughput",
        Changes(Digits, "-> [accuracy]", "-> [accuracy, throughput]"),
    );
    // Stage options.
    add("epochs", Changes(Digits, "epochs = 2", "epochs = 3"));
    add("steps", Changes(Digits, "epochs = 2,", "steps = 7,"));
    add(
        "optimizer",
        Changes(
            Digits,
            "optimizer = sgd(lr = 0.05, momentum = 0.9, weight_decay = 0, nesterov = false)",
            "optimizer = adam(lr = 0.01)",
        ),
    );
    add(
        "lr_schedule",
        Changes(Digits, "lr_schedule = constant()", "lr_schedule = cosine()"),
    );
    add("reinit", Changes(Digits, "reinit = false", "reinit = true"));
    add(
        "schedule",
        Changes(
            Iterative,
            "schedule = iterative(rounds = 2",
            "schedule = iterative(rounds = 4",
        ),
    );
    add(
        "constraints",
        Changes(Constraints, "constraints = all", "constraints = first"),
    );
    add("scope", Changes(Digits, "scope = global, targets = [\"*.weight\"], skip = [], allow_nonfinite = false, keep_min = 0, keep_max = 100%", "scope = layer"));
    add(
        "pattern",
        Changes(Pattern, "pattern = 2:4", "pattern = 1:4"),
    );
    add(
        "targets",
        Changes(
            Digits,
            "targets = [\"*.weight\"]",
            "targets = [\"fc1.weight\"]",
        ),
    );
    add(
        "skip",
        Changes(Digits, "skip = []", "skip = [\"fc2.weight\"]"),
    );
    add(
        "keep_min",
        Changes(Digits, "keep_min = 0", "keep_min = 250"),
    );
    add(
        "keep_max",
        Changes(Digits, "keep_max = 100%", "keep_max = 31% per layer"),
    );
    add(
        "calibrate",
        Changes(Calibrate, "calibrate = train", "calibrate = test"),
    );
    add(
        "sequential",
        Changes(Llm, "sequential = true", "sequential = false"),
    );
    add(
        "true_sequential",
        Changes(
            Llm,
            "sequential = true)",
            "sequential = true, true_sequential = true)",
        ),
    );
    add("rounds", Changes(Sap, "rounds = 2", "rounds = 3"));
    add(
        "compensate",
        Tested("flap_compensation_puts_the_removed_units_mean_into_exported_biases"),
    );
    add(
        "normalize",
        Tested("normalizing_unit_scores_per_layer_changes_what_a_global_ranking_keeps"),
    );
    add(
        "unit",
        Changes(
            Digits,
            "keep_max = 100%) on train",
            "keep_max = 100%, unit = neuron) on train",
        ),
    );
    add(
        "allow_nonfinite",
        Tested("nan_weights_stop_the_run_naming_the_tensor"),
    );
    add(
        "format",
        Changes(LlmExport, "format = hf", "format = compressed_24"),
    );
    e
}

/// Every key of the built-in table: a built-in's own name where it has no
/// parameters (or only criterion-expression operands), and `name.param` for
/// each parameter that is not an operand.
fn keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for b in BUILTINS {
        let named: Vec<_> = b
            .params
            .iter()
            .filter(|p| p.ty != Ty::Score && b.kind != Kind::StageOption)
            .collect();
        // A data score shares its name with a weight criterion (`random`).
        if b.kind == Kind::DataScore && b.params.is_empty() {
            keys.insert(format!("data_score:{}", b.name));
        } else if b.kind == Kind::ScoreFn
            || b.kind == Kind::StageOption
            || b.params.iter().all(|p| p.ty == Ty::Score)
        {
            keys.insert(b.name.to_string());
        }
        for p in named {
            keys.insert(format!("{}.{}", b.name, p.name));
        }
    }
    keys
}

/// What a run produced, less what depends on the recipe's text (spans,
/// timings, the lock, which pins the recipe's hash).
#[derive(PartialEq, Debug)]
struct Outcome {
    evaluations: serde_json::Value,
    layers: serde_json::Value,
    files: BTreeMap<String, String>,
}

fn strip_spans(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("span");
            m.values_mut().for_each(strip_spans);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_spans),
        _ => {}
    }
}

fn hash_files(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{rel}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            hash_files(&e.path(), &format!("{name}/"), out);
        } else if !(name.starts_with("report.") || name.ends_with(".lock")) {
            let h = Sha256::digest(std::fs::read(e.path()).unwrap());
            out.insert(name, format!("{h:x}"));
        }
    }
}

/// Runs a recipe text; the outcome, or the run's output when it failed.
fn run(text: &str, dir: &Path, tag: &str) -> Result<Outcome, String> {
    let recipe = dir.join(format!("{tag}.prune"));
    std::fs::write(&recipe, text).unwrap();
    let out = dir.join(tag);
    let o = Command::new(env!("CARGO_BIN_EXE_prunec"))
        .args(["run", "-q"])
        .arg(&recipe)
        .arg("--out")
        .arg(&out)
        .current_dir(root())
        .output()
        .expect("run prunec");
    if !o.status.success() {
        return Err(format!(
            "exit {:?}\n{}{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let mut report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    strip_spans(&mut report);
    let mut files = BTreeMap::new();
    hash_files(&out, "", &mut files);
    std::fs::remove_dir_all(&out).unwrap();
    Ok(Outcome {
        evaluations: report["evaluations"].take(),
        layers: report["layers"].take(),
        files,
    })
}

fn have(rel: &str) -> bool {
    root().join("data").join(rel).exists()
}

#[test]
fn every_builtin_option_has_an_effect_or_is_rejected_by_check() {
    for (rel, fetch) in [
        ("digits/digits.csv.gz", "digits"),
        ("mnist/train-images-idx3-ubyte", "mnist"),
        ("fashion-mnist/train-images-idx3-ubyte.gz", "fashion"),
        ("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
        ("text/moby-dick.txt", "text"),
    ] {
        assert!(
            have(rel),
            "data/{rel} is missing: run `scripts/fetch-data.sh {fetch}`"
        );
    }
    let evidence = evidence();
    let keys = keys();
    let mut problems = Vec::new();
    for k in &keys {
        if !evidence.contains_key(k.as_str()) {
            problems.push(format!(
                "{k}: no evidence that it has an effect or is rejected"
            ));
        }
    }
    for k in evidence.keys() {
        if !keys.contains(*k) {
            problems.push(format!("{k}: evidence for a key the built-in table lacks"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut bases: BTreeMap<Base, Result<Outcome, String>> = BTreeMap::new();
    for (i, (k, ev)) in evidence.iter().enumerate() {
        let name = k
            .trim_start_matches("data_score:")
            .split('.')
            .next()
            .unwrap();
        match ev {
            Ev::Checked(stem) => {
                let fixture = root().join(format!("tests/recipes/invalid/{stem}.prune"));
                let snapshot =
                    root().join(format!("compiler/tests/snapshots/recipes__{stem}.snap"));
                match std::fs::read_to_string(&fixture) {
                    Err(_) => problems.push(format!("{k}: no fixture {}", fixture.display())),
                    Ok(text) if !text.contains(name) => {
                        problems.push(format!("{k}: {stem} does not use `{name}`"))
                    }
                    Ok(_) if !snapshot.is_file() => {
                        problems.push(format!("{k}: {stem} has no snapshot"))
                    }
                    Ok(_) => {}
                }
            }
            Ev::Tested(test) => {
                let source = std::fs::read_to_string(root().join("compiler/tests/run.rs")).unwrap();
                let body = source
                    .split_once(&format!("fn {test}()"))
                    .map(|(_, rest)| rest.split("\n#[test]").next().unwrap_or(rest));
                match body {
                    None => {
                        problems.push(format!("{k}: no test `{test}` in compiler/tests/run.rs"))
                    }
                    Some(b) if !b.contains(name) => {
                        problems.push(format!("{k}: the test `{test}` does not use `{name}`"))
                    }
                    Some(_) => {}
                }
            }
            Ev::Changes(base, from, to) => {
                let text = base_text(*base);
                if text.matches(from).count() != 1 {
                    problems.push(format!("{k}: `{from}` is not in the {base:?} recipe once"));
                    continue;
                }
                let changed = text.replacen(from, to, 1);
                // `name.param`: the recipe calls `name` and the change is to `param`.
                let k = k.strip_prefix("data_score:").unwrap_or(k);
                let (name, param) = k.split_once('.').unwrap_or(("", k));
                if !changed.contains(name) || !(from.contains(param) || to.contains(param)) {
                    problems.push(format!(
                        "{k}: the change `{from}` -> `{to}` is not to `{k}`"
                    ));
                }
                let before = bases
                    .entry(*base)
                    .or_insert_with(|| run(&text, dir.path(), &format!("{base:?}")));
                let before = match before {
                    Ok(o) => o,
                    Err(e) => {
                        problems.push(format!("{k}: the {base:?} recipe fails: {e}"));
                        continue;
                    }
                };
                match run(&changed, dir.path(), &format!("v{i}")) {
                    Err(e) => problems.push(format!("{k}: `{from}` -> `{to}` fails: {e}")),
                    Ok(after) if &after == before => problems.push(format!(
                        "{k}: `{from}` -> `{to}` in the {base:?} recipe changes nothing"
                    )),
                    Ok(_) => {}
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
