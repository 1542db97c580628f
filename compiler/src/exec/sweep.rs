//! Running several variants of one recipe (a `--sweep`, or a single run) as
//! a tree: the variants walk their plans together while every step they
//! reach reads the same param values, so a shared prefix (dense training,
//! calibration, a dense evaluation) runs once; where a step reads a param
//! whose values differ, the state forks (models copied, data shared) and
//! each branch goes on alone. A step's params are in the plan
//! (`Step::params`).

use super::{Exec, RunError, RunOptions, RunOutcome};
use crate::report::Step;
use prunec_lang::CheckedRecipe;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;

/// One variant of a recipe: its checked form with the swept values applied.
pub struct Variant<'r> {
    /// Its folder under the output folder (empty for a run without a sweep).
    pub name: String,
    /// The swept params and their values as written (`target`, `50%`).
    pub values: Vec<(String, String)>,
    pub recipe: &'r CheckedRecipe,
}

/// What a sweep produced: each variant's outcome (in the variants' order)
/// and every step executed, once, with the variants that shared it.
pub struct SweepOutcome {
    pub variants: Vec<RunOutcome>,
    pub steps: Vec<Step>,
}

/// What a step does in one variant, as far as the variants can differ: the
/// values of the params it reads. Exports write each variant's own files,
/// so an export never merges variants.
fn fingerprint(v: &Variant<'_>, step: &crate::plan::Step) -> String {
    let mut fp: Vec<String> = step
        .params
        .iter()
        .map(|p| {
            let value = v.recipe.param(p).map(|x| x.to_string()).unwrap_or_default();
            format!("{p}={value}")
        })
        .collect();
    if matches!(step.action, crate::plan::Action::Export { .. }) {
        fp.push(format!("variant {}", v.name));
    }
    fp.join(", ")
}

/// A state on its way through the pipeline, standing for `group`.
struct Pending<'a> {
    ex: Exec<'a>,
    group: Vec<usize>,
    next: usize,
}

/// Runs every variant (one for a plain run) into `opts.out_dir`, each in its
/// own folder when it has a name; nothing is published unless all succeed.
/// `write_extra` adds files to the staging root (a sweep's comparison and
/// lock) before everything is moved into place.
pub(super) fn run_variants<'a>(
    variants: &[Variant<'a>],
    recipe_path: &Path,
    recipe_text: &str,
    opts: &RunOptions,
    write_extra: &dyn Fn(&Path, &SweepOutcome) -> std::io::Result<()>,
) -> Result<SweepOutcome, RunError> {
    let first = variants
        .first()
        .ok_or_else(|| RunError::Internal("no variant to run".into()))?;
    let staging = super::create_staging(&opts.out_dir)?;
    let root = staging.path().to_path_buf();
    // Every variant's plan, from its optimized IR: the same steps for all
    // (the variants share the recipe's text), with their own sparsities.
    let mut plans = Vec::with_capacity(variants.len());
    for v in variants {
        let mut ir = crate::ir::checked_to_ir(v.recipe, recipe_text);
        crate::ir::passes::optimize(&mut ir, v.recipe).map_err(RunError::Internal)?;
        plans.push(crate::plan::ir_to_plan(&ir, v.recipe).map_err(RunError::Internal)?);
    }
    let ids = |p: &crate::plan::Plan| p.all().iter().map(|s| s.id.clone()).collect::<Vec<_>>();
    if plans.iter().any(|p| ids(p) != ids(&plans[0])) {
        return Err(RunError::Internal(
            "sweep variants differ in their plan's steps".into(),
        ));
    }
    let steps_count = plans[0].steps.len();
    // The rewind points a state keeps: those of every variant it stands for.
    let rewinds = |group: &[usize]| {
        let mut out: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for &i in group {
            for (model, epochs) in plans[i].rewind_epochs() {
                out.entry(model).or_default().extend(epochs);
            }
        }
        out
    };
    let names = |group: &[usize]| -> Vec<String> {
        if variants.len() == 1 {
            vec![]
        } else {
            group.iter().map(|&i| variants[i].name.clone()).collect()
        }
    };
    let all: Vec<usize> = (0..variants.len()).collect();
    let mut root_ex = Exec::new(
        first.recipe,
        rewinds(&all),
        names(&all),
        recipe_path,
        recipe_text,
        root.clone(),
        opts,
    )?;
    if variants.len() == 1 {
        root_ex.staging = root.join(&first.name);
    }
    root_ex.report.dropped = plans[0].dropped.clone();
    let mut stack = vec![Pending {
        ex: root_ex,
        group: all,
        next: 0,
    }];
    let mut steps = Vec::new();
    let mut done: Vec<Option<RunOutcome>> = variants.iter().map(|_| None).collect();
    // Forks `ex` for `group`, led by its first variant.
    let fork = |ex: &Exec<'a>, group: &[usize]| -> Result<Exec<'a>, RunError> {
        let lead = &variants[group[0]];
        let f = ex.fork(
            lead.recipe,
            rewinds(group),
            names(group),
            root.join(&lead.name),
        )?;
        Ok(f)
    };
    while let Some(Pending {
        mut ex,
        group,
        next,
    }) = stack.pop()
    {
        if next == steps_count || ex.failed_assert.is_some() {
            // Each variant finishes on its own copy (outputs, report, lock).
            let (&last, rest) = group.split_last().expect("a group is never empty");
            for &v in rest {
                done[v] = Some(fork(&ex, &[v])?.finish()?);
            }
            let lead = &variants[last];
            ex.retarget(
                lead.recipe,
                rewinds(&[last]),
                names(&[last]),
                root.join(&lead.name),
            );
            done[last] = Some(ex.finish()?);
            continue;
        }
        let step = &plans[group[0]].steps[next];
        let mut parts: Vec<(String, Vec<usize>)> = Vec::new();
        for &v in &group {
            let fp = fingerprint(&variants[v], step);
            match parts.iter_mut().find(|(f, _)| *f == fp) {
                Some((_, p)) => p.push(v),
                None => parts.push((fp, vec![v])),
            }
        }
        if parts.len() > 1 {
            if opts.progress {
                let (line, _) = prunec_lang::diag::line_col(recipe_text, step.span.start);
                eprintln!(
                    "sweep: {} branches from line {line} ({})",
                    parts.len(),
                    parts
                        .iter()
                        .map(|(_, p)| names(p).join(" "))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
            // Pushed in reverse, so the first branch runs first.
            let last = parts.len() - 1;
            let mut forks = Vec::with_capacity(parts.len());
            for (i, (_, p)) in parts.iter().enumerate() {
                if i < last {
                    forks.push(fork(&ex, p)?);
                }
            }
            let lead = &variants[parts[last].1[0]];
            ex.retarget(
                lead.recipe,
                rewinds(&parts[last].1),
                names(&parts[last].1),
                root.join(&lead.name),
            );
            forks.push(ex);
            for (f, (_, p)) in forks.into_iter().zip(parts).rev() {
                stack.push(Pending {
                    ex: f,
                    group: p,
                    next,
                });
            }
            continue;
        }
        let before = ex.report.steps.len();
        // `ex` reads the recipe of its group's first variant: run that plan's step.
        match ex.step(&plans[group[0]].steps[next]) {
            Ok(()) => {}
            Err(RunError::Assert { span, message }) => ex.failed_assert = Some((span, message)),
            Err(e) => return Err(e),
        }
        steps.extend(ex.report.steps[before..].iter().cloned());
        if ex.interrupted.load(Ordering::SeqCst) {
            return Err(RunError::Interrupted);
        }
        stack.push(Pending {
            ex,
            group,
            next: next + 1,
        });
    }
    let outcome = SweepOutcome {
        variants: done
            .into_iter()
            .map(|o| o.ok_or_else(|| RunError::Internal("a variant did not finish".into())))
            .collect::<Result<_, _>>()?,
        steps,
    };
    write_extra(&root, &outcome).map_err(|e| RunError::User {
        span: None,
        message: format!("cannot write the sweep's comparison: {e}"),
        help: None,
    })?;
    if interrupted() {
        return Err(RunError::Interrupted);
    }
    super::publish(&root, &opts.out_dir).map_err(|e| RunError::User {
        span: None,
        message: format!("cannot move outputs into {}: {e}", opts.out_dir.display()),
        help: None,
    })?;
    drop(staging);
    Ok(outcome)
}

fn interrupted() -> bool {
    super::interrupt_flag().load(Ordering::SeqCst)
}

/// `--sweep NAME=V1,V2,...`: a param and the values it takes, as written.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepArg {
    pub name: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for SweepArg {
    type Err = String;

    /// Values are split at commas outside quotes and brackets, so a string
    /// or a list value may hold one.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not of the form name=value1,value2,..."))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("`{s}` names no param"));
        }
        let mut values = Vec::new();
        let (mut depth, mut quoted, mut cur) = (0i32, false, String::new());
        for c in rest.chars() {
            match c {
                '"' => quoted = !quoted,
                '(' | '[' if !quoted => depth += 1,
                ')' | ']' if !quoted => depth -= 1,
                ',' if !quoted && depth == 0 => {
                    values.push(std::mem::take(&mut cur).trim().to_string());
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        values.push(cur.trim().to_string());
        if values.iter().any(|v| v.is_empty()) {
            return Err(format!("`{s}` has an empty value"));
        }
        for (i, v) in values.iter().enumerate() {
            if values[..i].contains(v) {
                return Err(format!("`{s}` lists the value {v} twice"));
            }
        }
        Ok(SweepArg {
            name: name.to_string(),
            values,
        })
    }
}

/// The variants of a sweep: folder name, then each swept param with its value.
pub type Grid = Vec<(String, Vec<(String, String)>)>;

/// A value as a folder name: letters, digits, `.` and `-` kept, `%` as
/// `pct`, anything else as `_`.
fn folder_part(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => out.push(c),
            '%' => out.push_str("pct"),
            '"' => {}
            _ => out.push('_'),
        }
    }
    out
}

/// Every combination of the swept values (the first `--sweep` varies
/// slowest), each with its folder name (`target-50pct`, or
/// `target-50pct_epochs-3` for a grid; made unique if two collide).
pub fn sweep_grid(args: &[SweepArg]) -> Result<Grid, String> {
    for (i, a) in args.iter().enumerate() {
        if args[..i].iter().any(|b| b.name == a.name) {
            return Err(format!("`--sweep {}` is given twice", a.name));
        }
    }
    let mut grid: Vec<Vec<(String, String)>> = vec![vec![]];
    for a in args {
        grid = grid
            .into_iter()
            .flat_map(|prefix| {
                a.values.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push((a.name.clone(), v.clone()));
                    p
                })
            })
            .collect();
    }
    let mut out: Grid = Vec::new();
    for values in grid {
        let base = values
            .iter()
            .map(|(k, v)| format!("{}-{}", folder_part(k), folder_part(v)))
            .collect::<Vec<_>>()
            .join("_");
        let mut name = base.clone();
        let mut n = 2;
        while out.iter().any(|(o, _)| o.eq_ignore_ascii_case(&name)) {
            name = format!("{base}-{n}");
            n += 1;
        }
        out.push((name, values));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_args_split_at_top_level_commas() {
        let a: SweepArg = "target=50%, 70%,90%".parse().unwrap();
        assert_eq!(a.name, "target");
        assert_eq!(a.values, ["50%", "70%", "90%"]);
        let b: SweepArg = r#"name="a,b",c"#.parse().unwrap();
        assert_eq!(b.values, [r#""a,b""#, "c"]);
        let c: SweepArg = "skip=[\"x\", \"y\"],[]".parse().unwrap();
        assert_eq!(c.values, ["[\"x\", \"y\"]", "[]"]);
        assert!("target".parse::<SweepArg>().is_err());
        assert!("target=1,,2".parse::<SweepArg>().is_err());
        assert!("target=1,1".parse::<SweepArg>().is_err());
    }

    #[test]
    fn a_grid_varies_the_first_sweep_slowest_with_distinct_folders() {
        let g = sweep_grid(&[
            "target=50%,90%".parse().unwrap(),
            "epochs=1,2".parse().unwrap(),
        ])
        .unwrap();
        let names: Vec<&str> = g.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "target-50pct_epochs-1",
                "target-50pct_epochs-2",
                "target-90pct_epochs-1",
                "target-90pct_epochs-2"
            ]
        );
        assert_eq!(g[1].1[1], ("epochs".to_string(), "2".to_string()));
        let same = sweep_grid(&["tag=\"a b\",\"a_b\"".parse().unwrap()]).unwrap();
        assert_eq!(same[0].0, "tag-a_b");
        assert_eq!(same[1].0, "tag-a_b-2");
        assert!(sweep_grid(&["t=1".parse().unwrap(), "t=2".parse().unwrap()]).is_err());
    }
}
