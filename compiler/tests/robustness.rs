//! Property tests: random mutations of every valid recipe and example never
//! make the front end panic, and `fmt` is idempotent on whatever parses.

use proptest::prelude::*;
use prunec::driver::{self, SourceFile};
use std::path::Path;

fn corpus() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = Vec::new();
    for dir in ["examples", "tests/recipes/valid", "stdlib"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "prune") {
                out.push(std::fs::read_to_string(p).unwrap());
            }
        }
    }
    out.sort();
    out
}

/// Splits text into rough tokens (words, single punctuation, whitespace runs).
fn tokens(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut prev: Option<u8> = None;
    for (i, c) in s.char_indices() {
        let class = if c.is_alphanumeric() || c == '_' {
            0
        } else if c.is_whitespace() {
            1
        } else {
            2 + (i as u8 % 200)
        };
        if prev.is_some_and(|p| p != class || class >= 2) && i > start {
            out.push(&s[start..i]);
            start = i;
        }
        prev = Some(class);
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Truncate(usize),
    Noise(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Noise(a, b)),
    ]
}

fn apply(src: &str, muts: &[Mutation]) -> Vec<u8> {
    let mut toks: Vec<String> = tokens(src).into_iter().map(String::from).collect();
    let mut bytes_noise = Vec::new();
    for m in muts {
        if toks.is_empty() {
            break;
        }
        let n = toks.len();
        match *m {
            Mutation::Delete(i) => {
                toks.remove(i % n);
            }
            Mutation::Duplicate(i) => {
                let t = toks[i % n].clone();
                toks.insert(i % n, t);
            }
            Mutation::Swap(a, b) => toks.swap(a % n, b % n),
            Mutation::Truncate(i) => toks.truncate(i % n),
            Mutation::Noise(i, b) => bytes_noise.push((i, b)),
        }
    }
    let mut bytes = toks.concat().into_bytes();
    for (i, b) in bytes_noise {
        if !bytes.is_empty() {
            let at = i % bytes.len();
            bytes[at] = b;
        }
    }
    bytes
}

/// Runs what `prunec check` and `prunec fmt` run, in process.
fn front_end(bytes: Vec<u8>) -> Result<(), String> {
    driver::on_big_stack(move || {
        let text = match prunec_lang::parse::bytes_to_source(&bytes) {
            Ok(t) => t.to_string(),
            Err(_) => return,
        };
        let file = SourceFile {
            name: "m.prune".into(),
            text: text.clone(),
        };
        let checked = driver::source_to_checked(file.clone(), &[]);
        if let Err(d) = &checked.result {
            let _ = driver::render(&checked.file, d, false);
            let _ = driver::render_json(&checked.file, d);
        }
        let parsed = prunec_lang::source_to_ast(&text);
        if parsed.errors.is_empty() {
            let once = prunec_lang::fmt::ast_to_source(&parsed.recipe, &text);
            let again = prunec_lang::source_to_ast(&once);
            assert!(
                again.errors.is_empty(),
                "fmt output does not parse:\n{once}"
            );
            let twice = prunec_lang::fmt::ast_to_source(&again.recipe, &once);
            assert_eq!(once, twice, "fmt is not idempotent");
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn mutated_recipes_never_panic(file in any::<usize>(), muts in proptest::collection::vec(mutation(), 1..6)) {
        let corpus = corpus();
        let src = &corpus[file % corpus.len()];
        let bytes = apply(src, &muts);
        if let Err(panic) = front_end(bytes.clone()) {
            panic!("panic: {panic}\ninput:\n{}", String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn random_text_never_panics(text in "[a-z0-9 =(){}\\[\\],.:%#\"\\n+*/<>^-]{0,400}") {
        if let Err(panic) = front_end(text.clone().into_bytes()) {
            panic!("panic: {panic}\ninput:\n{text}");
        }
    }
}
