//! Sparsity patterns and score-based mask selection (per layer, per output row, N:M), with magnitude and Wanda scores.

use super::error::{Result, RuntimeError};
use rayon::prelude::*;
use std::cmp::Ordering;

/// How many weights a pruned layer keeps, and where.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SparsityPattern {
    /// Remove this fraction (0..1) of the weights in each comparison group.
    Unstructured(f64),
    /// Keep `n` of every `m` consecutive weights along the input dimension (2:4, 4:8).
    NofM { n: usize, m: usize },
}

impl SparsityPattern {
    /// Parses `50%`, `0.5` or `2:4`.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        let bad = || {
            RuntimeError::Invalid(format!(
                "`{text}` is not a sparsity pattern (expected e.g. `50%`, `0.5`, `2:4`)"
            ))
        };
        let pattern = if let Some((n, m)) = t.split_once(':') {
            let n = n.trim().parse().map_err(|_| bad())?;
            let m = m.trim().parse().map_err(|_| bad())?;
            SparsityPattern::NofM { n, m }
        } else if let Some(p) = t.strip_suffix('%') {
            SparsityPattern::Unstructured(p.trim().parse::<f64>().map_err(|_| bad())? / 100.0)
        } else {
            SparsityPattern::Unstructured(t.parse().map_err(|_| bad())?)
        };
        pattern.validate(None)?;
        Ok(pattern)
    }

    /// Checks the pattern, and that N:M groups tile a row of `cols` weights.
    pub fn validate(&self, cols: Option<(&str, usize)>) -> Result<()> {
        match *self {
            SparsityPattern::Unstructured(s) if !(0.0..1.0).contains(&s) => Err(
                RuntimeError::Invalid(format!("sparsity {s} must be in [0, 1)")),
            ),
            SparsityPattern::NofM { n, m } if m == 0 || n > m => Err(RuntimeError::Invalid(
                format!("N:M pattern {n}:{m} needs 0 <= N <= M and M > 0"),
            )),
            SparsityPattern::NofM { m, .. } => match cols {
                Some((name, c)) if c % m != 0 => Err(RuntimeError::Invalid(format!(
                    "layer `{name}`: {c} input columns are not a multiple of the N:M group size {m}"
                ))),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// The fraction of weights the pattern removes.
    pub fn sparsity(&self) -> f64 {
        match *self {
            SparsityPattern::Unstructured(s) => s,
            SparsityPattern::NofM { n, m } => 1.0 - n as f64 / m as f64,
        }
    }
}

impl std::fmt::Display for SparsityPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SparsityPattern::Unstructured(s) => write!(f, "{}% unstructured", s * 100.0),
            SparsityPattern::NofM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// Which weights compete with each other in an unstructured selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One threshold per layer (magnitude pruning).
    Layer,
    /// One threshold per output row (Wanda).
    Row,
}

/// Total order on scores: lower score first, then lower index (ties are deterministic; NaN sorts last).
fn by_score(scores: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + '_ {
    move |&a, &b| {
        scores[a as usize]
            .total_cmp(&scores[b as usize])
            .then(a.cmp(&b))
    }
}

/// Marks the `count` lowest-scoring entries of `idx` (indices into `scores`) as pruned in `pruned`.
fn prune_lowest(scores: &[f32], idx: &mut [u32], count: usize, pruned: &mut [bool]) {
    if count == 0 {
        return;
    }
    let count = count.min(idx.len());
    if count < idx.len() {
        idx.select_nth_unstable_by(count - 1, by_score(scores));
    }
    for &i in &idx[..count] {
        pruned[i as usize] = true;
    }
}

/// Chooses which weights of a (rows, cols) layer to remove: `true` = pruned.
///
/// Unstructured patterns remove `floor(sparsity * group size)` lowest scores per group
/// (`scope` decides the group); N:M removes the `m - n` lowest of every `m` consecutive
/// weights of a row. Ties go to the lower index.
pub fn choose_pruned(
    scores: &[f32],
    rows: usize,
    cols: usize,
    pattern: SparsityPattern,
    scope: Scope,
) -> Result<Vec<bool>> {
    if scores.len() != rows * cols {
        return Err(RuntimeError::Invalid(format!(
            "{} scores for a {rows}x{cols} layer",
            scores.len()
        )));
    }
    pattern.validate(Some(("(scores)", cols)))?;
    let mut pruned = vec![false; rows * cols];
    match pattern {
        SparsityPattern::Unstructured(s) => match scope {
            Scope::Layer => {
                let mut idx: Vec<u32> = (0..(rows * cols) as u32).collect();
                let count = (s * (rows * cols) as f64).floor() as usize;
                prune_lowest(scores, &mut idx, count, &mut pruned);
            }
            Scope::Row => {
                // Rows are independent: one task per row, the same choice.
                let count = (s * cols as f64).floor() as usize;
                pruned
                    .par_chunks_mut(cols.max(1))
                    .zip(scores.par_chunks(cols.max(1)))
                    .for_each(|(p, row)| {
                        let mut idx: Vec<u32> = (0..cols as u32).collect();
                        prune_lowest(row, &mut idx, count, p);
                    });
            }
        },
        SparsityPattern::NofM { n, m } => {
            pruned
                .par_chunks_mut(cols.max(1))
                .zip(scores.par_chunks(cols.max(1)))
                .for_each(|(p, row)| {
                    let mut idx: Vec<u32> = Vec::with_capacity(m);
                    for g in 0..cols / m {
                        idx.clear();
                        idx.extend((g * m) as u32..((g + 1) * m) as u32);
                        prune_lowest(row, &mut idx, m - n, p);
                    }
                });
        }
    }
    Ok(pruned)
}

/// Sets the pruned weights to zero; returns how many were pruned.
pub fn apply_pruned(weight: &mut [f32], pruned: &[bool]) -> usize {
    let mut count = 0;
    for (w, &p) in weight.iter_mut().zip(pruned) {
        if p {
            *w = 0.0;
            count += 1;
        }
    }
    count
}

/// Magnitude score `|w|`.
pub fn magnitude_scores(weight: &[f32]) -> Vec<f32> {
    weight.iter().map(|w| w.abs()).collect()
}

/// Wanda score `|w_ij| * ||X_j||_2` for a (rows, cols) weight and per-input-column norms.
pub fn wanda_scores(weight: &[f32], cols: usize, col_norms: &[f32]) -> Result<Vec<f32>> {
    if col_norms.len() != cols || !weight.len().is_multiple_of(cols.max(1)) {
        return Err(RuntimeError::Invalid(format!(
            "wanda: {} column norms for a weight of {} values with {cols} columns",
            col_norms.len(),
            weight.len()
        )));
    }
    Ok(weight
        .chunks_exact(cols)
        .flat_map(|row| row.iter().zip(col_norms).map(|(w, n)| w.abs() * n))
        .collect())
}

/// Matches a name against a glob where `*` is any run of characters and `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_scope_prunes_per_row() {
        let scores = [1.0, 2.0, 3.0, 4.0, 40.0, 30.0, 20.0, 10.0];
        let p = choose_pruned(
            &scores,
            2,
            4,
            SparsityPattern::Unstructured(0.5),
            Scope::Row,
        )
        .unwrap();
        assert_eq!(p, [true, true, false, false, false, false, true, true]);
    }

    #[test]
    fn layer_scope_prunes_globally() {
        let scores = [1.0, 2.0, 3.0, 4.0, 40.0, 30.0, 20.0, 10.0];
        let p = choose_pruned(
            &scores,
            2,
            4,
            SparsityPattern::Unstructured(0.5),
            Scope::Layer,
        )
        .unwrap();
        assert_eq!(p, [true, true, true, true, false, false, false, false]);
    }

    #[test]
    fn n_of_m_keeps_n_per_group_and_breaks_ties_by_index() {
        let scores = [5.0, 1.0, 1.0, 7.0, 0.0, 0.0, 0.0, 0.0];
        let p = choose_pruned(
            &scores,
            1,
            8,
            SparsityPattern::NofM { n: 2, m: 4 },
            Scope::Row,
        )
        .unwrap();
        assert_eq!(p, [false, true, true, false, true, true, false, false]);
    }

    #[test]
    fn n_of_m_rejects_widths_that_do_not_tile() {
        let err = choose_pruned(
            &[0.0; 6],
            1,
            6,
            SparsityPattern::NofM { n: 2, m: 4 },
            Scope::Row,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
    }

    #[test]
    fn patterns_parse() {
        assert_eq!(
            SparsityPattern::parse("50%").unwrap(),
            SparsityPattern::Unstructured(0.5)
        );
        assert_eq!(
            SparsityPattern::parse("4:8").unwrap(),
            SparsityPattern::NofM { n: 4, m: 8 }
        );
        assert!(SparsityPattern::parse("5:4").is_err());
        assert!(SparsityPattern::parse("1.5").is_err());
        assert!(SparsityPattern::parse("half").is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match(
            "model.layers.*.mlp.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(!glob_match(
            "model.layers.*.mlp.*",
            "model.layers.3.self_attn.q_proj.weight"
        ));
        assert!(glob_match("*", "lm_head.weight"));
        assert!(glob_match("model.layers.?.*", "model.layers.7.x"));
        assert!(!glob_match("model.layers.?.*", "model.layers.17.x"));
    }
}
