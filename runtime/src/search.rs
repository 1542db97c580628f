//! Seeded multi-objective search: NSGA-II (Deb et al. 2002) over real-valued vectors.
//!
//! The search is generic over the evaluation function and minimises every objective.
//! It is fully deterministic for a given seed: the random stream is a seeded ChaCha8,
//! evaluations happen in population order, and the evaluation cache is a `BTreeMap`
//! keyed by the genes snapped to an integer grid, so nothing depends on hash order.
//! Genes live on a grid (e.g. multiples of 0.001) so that nearby vectors collapse to
//! one cached evaluation.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Probability that a pair of parents is recombined by SBX.
const CROSSOVER_PROB: f64 = 0.9;
/// SBX distribution index (larger keeps children closer to the parents).
const ETA_CROSSOVER: f64 = 15.0;
/// Polynomial-mutation distribution index.
const ETA_MUTATION: f64 = 20.0;
/// Below this gap two parent genes are treated as equal by SBX.
const SBX_EPS: f64 = 1e-14;
/// Slack (in grid steps) when finding the grid points inside `[lo, hi]`.
const GRID_SLACK: f64 = 1e-9;

/// Configuration of one NSGA-II search over vectors of `genes` reals in `[lo, hi]`.
///
/// All objectives are minimised. The same configuration (seed included) and the
/// same evaluation function always give the same [`Outcome`].
#[derive(Clone, Debug)]
pub struct Nsga2 {
    /// Length of each vector (>= 1).
    pub genes: usize,
    /// Population size (>= 2).
    pub population: usize,
    /// Offspring rounds after the initial population (0: only the initial population).
    pub generations: usize,
    /// Lower bound of every gene (`lo <= hi`, finite).
    pub lo: f64,
    /// Upper bound of every gene.
    pub hi: f64,
    /// Genes are snapped to multiples of `grid` (> 0) inside `[lo, hi]` after every
    /// variation, so that near-identical vectors share one evaluation.
    pub grid: f64,
    /// Seed of the random stream (ChaCha8).
    pub seed: u64,
}

/// One evaluated vector: its genes and the objectives the evaluation returned.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The vector, every gene on the grid and inside `[lo, hi]`.
    pub genes: Vec<f64>,
    /// The objectives (all minimised), as returned by the evaluation function.
    pub objectives: Vec<f64>,
}

/// Result of [`Nsga2::run`].
#[derive(Clone, Debug)]
pub struct Outcome {
    /// First non-dominated front of every point ever evaluated (not only the final
    /// population), without duplicate vectors, sorted by `objectives[0]` ascending,
    /// then `objectives[1]`, etc. (`f64::total_cmp`; ties keep evaluation order).
    pub front: Vec<Point>,
    /// Number of distinct vectors evaluated (cache hits not counted).
    pub evaluated: usize,
    /// Every distinct evaluated point, in evaluation order.
    pub all: Vec<Point>,
}

impl Nsga2 {
    /// Runs the search; `evaluate` returns the objectives of one vector (the same
    /// count on every call, at least one). Each distinct vector is evaluated once,
    /// in population order; the first error from `evaluate` is returned at once.
    ///
    /// Panics on an invalid configuration (`genes == 0`, `population < 2`,
    /// non-finite or reversed bounds, `grid <= 0`) or when `evaluate` returns no
    /// objectives or a varying number of them.
    pub fn run<E>(
        &self,
        mut evaluate: impl FnMut(&[f64]) -> Result<Vec<f64>, E>,
    ) -> Result<Outcome, E> {
        self.validate();
        let snap = Snap::new(self);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut archive = Archive::default();

        // Initial population: evenly spaced uniform vectors, then random ones.
        let uniform = self.population.div_ceil(2);
        let mut population: Vec<usize> = Vec::with_capacity(self.population);
        for i in 0..self.population {
            let raw: Vec<f64> = if i < uniform {
                let level = if uniform == 1 {
                    0.5 * (self.lo + self.hi)
                } else {
                    self.lo + (self.hi - self.lo) * i as f64 / (uniform - 1) as f64
                };
                vec![level; self.genes]
            } else {
                (0..self.genes)
                    .map(|_| self.lo + (self.hi - self.lo) * rng.random::<f64>())
                    .collect()
            };
            let idx = archive.evaluate(&snap, &raw, &mut evaluate)?;
            if !population.contains(&idx) {
                population.push(idx);
            }
        }

        for _ in 0..self.generations {
            let objs: Vec<Vec<f64>> = population
                .iter()
                .map(|&i| archive.points[i].objectives.clone())
                .collect();
            let ranks = nondominated_ranks(&objs);
            let crowd = crowding_by_rank(&objs, &ranks);

            // Variation: tournament selection, SBX, polynomial mutation.
            let mut children: Vec<Vec<f64>> = Vec::with_capacity(self.population + 1);
            while children.len() < self.population {
                let a = tournament(&mut rng, &ranks, &crowd);
                let b = tournament(&mut rng, &ranks, &crowd);
                let (mut c1, mut c2) = self.crossover(
                    &mut rng,
                    &archive.points[population[a]].genes,
                    &archive.points[population[b]].genes,
                );
                self.mutate(&mut rng, &mut c1);
                self.mutate(&mut rng, &mut c2);
                children.push(c1);
                children.push(c2);
            }
            children.truncate(self.population);

            // Evaluate the offspring in order, then merge without duplicates.
            let mut merged = population.clone();
            for child in &children {
                let idx = archive.evaluate(&snap, child, &mut evaluate)?;
                if !merged.contains(&idx) {
                    merged.push(idx);
                }
            }
            population = environmental_selection(&archive.points, &merged, self.population);
        }

        let front = final_front(&archive.points);
        Ok(Outcome {
            front,
            evaluated: archive.points.len(),
            all: archive.points,
        })
    }

    fn validate(&self) {
        assert!(self.genes >= 1, "Nsga2: genes must be >= 1");
        assert!(self.population >= 2, "Nsga2: population must be >= 2");
        assert!(
            self.lo.is_finite() && self.hi.is_finite() && self.lo <= self.hi,
            "Nsga2: bounds must be finite with lo <= hi (got {} and {})",
            self.lo,
            self.hi
        );
        assert!(
            self.grid.is_finite() && self.grid > 0.0,
            "Nsga2: grid must be finite and > 0 (got {})",
            self.grid
        );
    }

    /// Bounded simulated binary crossover (Deb & Agrawal), applied with
    /// probability [`CROSSOVER_PROB`], each gene recombined with probability 0.5.
    fn crossover(&self, rng: &mut ChaCha8Rng, p1: &[f64], p2: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut c1 = p1.to_vec();
        let mut c2 = p2.to_vec();
        if self.lo >= self.hi || rng.random::<f64>() > CROSSOVER_PROB {
            return (c1, c2);
        }
        let (yl, yu) = (self.lo, self.hi);
        let exponent = 1.0 / (ETA_CROSSOVER + 1.0);
        let beta_q = |u: f64, beta: f64| {
            let alpha = 2.0 - beta.powf(-(ETA_CROSSOVER + 1.0));
            if u <= 1.0 / alpha {
                (u * alpha).powf(exponent)
            } else {
                (1.0 / (2.0 - u * alpha)).powf(exponent)
            }
        };
        for j in 0..p1.len() {
            if rng.random::<f64>() > 0.5 {
                continue;
            }
            let (x1, x2) = (p1[j], p2[j]);
            if (x1 - x2).abs() <= SBX_EPS {
                continue;
            }
            let (y1, y2) = if x1 < x2 { (x1, x2) } else { (x2, x1) };
            let u = rng.random::<f64>();
            let bq1 = beta_q(u, 1.0 + 2.0 * (y1 - yl) / (y2 - y1));
            let lower = (0.5 * ((y1 + y2) - bq1 * (y2 - y1))).clamp(yl, yu);
            let bq2 = beta_q(u, 1.0 + 2.0 * (yu - y2) / (y2 - y1));
            let upper = (0.5 * ((y1 + y2) + bq2 * (y2 - y1))).clamp(yl, yu);
            if rng.random::<f64>() <= 0.5 {
                c1[j] = upper;
                c2[j] = lower;
            } else {
                c1[j] = lower;
                c2[j] = upper;
            }
        }
        (c1, c2)
    }

    /// Bounded polynomial mutation (Deb & Goyal), each gene with probability 1/genes.
    fn mutate(&self, rng: &mut ChaCha8Rng, genes: &mut [f64]) {
        if self.lo >= self.hi {
            return;
        }
        let (yl, yu) = (self.lo, self.hi);
        let range = yu - yl;
        let prob = 1.0 / genes.len() as f64;
        let exponent = 1.0 / (ETA_MUTATION + 1.0);
        for y in genes.iter_mut() {
            if rng.random::<f64>() > prob {
                continue;
            }
            let delta1 = (*y - yl) / range;
            let delta2 = (yu - *y) / range;
            let u = rng.random::<f64>();
            let delta_q = if u <= 0.5 {
                let xy = 1.0 - delta1;
                let val = 2.0 * u + (1.0 - 2.0 * u) * xy.powf(ETA_MUTATION + 1.0);
                val.powf(exponent) - 1.0
            } else {
                let xy = 1.0 - delta2;
                let val = 2.0 * (1.0 - u) + 2.0 * (u - 0.5) * xy.powf(ETA_MUTATION + 1.0);
                1.0 - val.powf(exponent)
            };
            *y = (*y + delta_q * range).clamp(yl, yu);
        }
    }
}

/// Index into `front` of its knee, the point that best trades one objective for the
/// others, so a caller can pick one configuration from the front.
///
/// Objectives are normalised to `[0, 1]` by the front's per-objective min/max. With
/// two objectives: the point farthest from the straight line through the two extreme
/// points on the ideal point's side (ties: lowest index). With one point: 0. Otherwise
/// (one or more than two objectives, coinciding extremes, or no point on that side of
/// the line): the smallest sum of normalised objectives
/// (ties: lowest index). Non-finite objectives count as the worst (NaN, +inf) or best
/// (-inf) normalised value. Never panics; an empty front gives `None`.
pub fn knee(front: &[Point]) -> Option<usize> {
    if front.is_empty() {
        return None;
    }
    if front.len() == 1 {
        return Some(0);
    }
    let m = front.iter().map(|p| p.objectives.len()).min().unwrap_or(0);
    if m == 0 {
        return Some(0);
    }
    let norm = normalise(front, m);
    if m == 2 {
        let lexi = |i: usize, j: usize, a: usize, b: usize| {
            norm[i][a]
                .total_cmp(&norm[j][a])
                .then(norm[i][b].total_cmp(&norm[j][b]))
                .then(i.cmp(&j))
        };
        let first = (0..norm.len()).min_by(|&i, &j| lexi(i, j, 0, 1));
        let second = (0..norm.len()).min_by(|&i, &j| lexi(i, j, 1, 0));
        if let (Some(a), Some(b)) = (first, second) {
            let (ax, ay) = (norm[a][0], norm[a][1]);
            let (dx, dy) = (norm[b][0] - ax, norm[b][1] - ay);
            let length = dx.hypot(dy);
            // Only points on the ideal point's side of the line count: one
            // in a dent of the front (beyond the line) trades badly.
            let ideal = dx * (0.0 - ay) - dy * (0.0 - ax);
            if length > 0.0 && length.is_finite() && ideal != 0.0 {
                let mut best = 0;
                let mut best_distance = f64::NEG_INFINITY;
                for (i, p) in norm.iter().enumerate() {
                    let distance = (dx * (p[1] - ay) - dy * (p[0] - ax)) * ideal.signum() / length;
                    if distance > best_distance {
                        best = i;
                        best_distance = distance;
                    }
                }
                if best_distance > 0.0 {
                    return Some(best);
                }
            }
        }
    }
    let mut best = 0;
    let mut best_sum = f64::INFINITY;
    for (i, p) in norm.iter().enumerate() {
        let sum: f64 = p.iter().sum();
        if sum < best_sum {
            best = i;
            best_sum = sum;
        }
    }
    Some(best)
}

/// Fast non-dominated sorting (Deb et al.): the rank of each objective vector,
/// 0 for the first (non-dominated) front, 1 for the front dominated only by
/// front 0, and so on. All objectives are minimised; NaN counts as +infinity.
pub fn nondominated_ranks(objs: &[Vec<f64>]) -> Vec<usize> {
    let n = objs.len();
    let mut dominated_by_count = vec![0usize; n];
    let mut dominates_list: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        for j in (i + 1)..n {
            if dominates(&objs[i], &objs[j]) {
                dominates_list[i].push(j);
                dominated_by_count[j] += 1;
            } else if dominates(&objs[j], &objs[i]) {
                dominates_list[j].push(i);
                dominated_by_count[i] += 1;
            }
        }
    }
    let mut ranks = vec![0usize; n];
    let mut current: Vec<usize> = (0..n).filter(|&i| dominated_by_count[i] == 0).collect();
    let mut rank = 0;
    while !current.is_empty() {
        let mut next = Vec::new();
        for &i in &current {
            ranks[i] = rank;
            for &j in &dominates_list[i] {
                dominated_by_count[j] -= 1;
                if dominated_by_count[j] == 0 {
                    next.push(j);
                }
            }
        }
        next.sort_unstable();
        current = next;
        rank += 1;
    }
    ranks
}

/// Crowding distance of each member of one front: the sum over objectives of the
/// normalised gap between its two neighbours, with the extremes of every objective
/// at `f64::INFINITY`. Larger means a lonelier point, preferred to keep diversity.
/// Objectives whose range over the front is zero or non-finite add nothing.
pub fn crowding(objs: &[Vec<f64>]) -> Vec<f64> {
    let n = objs.len();
    let mut distance = vec![0.0f64; n];
    if n == 0 {
        return distance;
    }
    if n <= 2 {
        return vec![f64::INFINITY; n];
    }
    let m = objs.iter().map(Vec::len).min().unwrap_or(0);
    for k in 0..m {
        let column: Vec<f64> = objs.iter().map(|o| sanitize(o[k])).collect();
        let value = |i: usize| column[i];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| value(a).total_cmp(&value(b)).then(a.cmp(&b)));
        distance[order[0]] = f64::INFINITY;
        distance[order[n - 1]] = f64::INFINITY;
        let range = value(order[n - 1]) - value(order[0]);
        if !(range.is_finite() && range > 0.0) {
            continue;
        }
        for w in order.windows(3) {
            distance[w[1]] += (value(w[2]) - value(w[0])) / range;
        }
    }
    distance
}

/// NaN objectives are treated as +infinity (the worst value) in comparisons.
fn sanitize(v: f64) -> f64 {
    if v.is_nan() {
        f64::INFINITY
    } else {
        v
    }
}

/// Whether `a` Pareto-dominates `b` (no worse everywhere, strictly better somewhere).
fn dominates(a: &[f64], b: &[f64]) -> bool {
    let mut strictly = false;
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (sanitize(x), sanitize(y));
        if x > y {
            return false;
        }
        if x < y {
            strictly = true;
        }
    }
    strictly
}

/// Crowding distance of each member of a population, computed within its own front.
fn crowding_by_rank(objs: &[Vec<f64>], ranks: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0; objs.len()];
    let fronts = ranks.iter().copied().max().map_or(0, |r| r + 1);
    for rank in 0..fronts {
        let members: Vec<usize> = (0..objs.len()).filter(|&i| ranks[i] == rank).collect();
        let front: Vec<Vec<f64>> = members.iter().map(|&i| objs[i].clone()).collect();
        for (&i, d) in members.iter().zip(crowding(&front)) {
            out[i] = d;
        }
    }
    out
}

/// Crowded-comparison order: lower rank first, then larger crowding, then lower index.
fn crowded_cmp(ranks: &[usize], crowd: &[f64], a: usize, b: usize) -> Ordering {
    ranks[a]
        .cmp(&ranks[b])
        .then(crowd[b].total_cmp(&crowd[a]))
        .then(a.cmp(&b))
}

/// Binary tournament on the crowded-comparison order; returns a population index.
fn tournament(rng: &mut ChaCha8Rng, ranks: &[usize], crowd: &[f64]) -> usize {
    let n = ranks.len();
    let a = rng.random_range(0..n);
    let b = rng.random_range(0..n);
    if crowded_cmp(ranks, crowd, a, b) == Ordering::Greater {
        b
    } else {
        a
    }
}

/// NSGA-II environmental selection: keep whole fronts in rank order, then the
/// least crowded members of the first front that does not fit.
fn environmental_selection(points: &[Point], merged: &[usize], size: usize) -> Vec<usize> {
    if merged.len() <= size {
        return merged.to_vec();
    }
    let objs: Vec<Vec<f64>> = merged
        .iter()
        .map(|&i| points[i].objectives.clone())
        .collect();
    let ranks = nondominated_ranks(&objs);
    let mut selected = Vec::with_capacity(size);
    let mut rank = 0;
    while selected.len() < size {
        let members: Vec<usize> = (0..merged.len()).filter(|&i| ranks[i] == rank).collect();
        if selected.len() + members.len() <= size {
            selected.extend(members.iter().map(|&i| merged[i]));
        } else {
            let front: Vec<Vec<f64>> = members.iter().map(|&i| objs[i].clone()).collect();
            let distance = crowding(&front);
            let mut order: Vec<usize> = (0..members.len()).collect();
            order.sort_by(|&a, &b| distance[b].total_cmp(&distance[a]).then(a.cmp(&b)));
            let room = size - selected.len();
            selected.extend(order[..room].iter().map(|&k| merged[members[k]]));
        }
        rank += 1;
    }
    selected
}

/// First non-dominated front of every evaluated point, sorted by objectives.
fn final_front(points: &[Point]) -> Vec<Point> {
    let mut front: Vec<Point> = points
        .iter()
        .filter(|p| {
            !points
                .iter()
                .any(|q| dominates(&q.objectives, &p.objectives))
        })
        .cloned()
        .collect();
    front.sort_by(|a, b| {
        a.objectives
            .iter()
            .zip(&b.objectives)
            .map(|(x, y)| x.total_cmp(y))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    });
    front
}

/// Per-objective min/max normalisation of a front for [`knee`].
fn normalise(front: &[Point], m: usize) -> Vec<Vec<f64>> {
    let mut min = vec![f64::INFINITY; m];
    let mut max = vec![f64::NEG_INFINITY; m];
    for p in front {
        for k in 0..m {
            let v = p.objectives[k];
            if v.is_finite() {
                min[k] = min[k].min(v);
                max[k] = max[k].max(v);
            }
        }
    }
    front
        .iter()
        .map(|p| {
            (0..m)
                .map(|k| {
                    let v = p.objectives[k];
                    let range = max[k] - min[k];
                    if v.is_nan() || v == f64::INFINITY {
                        1.0
                    } else if v == f64::NEG_INFINITY {
                        0.0
                    } else if range.is_finite() && range > 0.0 {
                        (v - min[k]) / range
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// Snapping of genes to the grid inside `[lo, hi]`, with an integer key per gene.
struct Snap {
    lo: f64,
    hi: f64,
    grid: f64,
    /// The grid steps inside `[lo, hi]`, when there is at least one.
    steps: Option<(i64, i64)>,
}

impl Snap {
    fn new(config: &Nsga2) -> Self {
        let kmin = (config.lo / config.grid - GRID_SLACK).ceil() as i64;
        let kmax = (config.hi / config.grid + GRID_SLACK).floor() as i64;
        Snap {
            lo: config.lo,
            hi: config.hi,
            grid: config.grid,
            steps: (kmin <= kmax).then_some((kmin, kmax)),
        }
    }

    /// The integer key and the snapped value of one gene. Distinct keys give
    /// distinct values, so the key vector identifies a snapped vector.
    fn gene(&self, g: f64) -> (i64, f64) {
        if self.lo == self.hi {
            return (0, self.lo);
        }
        let g = if g.is_nan() {
            self.lo
        } else {
            g.clamp(self.lo, self.hi)
        };
        let mut k = (g / self.grid).round() as i64;
        if let Some((kmin, kmax)) = self.steps {
            k = k.clamp(kmin, kmax);
        }
        (k, (k as f64 * self.grid).clamp(self.lo, self.hi))
    }
}

/// Every distinct evaluated point, with a cache keyed by the snapped genes.
#[derive(Default)]
struct Archive {
    points: Vec<Point>,
    cache: BTreeMap<Vec<i64>, usize>,
}

impl Archive {
    /// Snaps `raw` to the grid and returns the index of its point, evaluating it
    /// only if that vector was never seen.
    fn evaluate<E>(
        &mut self,
        snap: &Snap,
        raw: &[f64],
        evaluate: &mut impl FnMut(&[f64]) -> Result<Vec<f64>, E>,
    ) -> Result<usize, E> {
        let (key, genes): (Vec<i64>, Vec<f64>) = raw.iter().map(|&g| snap.gene(g)).unzip();
        if let Some(&idx) = self.cache.get(&key) {
            return Ok(idx);
        }
        let objectives = evaluate(&genes)?;
        assert!(
            !objectives.is_empty(),
            "Nsga2: the evaluation returned no objectives"
        );
        if let Some(first) = self.points.first() {
            assert_eq!(
                first.objectives.len(),
                objectives.len(),
                "Nsga2: the evaluation returned a varying number of objectives"
            );
        }
        let idx = self.points.len();
        self.points.push(Point { genes, objectives });
        self.cache.insert(key, idx);
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn point(objectives: &[f64]) -> Point {
        Point {
            genes: vec![0.0],
            objectives: objectives.to_vec(),
        }
    }

    fn bi_objective(x: &[f64]) -> Vec<f64> {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let spread: f64 = x.iter().map(|v| (v - mean).powi(2)).sum();
        vec![mean, 1.0 - mean.sqrt() + spread]
    }

    fn config(seed: u64) -> Nsga2 {
        Nsga2 {
            genes: 5,
            population: 16,
            generations: 15,
            lo: 0.0,
            hi: 1.0,
            grid: 0.001,
            seed,
        }
    }

    fn run_ok(cfg: &Nsga2) -> Outcome {
        cfg.run(|x| Ok::<_, ()>(bi_objective(x))).unwrap()
    }

    fn on_grid(g: f64, grid: f64) -> bool {
        ((g / grid).round() * grid - g).abs() < 1e-12
    }

    #[test]
    fn ranks_of_hand_made_set() {
        let objs = vec![
            vec![1.0, 5.0],
            vec![2.0, 2.0],
            vec![5.0, 1.0],
            vec![3.0, 3.0],
            vec![4.0, 4.0],
            vec![6.0, 6.0],
        ];
        assert_eq!(nondominated_ranks(&objs), vec![0, 0, 0, 1, 2, 3]);
        assert!(nondominated_ranks(&[]).is_empty());
        // Equal vectors do not dominate each other.
        assert_eq!(
            nondominated_ranks(&[vec![1.0, 1.0], vec![1.0, 1.0], vec![1.0, 2.0]]),
            vec![0, 0, 1]
        );
    }

    #[test]
    fn crowding_of_four_point_front() {
        // Given out of order; sorted by f0 the points are a, b, c, d.
        let objs = vec![
            vec![3.0, 1.0], // c
            vec![0.0, 5.0], // a
            vec![4.0, 0.0], // d
            vec![1.0, 2.0], // b
        ];
        let d = crowding(&objs);
        assert_eq!(d[1], f64::INFINITY);
        assert_eq!(d[2], f64::INFINITY);
        // b: (3 - 0) / 4 + (5 - 1) / 5 = 1.55; c: (4 - 1) / 4 + (2 - 0) / 5 = 1.15.
        assert!((d[3] - 1.55).abs() < 1e-12, "{d:?}");
        assert!((d[0] - 1.15).abs() < 1e-12, "{d:?}");
        assert_eq!(crowding(&[vec![1.0, 2.0]]), vec![f64::INFINITY]);
        assert!(crowding(&[]).is_empty());
    }

    #[test]
    fn a_point_in_a_dent_is_not_the_knee() {
        // (0.6, 0.55) lies farther from the line x + y = 1 than (0.2, 0.75),
        // but beyond it: a worse trade than the line's own ends.
        let objs = [[0.0, 1.0], [0.2, 0.75], [0.6, 0.55], [1.0, 0.0]];
        let front: Vec<Point> = objs.iter().map(|o| point(o)).collect();
        assert_eq!(knee(&front), Some(1));
    }

    #[test]
    fn knee_of_convex_front() {
        let objs = [[0.0, 1.0], [0.1, 0.5], [0.2, 0.3], [0.5, 0.15], [1.0, 0.0]];
        let front: Vec<Point> = objs.iter().map(|o| point(o)).collect();
        assert_eq!(knee(&front), Some(2));
        // Scaling one objective does not move the knee (normalisation).
        let scaled: Vec<Point> = objs
            .iter()
            .map(|o| point(&[o[0] * 100.0 + 7.0, o[1]]))
            .collect();
        assert_eq!(knee(&scaled), Some(2));
        assert_eq!(knee(&[]), None);
        assert_eq!(knee(&front[..1]), Some(0));
        // Three objectives: smallest normalised sum.
        let three: Vec<Point> = [[0.0, 1.0, 1.0], [0.4, 0.4, 0.4], [1.0, 0.0, 0.5]]
            .iter()
            .map(|o| point(o))
            .collect();
        assert_eq!(knee(&three), Some(1));
        // Degenerate and non-finite inputs never panic.
        assert_eq!(knee(&[point(&[1.0, 1.0]), point(&[1.0, 1.0])]), Some(0));
        assert!(knee(&[point(&[f64::NAN, 1.0]), point(&[f64::INFINITY, 0.0])]).is_some());
    }

    #[test]
    fn run_finds_sorted_distinct_nondominated_front_deterministically() {
        let cfg = config(7);
        let out = run_ok(&cfg);
        assert_eq!(out.evaluated, out.all.len());
        assert!(out.front.len() >= 5, "front too small: {}", out.front.len());
        for (i, p) in out.front.iter().enumerate() {
            for (j, q) in out.front.iter().enumerate() {
                if i != j {
                    assert!(!dominates(&q.objectives, &p.objectives));
                    assert_ne!(p.genes, q.genes);
                }
            }
        }
        for w in out.front.windows(2) {
            assert!(w[0].objectives[0] <= w[1].objectives[0]);
            if w[0].objectives[0] == w[1].objectives[0] {
                assert!(w[0].objectives[1] <= w[1].objectives[1]);
            }
        }
        // No point of `all` dominates a front member; every front member is in `all`.
        for p in &out.front {
            assert!(out
                .all
                .iter()
                .all(|q| !dominates(&q.objectives, &p.objectives)));
            assert!(out.all.contains(p));
        }
        for p in &out.all {
            assert_eq!(p.genes.len(), cfg.genes);
            for &g in &p.genes {
                assert!((cfg.lo..=cfg.hi).contains(&g));
                assert!(on_grid(g, cfg.grid), "{g} not on the grid");
            }
        }
        // Same seed: bitwise identical; other seed: a different history.
        let again = run_ok(&cfg);
        let bits = |o: &Outcome| -> Vec<(Vec<u64>, Vec<u64>)> {
            o.all
                .iter()
                .chain(&o.front)
                .map(|p| {
                    (
                        p.genes.iter().map(|g| g.to_bits()).collect(),
                        p.objectives.iter().map(|v| v.to_bits()).collect(),
                    )
                })
                .collect()
        };
        assert_eq!(bits(&out), bits(&again));
        assert_eq!(out.evaluated, again.evaluated);
        let other = run_ok(&config(8));
        assert_ne!(out.all, other.all);
    }

    #[test]
    fn cache_evaluates_each_vector_once() {
        let seen = RefCell::new(Vec::<Vec<u64>>::new());
        let cfg = Nsga2 {
            grid: 0.05, // coarse: many offspring collide with known vectors
            ..config(3)
        };
        let out = cfg
            .run(|x| {
                seen.borrow_mut()
                    .push(x.iter().map(|g| g.to_bits()).collect());
                Ok::<_, ()>(bi_objective(x))
            })
            .unwrap();
        let seen = seen.into_inner();
        assert_eq!(seen.len(), out.evaluated);
        assert_eq!(out.all.len(), out.evaluated);
        // Fewer evaluations than requested vectors: the cache was hit.
        assert!(out.evaluated < cfg.population * (cfg.generations + 1));
        let distinct: std::collections::BTreeSet<&Vec<u64>> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "a vector was evaluated twice");
        for (p, s) in out.all.iter().zip(&seen) {
            let bits: Vec<u64> = p.genes.iter().map(|g| g.to_bits()).collect();
            assert_eq!(&bits, s);
        }
    }

    #[test]
    fn errors_propagate_at_once() {
        let mut calls = 0;
        let result = config(1).run(|x| {
            calls += 1;
            if calls == 3 {
                Err("boom")
            } else {
                Ok(bi_objective(x))
            }
        });
        assert_eq!(result.unwrap_err(), "boom");
        assert_eq!(calls, 3);
    }

    #[test]
    fn edge_cases() {
        // Population 2, no generations: one uniform vector at the midpoint, one random.
        let cfg = Nsga2 {
            population: 2,
            generations: 0,
            ..config(5)
        };
        let out = run_ok(&cfg);
        assert_eq!(out.all.len(), 2);
        assert_eq!(out.all[0].genes, vec![0.5; 5]);
        assert!(!out.front.is_empty());
        // Population 2 with generations runs too.
        let out = run_ok(&Nsga2 {
            generations: 5,
            ..cfg.clone()
        });
        assert!(out.evaluated >= 2);

        // lo == hi: a single vector, evaluated once.
        let fixed = Nsga2 {
            genes: 3,
            population: 6,
            generations: 5,
            lo: 0.3,
            hi: 0.3,
            grid: 0.001,
            seed: 9,
        };
        let mut calls = 0;
        let out = fixed
            .run(|x| {
                calls += 1;
                Ok::<_, ()>(vec![x.iter().sum::<f64>(), 1.0])
            })
            .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(out.evaluated, 1);
        assert_eq!(out.front.len(), 1);
        assert_eq!(out.front[0].genes, vec![0.3; 3]);

        // A single objective works; bounds off the grid still give on-grid genes.
        let single = Nsga2 {
            genes: 2,
            population: 5,
            generations: 4,
            lo: 0.0005,
            hi: 0.0105,
            grid: 0.001,
            seed: 2,
        };
        let out = single
            .run(|x| Ok::<_, ()>(vec![(x[0] - 0.004).abs() + x[1]]))
            .unwrap();
        for p in &out.all {
            for &g in &p.genes {
                assert!((single.lo..=single.hi).contains(&g));
                assert!(on_grid(g, single.grid), "{g} not on the grid");
            }
        }
        let best = out
            .all
            .iter()
            .map(|p| p.objectives[0])
            .fold(f64::INFINITY, f64::min);
        assert!(out.front.iter().all(|p| p.objectives[0] == best));
        assert_eq!(knee(&out.front), Some(0));
    }
}
