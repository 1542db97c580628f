//! Front-end driver: file → source → AST → checked recipe, and diagnostic rendering.

use prunec_lang::diag::{Code, Diagnostic};
use prunec_lang::{ast_to_checked, source_to_ast, CheckedRecipe, Override, Span};
use std::path::Path;

/// The size of the stack front-end work runs on: deep (but accepted)
/// expressions recurse, and no input may overflow it.
pub const FRONT_END_STACK: usize = 256 * 1024 * 1024;

/// A recipe file read from disk.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// The path as the user gave it (used in messages).
    pub name: String,
    /// The text; empty when the file could not be decoded.
    pub text: String,
}

/// The outcome of checking one file.
pub struct Checked {
    pub file: SourceFile,
    pub result: Result<CheckedRecipe, Vec<Diagnostic>>,
}

/// Reads a recipe, turning I/O and encoding problems into diagnostics.
pub fn read_source(path: &Path) -> Result<SourceFile, Box<(SourceFile, Diagnostic)>> {
    let name = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            let file = SourceFile {
                name: name.clone(),
                text: String::new(),
            };
            let d = Diagnostic::new(Code::Empty, format!("cannot read `{name}`: {e}"))
                .with_help("check the path and that the file is readable");
            return Err(Box::new((file, d)));
        }
    };
    match prunec_lang::parse::bytes_to_source(&bytes) {
        Ok(text) => Ok(SourceFile {
            name,
            text: text.to_string(),
        }),
        Err(d) => {
            // Keep the valid prefix so the label can point at the bad byte.
            let valid = String::from_utf8_lossy(
                &bytes[..d
                    .primary_span()
                    .map(|s| s.start)
                    .unwrap_or(0)
                    .min(bytes.len())],
            )
            .into_owned();
            Err(Box::new((SourceFile { name, text: valid }, d)))
        }
    }
}

/// Runs `f` on a thread with a large stack, so that no accepted input can
/// overflow it; a panic inside becomes an internal error.
pub fn on_big_stack<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    std::thread::Builder::new()
        .name("prunec-front-end".into())
        .stack_size(FRONT_END_STACK)
        .spawn(f)
        .map_err(|e| format!("cannot start the front-end thread: {e}"))?
        .join()
        .map_err(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string())
        })
}

/// Parses and checks a source text.
pub fn source_to_checked(file: SourceFile, overrides: &[Override]) -> Checked {
    let parsed = source_to_ast(&file.text);
    if !parsed.errors.is_empty() {
        // Semantic errors on a half-parsed file mislead (names declared in a
        // broken declaration look undefined), so syntax errors come alone.
        return Checked {
            file,
            result: Err(parsed.errors),
        };
    }
    let result = ast_to_checked(&parsed.recipe, &file.text, overrides).and_then(|r| {
        // Stage 4: shapes and files, from headers only.
        let mut diags = crate::lower::check_criteria(&r);
        diags.extend(crate::shapes::check_shapes(&r));
        diags.sort_by_key(|d| d.sort_key());
        if diags.is_empty() {
            Ok(r)
        } else {
            Err(diags)
        }
    });
    Checked { file, result }
}

/// At most this many diagnostics of one file are printed; the rest are counted.
pub const MAX_SHOWN: usize = 100;

/// Renders diagnostics the way rustc does, for a terminal or a snapshot.
pub fn render(file: &SourceFile, diags: &[Diagnostic], color: bool) -> String {
    use miette::{GraphicalReportHandler, GraphicalTheme};
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme)
        .with_width(100)
        .with_links(false);
    let mut out = String::new();
    for d in diags.iter().take(MAX_SHOWN) {
        let sourced = d.with_source(&file.name, &file.text);
        if handler.render_report(&mut out, &sourced).is_err() {
            out.push_str(&format!("error[{}]: {}\n", d.code, d.message));
        }
    }
    if diags.len() > MAX_SHOWN {
        out.push_str(&format!(
            "... and {} more errors not shown\n",
            diags.len() - MAX_SHOWN
        ));
    }
    out
}

/// The JSON-lines form of diagnostics.
pub fn render_json(file: &SourceFile, diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diags.iter().take(MAX_SHOWN) {
        out.push_str(&d.to_json(&file.name, &file.text).to_string());
        out.push('\n');
    }
    out
}

/// A diagnostic about the file as a whole (no span in it).
pub fn file_diagnostic(code: Code, message: impl Into<String>) -> Diagnostic {
    Diagnostic::new(code, message).with_label(Span::new(0, 0), "")
}

/// Renders a run-time problem (an error or a failed assert) at its recipe span.
pub fn render_run_error(file: &SourceFile, d: &Diagnostic, color: bool) -> String {
    let mut d = d.clone();
    d.code = Code::StageClause;
    render(file, &[d], color).replacen("P043", "run", 1)
}
