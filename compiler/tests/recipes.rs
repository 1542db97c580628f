//! Recipe fixtures: every file under `tests/recipes/invalid` gives its
//! snapshot diagnostic and exit 1; every valid recipe and example checks,
//! formats idempotently and keeps its meaning under `prunec fmt`.

use prunec::driver::{self, SourceFile};
use prunec_lang::Override;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn prune_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "prune"))
        .collect();
    v.sort();
    v
}

/// `--set` overrides a fixture or example asks for in a `# check-args:` line
/// (an example whose model `scripts/interop.sh` makes names a committed
/// stand-in, so a fresh checkout checks it too).
fn fixture_args(text: &str) -> Vec<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("# check-args:"))
        .map(|rest| rest.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

fn overrides(args: &[String]) -> Vec<Override> {
    args.chunks(2)
        .filter(|c| c[0] == "--set")
        .map(|c| c[1].parse().unwrap())
        .collect()
}

/// Checks a file the way `prunec check` does from the repository root (where
/// the recipes' relative data and model paths point, as in the README's
/// commands); returns the rendered diagnostics. Every caller sets the same
/// folder, so tests running side by side agree on it.
fn check_file(path: &Path, args: &[String]) -> Option<String> {
    std::env::set_current_dir(root()).unwrap();
    let rel = path
        .strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string();
    let (file, diags) = match driver::read_source(path) {
        Ok(f) => {
            let f = SourceFile { name: rel, ..f };
            let c = driver::source_to_checked(f, &overrides(args));
            (c.file, c.result.err())
        }
        Err(bad) => {
            let (f, d) = *bad;
            (SourceFile { name: rel, ..f }, Some(vec![d]))
        }
    };
    diags.map(|d| driver::render(&file, &d, false))
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prunec"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run prunec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_recipes_give_their_snapshot_diagnostics() {
    // Fixtures are checked against real file headers (shapes, classes).
    for (rel, fetch) in [
        ("data/mnist/train-images-idx3-ubyte", "mnist"),
        ("data/digits/digits.csv.gz", "digits"),
        ("data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
        ("data/text/sotu", "text"),
    ] {
        assert!(
            root().join(rel).exists(),
            "{rel} is missing: run `scripts/fetch-data.sh {fetch}`"
        );
    }
    let files = prune_files(&root().join("tests/recipes/invalid"));
    assert!(files.len() >= 30, "only {} invalid fixtures", files.len());
    for path in files {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        let args = fixture_args(&text);
        let rendered = check_file(&path, &args).unwrap_or_else(|| panic!("{name} checked clean"));
        let code = name.split('_').next().unwrap();
        assert!(
            rendered.contains(code),
            "{name}: expected a {code} diagnostic, got:\n{rendered}"
        );
        insta::assert_snapshot!(name.clone(), rendered);
    }
}

#[test]
fn the_cli_exits_1_on_every_invalid_recipe_and_0_on_valid_ones() {
    for path in prune_files(&root().join("tests/recipes/invalid")) {
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        let mut args = vec!["check".to_string()];
        args.extend(fixture_args(&text));
        args.push(path.display().to_string());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = run_cli(&refs);
        assert_eq!(code, 1, "{}: {stderr}", path.display());
        // JSON lines carry the same diagnostics.
        let mut json_args = refs.clone();
        json_args.insert(1, "--format=json");
        let (code, stdout, _) = run_cli(&json_args);
        assert_eq!(code, 1);
        for line in stdout.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for key in ["file", "line", "column", "end", "code", "message", "help"] {
                assert!(v.get(key).is_some(), "{key} missing in {line}");
            }
        }
        assert!(!stdout.is_empty());
    }
    let mut valid = prune_files(&root().join("tests/recipes/valid"));
    valid.extend(prune_files(&root().join("examples")));
    for path in valid {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut args = vec!["check".to_string()];
        args.extend(fixture_args(&text));
        args.push(path.display().to_string());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = run_cli(&refs);
        assert_eq!(code, 0, "{}: {stderr}", path.display());
    }
}

/// The AST as JSON with every span removed, for meaning comparisons.
fn ast_without_spans(src: &str) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("span");
                m.remove("keyword_span");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let parsed = prunec_lang::source_to_ast(src);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mut v = serde_json::to_value(&parsed.recipe).unwrap();
    strip(&mut v);
    v
}

fn format(src: &str) -> String {
    let parsed = prunec_lang::source_to_ast(src);
    assert!(parsed.errors.is_empty());
    prunec_lang::fmt::ast_to_source(&parsed.recipe, src)
}

#[test]
fn fmt_is_idempotent_meaning_preserving_and_keeps_comments() {
    let mut files = prune_files(&root().join("tests/recipes/valid"));
    files.extend(prune_files(&root().join("examples")));
    files.push(root().join("stdlib/criteria.prune"));
    for path in files {
        let src = std::fs::read_to_string(&path).unwrap();
        let once = format(&src);
        let twice = format(&once);
        assert_eq!(once, twice, "{}: fmt is not idempotent", path.display());
        assert_eq!(
            ast_without_spans(&src),
            ast_without_spans(&once),
            "{}: fmt changed the meaning",
            path.display()
        );
        let count = |s: &str| prunec_lang::parse::comments(s).len();
        assert_eq!(
            count(&src),
            count(&once),
            "{}: fmt lost a comment",
            path.display()
        );
        assert!(once.ends_with('\n'));
    }
    let messy =
        std::fs::read_to_string(root().join("tests/recipes/valid/messy_layout.prune")).unwrap();
    insta::assert_snapshot!("fmt_messy_layout", format(&messy));
}

#[test]
fn examples_are_formatted() {
    for path in prune_files(&root().join("examples")) {
        let (code, stdout, stderr) = run_cli(&["fmt", "--check", &path.display().to_string()]);
        assert_eq!(code, 0, "{}: {stdout}{stderr}", path.display());
    }
}

#[test]
fn fmt_rewrites_atomically_and_check_mode_reports() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.prune");
    let messy = "recipe r{version=1,seed=0}\nmodel net=mlp(inputs=64,classes=10)\ndataset d=digits(\"x\")\npipeline{train net on d (epochs=1)}\n";
    std::fs::write(&path, messy).unwrap();
    let p = path.display().to_string();
    assert_eq!(run_cli(&["fmt", "--check", &p]).0, 1);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        messy,
        "--check must not write"
    );
    assert_eq!(run_cli(&["fmt", &p]).0, 0);
    let formatted = std::fs::read_to_string(&path).unwrap();
    assert_eq!(formatted, format(messy));
    assert_eq!(run_cli(&["fmt", "--check", &p]).0, 0);
    // Only the recipe is left in the folder: no temporary files.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A file with syntax errors is reported and left alone.
    std::fs::write(&path, "recipe r {").unwrap();
    assert_eq!(run_cli(&["fmt", &p]).0, 1);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "recipe r {");
}

#[test]
fn hostile_inputs_get_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("binary", vec![0xff, 0xfe, 0x00, 0x12, 0x80]),
        (
            "deep_parens",
            format!("param x = {}1{}", "(".repeat(10_000), ")".repeat(10_000)).into_bytes(),
        ),
        (
            "deep_lists",
            format!("param x = {}1{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        ),
        (
            "deep_calls",
            format!(
                "criterion c = {}w{}",
                "abs(".repeat(10_000),
                ")".repeat(10_000)
            )
            .into_bytes(),
        ),
        (
            "deep_neg",
            format!("param x = {}1", "-".repeat(10_000)).into_bytes(),
        ),
        (
            "long_sum",
            format!(
                "recipe r {{ version = 1 }}\nparam x = 1{}\npipeline {{}}",
                " + 1".repeat(20_000)
            )
            .into_bytes(),
        ),
        (
            "long_pow",
            format!(
                "recipe r {{ version = 1 }}\ncriterion c = w{}\npipeline {{}}",
                " ^ w".repeat(20_000)
            )
            .into_bytes(),
        ),
        ("ten_mb", "# padding\n".repeat(1_000_000).into_bytes()),
        (
            "many_stages",
            format!(
                "recipe r {{ version = 1 }}\npipeline {{\n{}}}",
                "train net on d\n".repeat(50_000)
            )
            .into_bytes(),
        ),
        (
            "unclosed_string",
            b"recipe r { version = 1 }\nparam s = \"abc\npipeline {}".to_vec(),
        ),
        (
            "during_chain",
            format!(
                "pipeline {{ prune n by c to 1% {} train n on d }}",
                "during prune n by c to 1% ".repeat(5_000)
            )
            .into_bytes(),
        ),
    ];
    for (name, bytes) in cases {
        let path = dir.path().join(format!("{name}.prune"));
        std::fs::write(&path, &bytes).unwrap();
        let p = path.display().to_string();
        let (code, _, stderr) = run_cli(&["check", &p]);
        assert!(
            code == 0 || code == 1,
            "{name}: check exited {code}: {}",
            &stderr[..stderr.len().min(2000)]
        );
        let (code, _, stderr) = run_cli(&["fmt", "--check", &p]);
        assert!(
            code == 0 || code == 1,
            "{name}: fmt exited {code}: {}",
            &stderr[..stderr.len().min(2000)]
        );
    }
}
