//! Stage 4 of ARCHITECTURE.md: checks a checked recipe against model and
//! data file headers (never weights) — unreadable files, target globs that
//! match nothing, N:M patterns that do not divide a layer's input width, and
//! data whose samples or classes do not fit the model.

use crate::error::RunError;
use crate::lower::{glob_match, strings};
use crate::specs::{dataset_spec, gradual_plan, model_spec, text_files};
use prunec_lang::ast::{Stage, StageKind};
use prunec_lang::check::{SymKind, Value};
use prunec_lang::diag::{Code, Diagnostic};
use prunec_lang::resolved::Pattern;
use prunec_lang::{CheckedRecipe, Span};
use prunec_runtime::data::text;
use std::collections::BTreeMap;

struct Shapes {
    params: Vec<(String, Vec<usize>)>,
    input: Option<Vec<usize>>,
    /// The model's own rule for which sample shapes fit its input.
    arch: Option<prunec_runtime::model::Architecture>,
    /// Outputs of the model (its classes).
    classes: Option<usize>,
    /// Weights whose widths a global unit selection decides at run time.
    unknown: std::collections::BTreeSet<String>,
}

/// Every shape problem of a recipe (empty when it fits).
pub fn check_shapes(r: &CheckedRecipe) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let mut models: BTreeMap<String, Shapes> = BTreeMap::new();
    // Hugging Face models whose blocks the compressed format cannot hold.
    let mut non_llama: BTreeMap<String, &'static str> = BTreeMap::new();
    // Hugging Face models whose folder holds no tokenizer.json.
    let mut no_tokenizer: std::collections::BTreeSet<String> = Default::default();
    // Language models' configurations as the pipeline leaves them (unit
    // stages make them smaller).
    let mut lm_cfg: BTreeMap<String, prunec_runtime::llm::LlamaConfig> = BTreeMap::new();
    for (name, sym) in &r.symbols {
        if sym.kind != SymKind::Model {
            continue;
        }
        let Some(v) = &sym.value else { continue };
        if v.call_name() == Some("gguf") {
            // A language model's header: readable, complete, not truncated.
            let path = v.arg("path").and_then(|p| p.as_str()).unwrap_or("");
            let checked = prunec_runtime::llm::gguf::GgufFile::open(std::path::Path::new(path))
                .and_then(|f| f.check());
            if let Ok(c) = &checked {
                lm_cfg.insert(name.clone(), c.clone());
            }
            if let Err(e) = checked {
                diags.push(
                    Diagnostic::new(Code::ModelFile, format!("model `{name}`: {e}"))
                        .with_label(
                            decl_value_span(r, name).unwrap_or(sym.span),
                            "this model cannot be read",
                        )
                        .with_help(
                            "`scripts/fetch-data.sh smollm2` fetches SmolLM2; check the path",
                        ),
                );
            }
            continue;
        }
        if v.call_name() == Some("hf") {
            // A Hugging Face folder: config.json, the shard index and every
            // safetensors header, without loading a weight.
            let path = v.arg("path").and_then(|p| p.as_str()).unwrap_or("");
            match prunec_runtime::llm::inspect_hf(std::path::Path::new(path)) {
                Ok(h) => {
                    lm_cfg.insert(name.clone(), h.config.clone());
                    let arch = h.config.architecture;
                    if arch != prunec_runtime::llm::config::Architecture::Llama {
                        non_llama.insert(name.clone(), arch.class_name());
                    }
                    if !std::path::Path::new(path).join("tokenizer.json").is_file() {
                        no_tokenizer.insert(name.clone());
                    }
                }
                Err(e) => diags.push(
                    Diagnostic::new(Code::ModelFile, format!("model `{name}`: {e}"))
                        .with_label(
                            decl_value_span(r, name).unwrap_or(sym.span),
                            "this model cannot be read",
                        )
                        .with_help(
                            "a Hugging Face causal LM folder holds config.json and model.safetensors (or its shards and model.safetensors.index.json)",
                        ),
                ),
            }
            continue;
        }
        let spec = match model_spec(v, sym.span) {
            Ok(s) => s,
            Err(_) => continue,
        };
        match spec.param_shapes() {
            Ok(params) => {
                let arch = spec.resolve_architecture().ok();
                let input = arch.as_ref().map(|a| a.input_shape());
                let classes = arch
                    .as_ref()
                    .and_then(|a| a.shape_check().ok())
                    .map(|(_, classes)| classes);
                models.insert(
                    name.clone(),
                    Shapes {
                        params,
                        input,
                        arch,
                        classes,
                        unknown: Default::default(),
                    },
                );
            }
            Err(e) => {
                let span = decl_value_span(r, name).unwrap_or(sym.span);
                let onnx = v.call_name() == Some("onnx");
                diags.push(match e {
                    // A graph that reads well but uses what the runtime does not run.
                    prunec_runtime::RuntimeError::UnsupportedModel { .. } => {
                        Diagnostic::new(Code::Unsupported, format!("model `{name}`: {e}"))
                            .with_label(span, "prunec cannot run this graph")
                            .with_help("export the model with the supported ops (`prunec explain onnx`), float32 weights inside the file and opset 13 or later")
                    }
                    _ => Diagnostic::new(Code::ModelFile, format!("model `{name}`: {e}"))
                        .with_label(span, "this model cannot be read")
                        .with_help(if onnx {
                            "check the path: an `.onnx` file with its weights inside (`scripts/interop/make_onnx_model.py` writes the test models)"
                        } else {
                            "`scripts/fetch-data.sh` fetches the pretrained models; check the path"
                        }),
                })
            }
        }
    }
    let mut data_shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut data_classes: BTreeMap<String, usize> = BTreeMap::new();
    let mut batches: BTreeMap<String, usize> = BTreeMap::new();
    // Samples and batch size of each classifier data set.
    let mut sizes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (name, sym) in &r.symbols {
        if sym.kind != SymKind::Dataset {
            continue;
        }
        let Some(v) = &sym.value else { continue };
        if v.call_name() == Some("text") {
            // The model that cuts the text must carry a tokenizer.
            if let Some(Value::Ref(m)) = v.arg("tokenizer") {
                if no_tokenizer.contains(m.as_str()) {
                    diags.push(
                        Diagnostic::new(
                            Code::ModelFile,
                            format!("data set `{name}`: the folder of model `{m}` holds no tokenizer.json"),
                        )
                        .with_label(
                            decl_arg_span(r, name, "tokenizer")
                                .unwrap_or_else(|| decl_value_span(r, name).unwrap_or(sym.span)),
                            "this model has no tokenizer",
                        )
                        .with_help("put the checkpoint's tokenizer.json beside its config.json"),
                    );
                }
            }
            let path = v.arg("path").and_then(|p| p.as_str()).unwrap_or("");
            let field = v.arg("field").and_then(|p| p.as_str()).unwrap_or("text");
            let mut at = decl_value_span(r, name).unwrap_or(sym.span);
            let problem = match text_files(std::path::Path::new(path)) {
                Err(e) => Some(format!("cannot read {path}: {e}")),
                Ok(files) if files.is_empty() => Some(format!("{path} holds no .txt file")),
                Ok(files) => {
                    let jsonl = files.iter().any(|f| text::is_jsonl(f));
                    let field_span = decl_arg_span(r, name, "field");
                    match (jsonl, field_span) {
                        (false, Some(span)) => {
                            at = span;
                            Some(format!(
                                "`field` picks a field of `.jsonl` records; {path} is plain text"
                            ))
                        }
                        (true, _) => files
                            .iter()
                            .filter(|f| text::is_jsonl(f))
                            .find_map(|f| text::jsonl_records(f, field).err())
                            .map(|e| e.to_string()),
                        _ => None,
                    }
                }
            };
            if let Some(message) = problem {
                diags.push(
                    Diagnostic::new(Code::DataFile, format!("data set `{name}`: {message}"))
                        .with_label(at, "this data cannot be read")
                        .with_help(
                            "check the path; `scripts/fetch-data.sh text` fetches the texts",
                        ),
                );
            }
            continue;
        }
        if !matches!(
            v.call_name(),
            Some("mnist" | "fashion_mnist" | "digits" | "images" | "tensors")
        ) {
            continue;
        }
        // The spec a run builds: the same files, batch size, limit and validation.
        let spec = dataset_spec(v, r.seed, sym.span).and_then(|(spec, _)| {
            spec.meta()
                .map(|meta| (spec, meta))
                .map_err(|e| RunError::Internal(e.to_string()))
        });
        match spec {
            Ok((spec, meta)) => {
                batches.insert(name.clone(), meta.len.div_ceil(spec.batch_size.max(1)));
                sizes.insert(name.clone(), (meta.len, spec.batch_size.max(1)));
                data_shapes.insert(name.clone(), meta.sample_shape);
                data_classes.insert(name.clone(), meta.classes);
            }
            Err(e) => {
                let message = match e {
                    RunError::User { message, .. } | RunError::Internal(message) => message,
                    RunError::Assert { message, .. } => message,
                    RunError::Interrupted => "interrupted".into(),
                };
                diags.push(
                    Diagnostic::new(Code::DataFile, format!("data set `{name}`: {message}"))
                        .with_label(
                            decl_value_span(r, name).unwrap_or(sym.span),
                            "this data cannot be read",
                        )
                        .with_help(match v.call_name() {
                            Some("images") => "check the path: an image data set is a folder with one subfolder of PNG or JPEG images per class",
                            Some("tensors") => "check the path and the tensor names: `inputs` is `[samples, ...]`, `labels` one class index per sample",
                            _ => "check the path; `scripts/fetch-data.sh` fetches the data sets",
                        }),
                )
            }
        }
    }
    let mut stages: Vec<&Stage> = Vec::new();
    for s in &r.pipeline().stages {
        collect(r, s, &mut stages);
    }
    // Each (model, data) pair whose classes do not fit is reported once.
    let mut class_pairs = std::collections::BTreeSet::new();
    for s in stages {
        let model = s
            .subject
            .first()
            .and_then(|e| e.as_name())
            .map(|n| n.name.clone());
        let format = r
            .stage_options
            .get(&s.id)
            .and_then(|o| o.get("format"))
            .and_then(|v| v.as_str());
        if let (Some(arch), Some("compressed_24")) =
            (model.as_ref().and_then(|m| non_llama.get(m)), format)
        {
            diags.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!("`format = compressed_24` stores LlamaForCausalLM models only; this model is a {arch}"),
                )
                .with_label(s.value_span("format"), "not for this architecture")
                .with_help("export it as a Hugging Face folder (`format = hf`)"),
            );
        }
        if let Some(c) = model.as_ref().and_then(|m| lm_cfg.get_mut(m)) {
            if s.kind == StageKind::Prune {
                llm_shapes(r, s, c, &mut diags);
            }
            let search = s.by.as_ref().is_some_and(|b| {
                matches!(&b.kind, prunec_lang::ast::ExprKind::Call { callee, .. } if callee.name == "search")
            });
            if s.kind == StageKind::Analyze && search && c.moe.is_some() {
                diags.push(
                    Diagnostic::new(
                        Code::Unsupported,
                        format!("the search masks block linears; this {} keeps most of its weights in experts", c.architecture.class_name()),
                    )
                    .with_label(s.by.as_ref().map_or(s.keyword_span, |b| b.span), "not for a mixture-of-experts model")
                    .with_help("prune its experts by `unit = expert | expert_neuron`"),
                );
            }
        }
        // FLAP's compensation needs a bias the architecture can hold.
        let compensate = matches!(r.option(s, "compensate"), Some(Value::Bool(true)));
        let unit = prunec_lang::resolved::Unit::of(r.option(s, "unit"));
        if let (true, Some(arch), Some(u)) = (
            compensate,
            model.as_ref().and_then(|m| non_llama.get(m)),
            unit,
        ) {
            let holds = *arch == "Qwen3ForCausalLM" && u != prunec_lang::resolved::Unit::Ffn;
            if !holds {
                diags.push(
                    Diagnostic::new(
                        Code::Unsupported,
                        format!("a {arch} has no bias on `{}` to hold FLAP's compensation", if u == prunec_lang::resolved::Unit::Ffn { "mlp.down_proj" } else { "self_attn.o_proj" }),
                    )
                    .with_label(s.value_span("compensate"), "not for this architecture")
                    .with_help("compensate on Llama models (and GGUF ones), or Qwen3 attention units; or remove `compensate`"),
                );
            }
        }
        // A distillation teacher reads the student's data and predicts its classes.
        if let (Some(Value::Ref(t)), Some(on)) = (r.option(s, "distill"), &s.on) {
            if let Some(ts) = models.get(t) {
                let span = s.value_span("distill");
                let sample = on.as_name().and_then(|n| data_shapes.get(&n.name));
                if let (Some(sample), Some(input)) = (sample, &ts.input) {
                    if !ts.arch.as_ref().is_none_or(|a| a.accepts(sample)) {
                        diags.push(
                            Diagnostic::new(Code::ShapeMismatch, format!("the teacher `{t}` expects input {input:?}; the samples are {sample:?}"))
                                .with_label(span, format!("expects {input:?}"))
                                .with_label(on.span, format!("samples are {sample:?}")),
                        );
                    }
                }
                let student = model
                    .as_ref()
                    .and_then(|m| models.get(m))
                    .and_then(|x| x.classes);
                if let (Some(tc), Some(sc)) = (ts.classes, student) {
                    if tc != sc {
                        diags.push(
                            Diagnostic::new(
                                Code::ShapeMismatch,
                                format!("the teacher `{t}` outputs {tc} classes, the student {sc}"),
                            )
                            .with_label(span, format!("{tc} classes"))
                            .with_label(s.subject[0].span, format!("{sc} classes"))
                            .with_help("distill from a teacher over the same classes"),
                        );
                    }
                }
            }
        }
        // A data prune: its scoring model reads the data set, and later
        // stages count what it keeps.
        if r.is_data_prune(s) {
            let Some(data) = model.clone() else { continue };
            let scorer =
                s.by.as_ref()
                    .and_then(prunec_lang::resolved::DataScore::of)
                    .and_then(|d| d.1);
            let by_span = s.by.as_ref().map_or(s.span, |b| b.span);
            if let (Some(m), Some(sample)) = (
                scorer.as_ref().and_then(|m| models.get(m)),
                data_shapes.get(&data),
            ) {
                if let (Some(input), false) =
                    (&m.input, m.arch.as_ref().is_none_or(|a| a.accepts(sample)))
                {
                    diags.push(
                        Diagnostic::new(
                            Code::ShapeMismatch,
                            format!("samples of shape {sample:?} do not fit the scoring model's input {input:?}"),
                        )
                        .with_label(s.subject[0].span, format!("samples are {sample:?}"))
                        .with_label(by_span, format!("expects {input:?}")),
                    );
                }
                if let (Some(classes), Some(&wanted)) = (m.classes, data_classes.get(&data)) {
                    if wanted > classes {
                        diags.push(
                            Diagnostic::new(
                                Code::ShapeMismatch,
                                format!("the data has {wanted} classes; the scoring model outputs {classes}"),
                            )
                            .with_label(s.subject[0].span, format!("{wanted} classes"))
                            .with_label(by_span, format!("{classes} outputs")),
                        );
                    }
                }
            }
            let fraction = s.to.as_ref().and_then(|e| r.constant(e));
            if let (Some(&(len, bs)), Some(f)) = (sizes.get(&data), fraction) {
                let kept = prunec_runtime::datascore::kept_count(len, f);
                sizes.insert(data.clone(), (kept, bs));
                batches.insert(data.clone(), kept.div_ceil(bs));
            }
            continue;
        }
        let Some(shapes) = model.as_ref().and_then(|m| models.get_mut(m)) else {
            continue;
        };
        // Data must fit the model's input.
        if let (Some(on), Some(input)) = (&s.on, &shapes.input) {
            if let Some(sample) = on.as_name().and_then(|n| data_shapes.get(&n.name)) {
                let fits = shapes.arch.as_ref().is_none_or(|a| a.accepts(sample));
                if !fits {
                    diags.push(
                        Diagnostic::new(Code::ShapeMismatch, format!("samples of shape {sample:?} do not fit the model's input {input:?}"))
                            .with_label(on.span, format!("samples are {sample:?}"))
                            .with_label(s.subject[0].span, format!("expects {input:?}")),
                    );
                }
            }
        }
        // The model must output every class of its data.
        if let (Some(on), Some(classes)) = (&s.on, shapes.classes) {
            if let Some(&wanted) = on.as_name().and_then(|n| data_classes.get(&n.name)) {
                let pair = (model.clone(), on.as_name().map(|n| n.name.clone()));
                if wanted > classes && class_pairs.insert(pair) {
                    diags.push(
                        Diagnostic::new(
                            Code::ShapeMismatch,
                            format!("the data has {wanted} classes; the model outputs {classes}"),
                        )
                        .with_label(on.span, format!("{wanted} classes"))
                        .with_label(s.subject[0].span, format!("{classes} outputs"))
                        .with_help(format!("declare the model with `classes = {wanted}`")),
                    );
                }
            }
        }
        if s.kind == StageKind::Analyze {
            analyze_shapes(s, shapes, &data_shapes, &data_classes, &mut diags);
        }
        if s.kind == StageKind::Prune {
            prune_shapes(r, s, shapes, &mut diags);
            if let Some(d) = &s.during {
                gradual_fits(r, s, d, &batches, &mut diags);
            }
            obs_gradients_fit(r, s, &sizes, &mut diags);
        }
    }
    diags.sort_by_key(|d| d.sort_key());
    diags
}

/// An oracle study's `test` data fits the model, and the model has units of
/// the kind its candidates remove.
fn analyze_shapes(
    s: &Stage,
    shapes: &Shapes,
    data_shapes: &BTreeMap<String, Vec<usize>>,
    data_classes: &BTreeMap<String, usize>,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(prunec_lang::ast::Expr {
        kind: prunec_lang::ast::ExprKind::Call { callee, args },
        span: by_span,
    }) = &s.by
    else {
        return;
    };
    // Only the oracle study reads `test` data and removes units.
    if callee.name != "oracle" {
        return;
    }
    let arg = |k: &str, i: usize| args.get(k, i);
    if let Some(test) = arg("test", 0) {
        let name = test
            .value
            .as_name()
            .map(|n| n.name.clone())
            .unwrap_or_default();
        if let (Some(sample), Some(input), Some(arch)) =
            (data_shapes.get(&name), &shapes.input, &shapes.arch)
        {
            if !arch.accepts(sample) {
                diags.push(
                    Diagnostic::new(
                        Code::ShapeMismatch,
                        format!(
                            "samples of shape {sample:?} do not fit the model's input {input:?}"
                        ),
                    )
                    .with_label(test.value.span, format!("samples are {sample:?}"))
                    .with_label(s.subject[0].span, format!("expects {input:?}")),
                );
            }
        }
        if let (Some(&wanted), Some(classes)) = (data_classes.get(&name), shapes.classes) {
            if wanted > classes {
                diags.push(
                    Diagnostic::new(
                        Code::ShapeMismatch,
                        format!("the data has {wanted} classes; the model outputs {classes}"),
                    )
                    .with_label(test.value.span, format!("{wanted} classes"))
                    .with_label(s.subject[0].span, format!("{classes} outputs")),
                );
            }
        }
    }
    let unit = match arg("unit", 2).and_then(|a| a.value.as_name()) {
        Some(u) if u.name == "channel" => prunec_lang::resolved::Unit::Channel,
        _ => prunec_lang::resolved::Unit::Neuron,
    };
    if let (Some(arch), Some(kind)) = (&shapes.arch, crate::units::kind(unit)) {
        if !arch.unit_layers().iter().any(|l| l.kind == kind) {
            diags.push(
                Diagnostic::new(
                    Code::ShapeMismatch,
                    format!("no layer of this model has {unit}s for the candidates to remove"),
                )
                .with_label(*by_span, format!("removes {unit}s"))
                .with_label(s.subject[0].span, format!("has no {unit}s"))
                .with_help(if unit == prunec_lang::resolved::Unit::Neuron {
                    "`neuron` units are the outputs of linear layers before the last; use `unit = channel` for convolutions"
                } else {
                    "`channel` units are the output channels of convolutions; use `unit = neuron` for linear layers"
                }),
            );
        }
    }
}

/// An OBS method's `grads` gradients of `batch` samples must come from its
/// data (`on D`, else the training it runs during). A gradient never spans
/// two batches, as the runtime draws them.
fn obs_gradients_fit(
    r: &CheckedRecipe,
    s: &Stage,
    sizes: &BTreeMap<String, (usize, usize)>,
    diags: &mut Vec<Diagnostic>,
) {
    use prunec_lang::resolved::Method;
    let Some(by) = &s.by else { return };
    let method = Method::of(r, by);
    if !method.is_obs() {
        return;
    }
    let Ok(args) = Method::arguments(r, by) else {
        return;
    };
    let (Some(&grads), Some(&per)) = (args.get("grads"), args.get("batch")) else {
        return;
    };
    let (grads, per) = (grads as usize, (per as usize).max(1));
    let data =
        s.on.as_ref()
            .or_else(|| s.during.as_ref().and_then(|d| d.on.as_ref()));
    let Some(d) = data.and_then(|e| e.as_name()) else {
        return;
    };
    let Some(&(len, bs)) = sizes.get(&d.name) else {
        return;
    };
    let available = (len / bs) * (bs / per) + (len % bs) / per;
    if available < grads {
        diags.push(
            Diagnostic::new(
                Code::OutOfRange,
                format!(
                    "`{}` takes {grads} gradients of {per} sample(s), but `{}` gives {available} ({len} samples in batches of {bs})",
                    method.name(),
                    d.name
                ),
            )
            .with_label(by.span, format!("{grads} gradients"))
            .with_label(data.unwrap().span, format!("{available} gradients"))
            .with_help("lower `grads` (or `batch`), or give a larger data set"),
        );
    }
}

/// A gradual schedule must end inside the training it runs during.
fn gradual_fits(
    r: &CheckedRecipe,
    s: &Stage,
    during: &Stage,
    batches: &BTreeMap<String, usize>,
    diags: &mut Vec<Diagnostic>,
) {
    let sched = match r.option(s, "schedule") {
        Some(Value::Ref(n)) => r.symbols.get(n).and_then(|x| x.value.clone()),
        other => other.cloned(),
    };
    let Some(sched) = sched.filter(|v| matches!(v.call_name(), Some("gradual" | "pdp"))) else {
        return;
    };
    let Some(b) = during
        .on
        .as_ref()
        .and_then(|e| e.as_name())
        .and_then(|n| batches.get(&n.name))
        .copied()
    else {
        return;
    };
    let total = match r.option(during, "steps").and_then(|v| v.as_i64()) {
        Some(st) => st.max(1) as usize,
        None => {
            r.option(during, "epochs")
                .and_then(|v| v.as_i64())
                .unwrap_or(1)
                .max(1) as usize
                * b
        }
    };
    if let Err(RunError::User { message, help, .. }) = gradual_plan(&sched, b, total, s.span) {
        let span = s.value_span("schedule");
        let mut d = Diagnostic::new(Code::OutOfRange, message)
            .with_label(span, "this schedule")
            .with_label(
                during.keyword_span,
                format!("{total} steps ({b} batches per epoch)"),
            );
        if let Some(h) = help {
            d = d.with_help(h);
        }
        diags.push(d);
    }
}

/// Stages in the order they run: a data prune after the training it
/// watches (it prunes when that training ends).
fn collect<'a>(r: &CheckedRecipe, s: &'a Stage, out: &mut Vec<&'a Stage>) {
    if r.is_data_prune(s) {
        if let Some(d) = &s.during {
            collect(r, d, out);
        }
        out.push(s);
        return;
    }
    out.push(s);
    if let Some(b) = &s.block {
        for inner in &b.stages {
            collect(r, inner, out);
        }
    }
    if let Some(d) = &s.during {
        collect(r, d, out);
    }
}

fn decl_value_span(r: &CheckedRecipe, name: &str) -> Option<Span> {
    r.ast.items.iter().find_map(|i| match i {
        prunec_lang::ast::Item::Decl(d) if d.name.name == name => Some(d.value.span),
        _ => None,
    })
}

/// The span of an argument a data set or model declaration writes (by name).
fn decl_arg_span(r: &CheckedRecipe, name: &str, arg: &str) -> Option<Span> {
    r.ast.items.iter().find_map(|i| match i {
        prunec_lang::ast::Item::Decl(d) if d.name.name == name => match &d.value.kind {
            prunec_lang::ast::ExprKind::Call { args, .. } => args.named(arg).map(|a| a.span),
            _ => None,
        },
        _ => None,
    })
}

fn option(r: &CheckedRecipe, s: &Stage, key: &str) -> Option<(Value, Option<Span>)> {
    let span = s.arg(key).map(|a| a.span);
    r.option(s, key).map(|v| (v.clone(), span))
}

fn prune_shapes(r: &CheckedRecipe, s: &Stage, shapes: &mut Shapes, diags: &mut Vec<Diagnostic>) {
    if let Some(unit) = prunec_lang::resolved::Unit::of(r.option(s, "unit")) {
        return unit_shapes(r, s, unit, shapes, diags);
    }
    let (targets, tspan) = match option(r, s, "targets") {
        Some((v, span)) => (strings(Some(&v)), span),
        None => (vec!["*.weight".to_string()], None),
    };
    let skip = option(r, s, "skip")
        .map(|(v, _)| strings(Some(&v)))
        .unwrap_or_default();
    let selected: Vec<&(String, Vec<usize>)> = shapes
        .params
        .iter()
        .filter(|(n, _)| {
            targets.iter().any(|t| glob_match(t, n)) && !skip.iter().any(|k| glob_match(k, n))
        })
        .collect();
    let label_span = tspan.unwrap_or(s.keyword_span);
    if selected.is_empty() {
        let names: Vec<&str> = shapes.params.iter().map(|(n, _)| n.as_str()).collect();
        diags.push(
            Diagnostic::new(
                Code::NoMatch,
                format!(
                    "the targets {targets:?} (minus skip {skip:?}) match no parameter of the model"
                ),
            )
            .with_label(label_span, "matches nothing")
            .with_help(format!("the model's parameters are: {}", names.join(", "))),
        );
        return;
    }
    for k in &skip {
        if !shapes.params.iter().any(|(n, _)| glob_match(k, n)) {
            let span = option(r, s, "skip")
                .and_then(|(_, sp)| sp)
                .unwrap_or(s.keyword_span);
            let names: Vec<&str> = shapes.params.iter().map(|(n, _)| n.as_str()).collect();
            diags.push(
                Diagnostic::new(
                    Code::NoMatch,
                    format!("the skip pattern \"{k}\" matches no parameter of the model"),
                )
                .with_label(span, "matches nothing")
                .with_help(format!("the model's parameters are: {}", names.join(", "))),
            );
        }
    }
    let block = option(r, s, "pattern").and_then(|(v, pspan)| match Pattern::of(&v) {
        Some(Pattern::Block { rows, cols }) => Some(((rows, cols), pspan)),
        _ => None,
    });
    // A global unit selection earlier decided these widths at run time.
    let pattern_span = option(r, s, "pattern")
        .and_then(|(_, sp)| sp)
        .or(s.to.as_ref().map(|t| t.span))
        .unwrap_or(s.keyword_span);
    if option(r, s, "pattern").is_some() {
        if let Some((name, _)) = selected.iter().find(|(n, _)| shapes.unknown.contains(n)) {
            diags.push(
                Diagnostic::new(
                    Code::ShapeMismatch,
                    format!("the width of `{name}` is decided at run time by an earlier `unit` stage with `scope = global`, so a pattern cannot be checked against it"),
                )
                .with_label(pattern_span, "needs a known width")
                .with_help("remove units per layer (`scope = layer`, the default) before an N:M or block pattern, or skip the tensor"),
            );
            return;
        }
    }
    if let Some(((br, bc), pspan)) = block {
        for (name, shape) in selected.iter() {
            let rows = shape.first().copied().unwrap_or(1).max(1);
            let cols = shape.iter().product::<usize>() / rows;
            if rows % br != 0 || cols % bc != 0 {
                diags.push(
                    Diagnostic::new(
                        Code::ShapeMismatch,
                        format!("`block({br}, {bc})` does not tile `{name}`: it is {rows} x {cols} as a matrix"),
                    )
                    .with_label(pspan.unwrap_or(s.keyword_span), format!("`{name}` has shape {shape:?}"))
                    .with_help(format!("choose a block that divides both sides, or skip it with `skip = [\"{name}\"]`")),
                );
            }
        }
    }
    if let Some((Value::Pattern { n, m }, pspan)) = option(r, s, "pattern") {
        for (name, shape) in selected {
            let rows = shape.first().copied().unwrap_or(1).max(1);
            let cols = shape.iter().product::<usize>() / rows;
            if cols % m as usize != 0 {
                diags.push(
                    Diagnostic::new(
                        Code::ShapeMismatch,
                        format!("`{n}:{m}` does not fit `{name}`: its input width {cols} is not a multiple of {m}"),
                    )
                    .with_label(pspan.unwrap_or(s.keyword_span), format!("`{name}` has shape {shape:?}"))
                    .with_help(format!("skip it with `skip = [\"{name}\"]`")),
                );
            }
        }
    }
}

/// A `unit = ...` stage: its targets name layers with units of its kind;
/// per layer, the widths after it are known and replace the model's shapes
/// for later stages; a global selection leaves them to the run.
fn unit_shapes(
    r: &CheckedRecipe,
    s: &Stage,
    unit: prunec_lang::resolved::Unit,
    shapes: &mut Shapes,
    diags: &mut Vec<Diagnostic>,
) {
    let Some(arch) = shapes.arch.clone() else {
        return;
    };
    if unit.of_language_models() {
        // `check` says at the option that these are for language models.
        return;
    }
    let targets = option(r, s, "targets").map(|(v, _)| strings(Some(&v)));
    let skip = option(r, s, "skip")
        .map(|(v, _)| strings(Some(&v)))
        .unwrap_or_default();
    let span = match &targets {
        Some(_) => s.value_span("targets"),
        None => s.value_span("unit"),
    };
    let layers = match crate::units::unit_targets(&arch, targets.as_deref(), &skip, unit) {
        Ok(l) => l,
        Err(e) => {
            diags.push(
                Diagnostic::new(Code::NoMatch, e.message)
                    .with_label(span, "no units here")
                    .with_help(e.help),
            );
            return;
        }
    };
    let scope = prunec_lang::resolved::Scope::of_stage(r.option(s, "scope"), false, Some(unit));
    let target = s.to.as_ref().and_then(|to| r.constant(to));
    match (scope, target) {
        (prunec_lang::resolved::Scope::Layer, Some(sparsity)) => {
            let kept = layers
                .iter()
                .map(|u| {
                    (
                        u.layer.clone(),
                        crate::units::kept_per_layer(u.units, sparsity),
                    )
                })
                .collect();
            if let Ok(a) = arch.with_units(&kept) {
                shapes.params = a.param_shapes();
                shapes.arch = Some(a);
            }
        }
        _ => {
            for u in &layers {
                shapes.unknown.insert(u.weight());
                shapes.unknown.insert(u.reader_weight());
            }
        }
    }
}

/// A prune stage of a language model against its widths as the stages
/// before it left them: a query head alone goes only where key/value heads
/// are shared; an N:M pattern must divide each targeted projection's input
/// width. A unit stage leaves the configuration smaller for the next.
fn llm_shapes(
    r: &CheckedRecipe,
    s: &Stage,
    c: &mut prunec_runtime::llm::LlamaConfig,
    diags: &mut Vec<Diagnostic>,
) {
    use prunec_lang::resolved::Unit;
    let unit = Unit::of(r.option(s, "unit"));
    if moe_shapes(r, s, c, unit, diags) {
        return;
    }
    if let Some(unit) = unit {
        let target = s.to.as_ref().and_then(|to| r.constant(to));
        match (crate::units::llm_kept(c, unit, target.unwrap_or(0.0)), unit) {
            (None, Unit::Head) => diags.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!(
                        "each of the model's {} query heads here has its own key/value head: removing one query head alone would leave its key/value head unread",
                        c.num_attention_heads
                    ),
                )
                .with_label(s.value_span("unit"), "no shared key/value heads")
                .with_help("remove whole heads with `unit = kv_group`"),
            ),
            (Some((_, _, after)), _) if target.is_some() => *c = after,
            _ => {}
        }
        return;
    }
    let Some((Value::Pattern { n, m }, pspan)) = option(r, s, "pattern") else {
        return;
    };
    let (targets, skip) = targets_and_skip(r, s);
    use prunec_runtime::llm::Proj;
    // ARMOR's square blocks tile each targeted layer's rows and columns.
    let armor_block =
        s.by.as_ref()
            .filter(|by| {
                prunec_lang::resolved::Method::of(r, by) == prunec_lang::resolved::Method::Armor
            })
            .and_then(|by| prunec_lang::resolved::Method::arguments(r, by).ok())
            .and_then(|a| a.get("block").copied())
            .map(|b| (b as usize).max(1));
    // Blocks of experts have no dense MLP projections.
    let dense_blocks: Vec<usize> = (0..c.num_hidden_layers.max(1))
        .filter(|&l| !c.is_sparse(l))
        .collect();
    for proj in Proj::ALL {
        let mlp = matches!(proj, Proj::Gate | Proj::Up | Proj::Down);
        let cols = match proj {
            Proj::O => c.q_dim(),
            Proj::Down => c.intermediate_size,
            _ => c.hidden_size,
        };
        let rows = match proj {
            Proj::Q => c.q_dim(),
            Proj::K | Proj::V => c.kv_dim(),
            Proj::Gate | Proj::Up => c.intermediate_size,
            Proj::O | Proj::Down => c.hidden_size,
        };
        // Every block has the same widths: a projection counts when any
        // block's is targeted.
        let name = prunec_runtime::llm::linear_name(0, proj);
        let picked = (0..c.num_hidden_layers.max(1)).any(|l| {
            if mlp && !dense_blocks.contains(&l) {
                return false;
            }
            let n = prunec_runtime::llm::linear_name(l, proj);
            targets.iter().any(|t| glob_match(t, &n)) && !skip.iter().any(|k| glob_match(k, &n))
        });
        if picked && cols % m as usize != 0 {
            let generic = name.replacen("layers.0.", "layers.*.", 1);
            diags.push(
                Diagnostic::new(
                    Code::ShapeMismatch,
                    format!("`{n}:{m}` does not fit `{generic}`: its input width {cols} (after the units removed before) is not a multiple of {m}"),
                )
                .with_label(pspan.or(s.to.as_ref().map(|t| t.span)).unwrap_or(s.keyword_span), "does not divide")
                .with_help(format!("remove a number of units that leaves a multiple of {m}, or skip it with `skip = [\"{generic}\"]`")),
            );
        }
        if let (true, Some(k)) = (picked, armor_block) {
            if rows % k != 0 || cols % k != 0 {
                let generic = name.replacen("layers.0.", "layers.*.", 1);
                diags.push(
                    Diagnostic::new(
                        Code::ShapeMismatch,
                        format!("ARMOR's blocks of {k} do not tile `{generic}`: it is {rows} x {cols}"),
                    )
                    .with_label(s.by.as_ref().map_or(s.keyword_span, |b| b.span), "block size")
                    .with_help(format!("choose a `block` dividing both (e.g. {}), or skip it with `skip = [\"{generic}\"]`", gcd(rows, cols))),
                );
            }
        }
    }
}

/// Experts: `unit = expert | expert_neuron` needs a mixture-of-experts
/// model, which prunec prunes by those units (and attention units) only;
/// whole experts keep at least the `top_k` each token uses. Returns whether
/// the stage was an expert stage (nothing else to check).
fn moe_shapes(
    r: &CheckedRecipe,
    s: &Stage,
    c: &mut prunec_runtime::llm::LlamaConfig,
    unit: Option<prunec_lang::resolved::Unit>,
    diags: &mut Vec<Diagnostic>,
) -> bool {
    use prunec_lang::resolved::Unit;
    let arch = c.architecture.class_name();
    let Some(mc) = c.moe.as_mut() else {
        if let Some(u) = unit.filter(|u| u.of_experts()) {
            diags.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!("`unit = {u}` removes experts; this model (a {arch}) has none"),
                )
                .with_label(s.value_span("unit"), "no experts here")
                .with_help("prune experts of a mixture-of-experts model (`Qwen3MoeForCausalLM`, `MixtralForCausalLM`); a dense model's FFN neurons are `unit = ffn`"),
            );
            return true;
        }
        return false;
    };
    match unit {
        Some(Unit::Expert) => {
            let target = s.to.as_ref().and_then(|to| r.constant(to));
            if let Some(t) = target {
                let kept = crate::units::kept_per_layer(mc.num_experts, t);
                if kept < mc.top_k {
                    diags.push(
                        Diagnostic::new(
                            Code::Unsupported,
                            format!("removing {:.0}% of the {} experts leaves {kept}, fewer than the {} each token is routed to", t * 100.0, mc.num_experts, mc.top_k),
                        )
                        .with_label(s.to.as_ref().map_or(s.keyword_span, |t| t.span), "too many experts removed")
                        .with_help(format!("keep at least {} experts per sparse block", mc.top_k)),
                    );
                } else {
                    mc.num_experts = kept;
                }
            }
            true
        }
        Some(Unit::ExpertNeuron) => {
            // Every expert keeps one atomic expert at least; with equal
            // widths each loses its own share (the export's new width).
            let target = s.to.as_ref().and_then(|to| r.constant(to));
            let equal = matches!(r.option(s, "equal_widths"), Some(Value::Bool(true)));
            let (w, n) = (mc.moe_intermediate_size, mc.num_experts);
            if let Some(t) = target {
                let removed = |units: usize| (units as f64 * t + 1e-9).floor() as usize;
                let (asked, most) = if equal {
                    (removed(w), w - 1)
                } else {
                    (removed(n * w), n * w - n)
                };
                if asked > most {
                    diags.push(
                        Diagnostic::new(
                            Code::Unsupported,
                            format!(
                                "removing {:.0}% of the atomic experts would leave an expert with none ({} of {} asked, at most {most})",
                                t * 100.0,
                                asked,
                                if equal { w } else { n * w }
                            ),
                        )
                        .with_label(s.to.as_ref().map_or(s.keyword_span, |t| t.span), "too many atomic experts removed")
                        .with_help("every expert keeps one atomic expert at least: remove fewer, or whole experts (`unit = expert`)"),
                    );
                } else if equal {
                    mc.moe_intermediate_size = w - asked;
                }
            }
            true
        }
        Some(Unit::Ffn) => {
            diags.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!("the FFN neurons of this {arch} live in its experts"),
                )
                .with_label(s.value_span("unit"), "a mixture-of-experts model")
                .with_help("remove atomic experts (`unit = expert_neuron`) or whole experts (`unit = expert`)"),
            );
            true
        }
        Some(_) => false,
        None => {
            // Single weights: the stage's targets must leave the experts
            // out (they are not among the linears one-shot methods prune).
            let (targets, skip) = targets_and_skip(r, s);
            // Every router and expert weight of every sparse block.
            let mut names: Vec<String> = Vec::new();
            for l in (0..mc.sparse.len()).filter(|&l| mc.sparse[l]) {
                names.push(mc.router_name(l));
                for e in 0..mc.num_experts {
                    for p in ["gate", "up", "down"] {
                        names.push(mc.expert_name(l, e, p));
                    }
                }
            }
            let hit = names.iter().find(|n| {
                targets.iter().any(|t| glob_match(t, n)) && !skip.iter().any(|k| glob_match(k, n))
            });
            let Some(hit) = hit else {
                return false;
            };
            let span = option(r, s, "targets")
                .and_then(|(_, sp)| sp)
                .or(s.by.as_ref().map(|b| b.span))
                .unwrap_or(s.keyword_span);
            diags.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!("the stage's targets take `{hit}`, but single weights of a {arch}'s experts and routers are not pruned: they would stay dense"),
                )
                .with_label(span, "takes the experts")
                .with_help("remove experts (`unit = expert`) or atomic experts (`unit = expert_neuron`); to sparsify the attention, target it alone (`targets = [\"*.self_attn.*\"]`)"),
            );
            true
        }
    }
}

/// A prune stage's `targets` (every name by default) and `skip` globs.
fn targets_and_skip(r: &CheckedRecipe, s: &Stage) -> (Vec<String>, Vec<String>) {
    let targets = option(r, s, "targets")
        .map(|(v, _)| strings(Some(&v)))
        .unwrap_or_else(|| vec!["*".into()]);
    let skip = option(r, s, "skip")
        .map(|(v, _)| strings(Some(&v)))
        .unwrap_or_default();
    (targets, skip)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
