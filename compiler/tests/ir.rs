//! IR tests: the lowered graph and the graph after each pass, as snapshots;
//! the verifier after every pass; `prunec graph` and `prunec plan` on every example.

use prunec::ir::{self, passes};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn checked(rel: &str) -> prunec_lang::CheckedRecipe {
    let src = std::fs::read_to_string(root().join(rel)).unwrap();
    let parsed = prunec_lang::source_to_ast(&src);
    assert!(parsed.errors.is_empty());
    prunec_lang::ast_to_checked(&parsed.recipe, &src, &[]).unwrap()
}

#[test]
fn each_pass_before_and_after() {
    let r = checked("tests/recipes/ir/passes.prune");
    let mut g = ir::checked_to_ir(&r, &r.source);
    ir::verify(&g).unwrap();
    let mut log = format!("== lowered\n{}", g.to_text());
    for (name, pass) in [
        (
            "fold",
            passes::fold as fn(&mut ir::Ir, &prunec_lang::CheckedRecipe),
        ),
        ("cse", passes::cse),
        ("fuse", passes::fuse),
        ("dce", passes::dce),
    ] {
        let before = g.to_text();
        pass(&mut g, &r);
        ir::verify(&g).unwrap_or_else(|e| panic!("after {name}: {e}"));
        assert_ne!(
            before,
            g.to_text(),
            "the {name} pass changed nothing on its fixture"
        );
        log.push_str(&format!("== after {name}\n{}", g.to_text()));
    }
    insta::assert_snapshot!("ir_passes", log);
}

#[test]
fn fold_knows_every_rounds_sparsity() {
    let r = checked("tests/recipes/ir/passes.prune");
    let mut g = ir::checked_to_ir(&r, &r.source);
    passes::optimize(&mut g, &r).unwrap();
    let fused: Vec<Vec<f64>> = g
        .graph
        .node_weights()
        .filter_map(|n| match &n.op {
            ir::Op::FusedPrune { sparsities, .. } => Some(sparsities.clone()),
            _ => None,
        })
        .collect();
    // magnitude to 90% in 3 rounds: 1 - 0.1^(k/3); 2:4 is 50%.
    assert_eq!(fused.len(), 3, "{fused:?}");
    let imp = &fused[1];
    for (k, s) in imp.iter().enumerate() {
        let want = 1.0 - 0.1f64.powf((k + 1) as f64 / 3.0);
        assert!((s - want).abs() < 1e-12, "{imp:?}");
    }
    assert_eq!(fused[2], vec![0.5]);
}

#[test]
fn graph_and_plan_work_on_every_example() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let p = f.display().to_string();
        // A `# check-args:` line names a committed stand-in for a model that
        // `scripts/interop.sh` makes (see the recipes tests).
        let text = std::fs::read_to_string(&f).unwrap();
        let sets: Vec<String> = text
            .lines()
            .find_map(|l| l.strip_prefix("# check-args:"))
            .map(|rest| rest.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        for stage in ["lowered", "optimized"] {
            let out = Command::new(env!("CARGO_BIN_EXE_prunec"))
                .args(["graph", "--stage", stage])
                .args(&sets)
                .arg(&p)
                .current_dir(root())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{p}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).starts_with("digraph"));
        }
        let out = Command::new(env!("CARGO_BIN_EXE_prunec"))
            .arg("plan")
            .args(&sets)
            .arg(&p)
            .current_dir(root())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{p}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("steps (what `prunec run` executes, in order)"),
            "{p}: {text}"
        );
    }
}

/// The plans of the run fixtures, as `prunec plan` prints them: the steps a
/// run executes with their ids, the statistics steps and what DCE dropped.
#[test]
fn plans_name_the_language_model_calibration_flow() {
    std::env::set_current_dir(root()).unwrap();
    let base = std::fs::read_to_string(root().join("tests/recipes/run/tiny_llm_hf.prune")).unwrap();
    let step = |options: &str| {
        let src = base.replace(
            "calibrate = calib)",
            &format!("calibrate = calib{options})"),
        );
        assert!(options.is_empty() || src != base);
        let parsed = prunec_lang::source_to_ast(&src);
        assert!(parsed.errors.is_empty());
        let r = prunec_lang::ast_to_checked(&parsed.recipe, &src, &[]).unwrap();
        let mut g = ir::checked_to_ir(&r, &r.source);
        passes::optimize(&mut g, &r).unwrap();
        let plan = prunec::plan::ir_to_plan(&g, &r).unwrap();
        let text = prunec::plan::render(&r, &plan).unwrap();
        text.lines()
            .find(|l| l.contains("prune lm"))
            .unwrap()
            .to_string()
    };
    let dense = "every block calibrated on calib through the dense model";
    let pruned = "each block calibrated on calib through the blocks pruned before it";
    let by_group = "its layers pruned group by group";
    let block_dense = "all its layers on the block's activations before any is pruned";
    for (options, says) in [
        ("", [pruned, block_dense]),
        (", sequential = false", [dense, block_dense]),
        (", true_sequential = true", [pruned, by_group]),
        (
            ", sequential = false, true_sequential = true",
            [dense, by_group],
        ),
    ] {
        let line = step(options);
        assert!(says.iter().all(|s| line.contains(s)), "{options}: {line}");
    }
}

#[test]
fn plans_of_the_run_fixtures() {
    // Model files (`onnx(...)`) are read relative to the repository root, as the
    // README's commands run; every test that sets the folder sets the same one.
    std::env::set_current_dir(root()).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/recipes/run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let rel = f
            .strip_prefix(root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let r = checked(&rel);
        let mut g = ir::checked_to_ir(&r, &r.source);
        passes::optimize(&mut g, &r).unwrap();
        let plan = prunec::plan::ir_to_plan(&g, &r).unwrap();
        let text = prunec::plan::render(&r, &plan).unwrap();
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        insta::assert_snapshot!(format!("plan_{name}"), text);
    }
}
