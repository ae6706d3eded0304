//! From shares of new connections to per-endpoint weights.
//!
//! Under a weighted scheduler a destination receives new connections in
//! proportion to its weight, so a group of `n` ready endpoints, each with weight
//! `w`, receives `n·w / Σ n·w` of them. To give groups the shares asked for
//! whatever their replica counts, each group's endpoints get a weight
//! proportional to `share / n`. Weights are integers ≤ [`MAX_WEIGHT`], so the
//! split is exact only when those ratios are small enough; otherwise [`split`]
//! picks the integers that come closest, and says how close ([`Split::rounding_error`]).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::MAX_WEIGHT;

/// One group's claim: its share (in any unit, relative to the other groups') and
/// how many ready endpoints it has to carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// The share of new connections asked for, relative to the other groups'.
    pub share: u64,
    /// Its ready endpoints.
    pub ready: u32,
}

/// Weights for a list of [`Demand`]s, and how well they meet them.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Per group: the weight each of its ready endpoints gets. 0 for a group that
    /// asks for nothing or has no ready endpoints.
    pub weights: Vec<u32>,
    /// Per group: its share among the groups that have ready endpoints, 0..=1.
    /// (A group with no ready endpoint can carry nothing: the others share its part.)
    pub requested: Vec<f64>,
    /// Per group: the share of new connections `weights` give it, 0..=1.
    pub achieved: Vec<f64>,
    exact: bool,
}

impl Split {
    /// The largest difference between a group's achieved and requested share, 0..=1.
    pub fn rounding_error(&self) -> f64 {
        self.requested
            .iter()
            .zip(&self.achieved)
            .map(|(r, a)| if a > r { a - r } else { r - a })
            .fold(0.0, f64::max)
    }

    /// True when the weights give exactly the requested shares.
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// True when no group gets any weight (no group with a share has ready endpoints).
    pub fn is_empty(&self) -> bool {
        self.weights.iter().all(|w| *w == 0)
    }

    /// For messages: `exact`, or `rounding error 0.0012 pp` (percentage points).
    pub fn rounding_note(&self) -> String {
        let pp = self.rounding_error() * 100.0;
        match (self.exact, pp < 0.0001) {
            (true, _) => "exact".into(),
            (false, true) => "rounding error < 0.0001 pp".into(),
            (false, false) => alloc::format!("rounding error {pp:.4} pp"),
        }
    }
}

/// The largest denominator tried when looking for an exact split; past it the
/// weights would exceed [`MAX_WEIGHT`] anyway.
const EXACT_LIMIT: u128 = 1 << 64;

/// How many candidate scales [`split`] tries in all when no exact split fits,
/// shared out among the groups: it bounds the time an evaluation can take
/// however many groups there are.
const SEARCH: u64 = 2000;

/// Per-endpoint weights that give each group its share of new connections as
/// closely as integers ≤ [`MAX_WEIGHT`] allow.
///
/// When an exact split fits, it is the one with the smallest weights (`90:10`
/// over 3 and 3 endpoints gives `9` and `1`). Otherwise the weights are scaled
/// up to use the whole range, and the scales at which a group's weight is an
/// exact small integer are tried too; the one with the smallest largest error
/// wins. Every group with a share and a ready endpoint gets at least 1.
pub fn split(demands: &[Demand]) -> Split {
    let serving = |d: &Demand| d.ready > 0;
    let total: u128 = demands.iter().filter(|d| serving(d)).map(|d| u128::from(d.share)).sum();
    let requested: Vec<f64> = demands
        .iter()
        .map(|d| match serving(d) && total > 0 {
            true => d.share as f64 / total as f64,
            false => 0.0,
        })
        .collect();
    let (weights, exact) = match exact(demands) {
        Some(weights) => (weights, true),
        None => (closest(demands, &requested), false),
    };
    let achieved = achieved(demands, &weights);
    Split { weights, requested, achieved, exact }
}

/// The shares `weights` (per endpoint of each group) give the groups.
fn achieved(demands: &[Demand], weights: &[u32]) -> Vec<f64> {
    let total: u64 = demands.iter().zip(weights).map(|(d, w)| u64::from(d.ready) * u64::from(*w)).sum();
    demands
        .iter()
        .zip(weights)
        .map(|(d, w)| match total {
            0 => 0.0,
            t => (u64::from(d.ready) * u64::from(*w)) as f64 / t as f64,
        })
        .collect()
}

/// The smallest integer weights exactly proportional to `share / ready`, if they fit.
fn exact(demands: &[Demand]) -> Option<Vec<u32>> {
    let active = |d: &Demand| d.share > 0 && d.ready > 0;
    // Each group's ratio share/ready in lowest terms p/q; over the common
    // denominator L = lcm(q), the weights p·L/q are integers.
    let mut lcm: u128 = 1;
    for d in demands.iter().filter(|d| active(d)) {
        let q = u128::from(d.ready) / gcd(u128::from(d.share), u128::from(d.ready));
        lcm = lcm / gcd(lcm, q) * q;
        if lcm > EXACT_LIMIT {
            return None;
        }
    }
    let raw: Vec<u128> = demands
        .iter()
        .map(|d| match active(d) {
            true => {
                let g = gcd(u128::from(d.share), u128::from(d.ready));
                (u128::from(d.share) / g) * (lcm / (u128::from(d.ready) / g))
            }
            false => 0,
        })
        .collect();
    let common = raw.iter().fold(0, |g, w| gcd(g, *w)).max(1);
    raw.iter()
        .map(|w| u32::try_from(w / common).ok().filter(|w| *w <= MAX_WEIGHT))
        .collect()
}

/// The weights, among a few candidate scales, whose largest share error is smallest.
fn closest(demands: &[Demand], requested: &[f64]) -> Vec<u32> {
    let ratio: Vec<f64> = demands
        .iter()
        .map(|d| match d.share > 0 && d.ready > 0 {
            true => d.share as f64 / f64::from(d.ready),
            false => 0.0,
        })
        .collect();
    let largest = ratio.iter().copied().fold(0.0, f64::max);
    if largest == 0.0 {
        return alloc::vec![0; demands.len()];
    }
    let at = |scale: f64| -> Vec<u32> {
        ratio
            .iter()
            .map(|r| match *r > 0.0 {
                // + 0.5 and truncation: rounding without std's f64::round.
                true => ((scale * r + 0.5) as u64).clamp(1, u64::from(MAX_WEIGHT)) as u32,
                false => 0,
            })
            .collect()
    };
    let error = |weights: &[u32]| -> f64 {
        achieved(demands, weights)
            .iter()
            .zip(requested)
            .map(|(a, r)| if a > r { a - r } else { r - a })
            .fold(0.0, f64::max)
    };
    // The full range first: the largest weight is MAX_WEIGHT.
    let full = f64::from(MAX_WEIGHT) / largest;
    let mut best = at(full);
    let mut best_error = error(&best);
    // Rounding hurts most where a weight is small: try the scales at which a
    // group's weight is exactly 1, 2, 3, …, keeping the rest in range.
    let per_group = SEARCH / (ratio.iter().filter(|r| **r > 0.0).count() as u64).max(1);
    for r in ratio.iter().filter(|r| **r > 0.0) {
        let top = ((full * r) as u64).min(per_group);
        for k in 1..=top {
            let candidate = at(k as f64 / r);
            let e = error(&candidate);
            if e < best_error {
                best = candidate;
                best_error = e;
            }
        }
    }
    best
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A percentage 0..=100 with a precision of 0.0001 %, as written in configs
/// (`10`, `2.5`). Stored as parts per million, so arithmetic on it is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Percent {
    ppm: u32,
}

impl Percent {
    /// 0 %.
    pub const ZERO: Percent = Percent { ppm: 0 };
    /// 100 %.
    pub const HUNDRED: Percent = Percent { ppm: 1_000_000 };

    /// From parts per million (capped at 100 %).
    pub const fn from_ppm(ppm: u32) -> Self {
        Percent { ppm: if ppm > 1_000_000 { 1_000_000 } else { ppm } }
    }

    /// From a number of percent, e.g. `2.5`; `None` outside 0..=100 or not a number.
    pub fn from_percent(p: f64) -> Option<Self> {
        // The negated comparison also refuses NaN.
        if !(0.0..=100.0).contains(&p) {
            return None;
        }
        Some(Percent::from_ppm((p * 10_000.0 + 0.5) as u32))
    }

    /// In parts per million.
    pub const fn ppm(self) -> u32 {
        self.ppm
    }

    /// 100 % minus this.
    pub const fn complement(self) -> Self {
        Percent { ppm: 1_000_000 - self.ppm }
    }
}

impl fmt::Display for Percent {
    /// `10 %`, `2.5 %`, `8.3333 %`: up to four decimals, trailing zeros dropped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.ppm / 10_000, self.ppm % 10_000);
        if frac == 0 {
            return write!(f, "{whole} %");
        }
        let mut digits = alloc::format!("{frac:04}");
        while digits.ends_with('0') {
            digits.pop();
        }
        write!(f, "{whole}.{digits} %")
    }
}

impl schemars::JsonSchema for Percent {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> alloc::borrow::Cow<'static, str> {
        "Percent".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "number", "minimum": 0, "maximum": 100 })
    }
}

impl<'de> serde::Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = <f64 as serde::Deserialize>::deserialize(d)?;
        Percent::from_percent(p)
            .ok_or_else(|| serde::de::Error::custom(alloc::format!("{p} is not a percentage between 0 and 100")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn d(share: u64, ready: u32) -> Demand {
        Demand { share, ready }
    }

    #[test]
    fn ninety_ten_over_equal_groups_is_nine_to_one() {
        let s = split(&[d(90, 3), d(10, 3)]);
        assert_eq!(s.weights, vec![9, 1]);
        assert!(s.is_exact());
        assert_eq!(s.achieved, vec![0.9, 0.1]);
        assert_eq!(s.rounding_note(), "exact");
    }

    #[test]
    fn the_share_does_not_depend_on_replica_counts() {
        // 10 % to 1 canary against 9 stable endpoints: every endpoint weighs the same.
        assert_eq!(split(&[d(90, 9), d(10, 1)]).weights, vec![1, 1]);
        // 10 % to 5 canaries against 20 stable: 4 vs 9 per endpoint (20·9 : 5·4 = 180 : 20).
        let s = split(&[d(90, 20), d(10, 5)]);
        assert_eq!(s.weights, vec![9, 4]);
        assert!(s.is_exact());
    }

    #[test]
    fn groups_without_ready_endpoints_leave_their_share_to_the_others() {
        let s = split(&[d(90, 3), d(10, 0)]);
        assert_eq!(s.weights, vec![1, 0]);
        assert_eq!(s.requested, vec![1.0, 0.0]);
        assert_eq!(s.achieved, vec![1.0, 0.0]);
    }

    #[test]
    fn a_zero_share_gets_weight_zero() {
        let s = split(&[d(100, 3), d(0, 2)]);
        assert_eq!(s.weights, vec![1, 0]);
        assert!(!s.is_empty());
        let s = split(&[d(0, 3), d(10, 0)]);
        assert!(s.is_empty());
        assert_eq!(s.achieved, vec![0.0, 0.0]);
    }

    #[test]
    fn when_no_exact_split_fits_the_error_is_tiny_and_reported() {
        // 1 % of 1,000,000 ppm to 7 canaries, 99 % to 13 stable endpoints.
        let s = split(&[d(990_001, 13), d(9_999, 7)]);
        assert!(!s.is_exact());
        assert!(s.weights.iter().all(|w| *w <= MAX_WEIGHT && *w > 0), "{:?}", s.weights);
        assert!(s.rounding_error() < 1e-7, "{}", s.rounding_error());
        assert!(s.rounding_note().starts_with("rounding error"), "{}", s.rounding_note());
    }

    #[test]
    fn a_small_weight_is_chosen_exactly_rather_than_rounded() {
        // Per-endpoint ratio 5 : 218448 — at full scale the small weight would be
        // 1.500009, rounded to 2 (a third too much); at weight 1 the other is
        // 43689.6 → 43690, almost exact.
        let s = split(&[d(5, 1), d(218_448, 1)]);
        assert_eq!(s.weights, vec![1, 43_690]);
        assert!(s.rounding_error() < 1e-9, "{}", s.rounding_error());
        let full_scale_error = 2.0 / 65_537.0 - 5.0 / 218_453.0;
        assert!(full_scale_error > 7e-6, "the test needs rounding to hurt at full scale");
    }

    #[test]
    fn a_share_too_small_to_express_gets_weight_one_and_the_error_says_so() {
        // 1 % over 1000 canaries against 1 stable endpoint: canary weight 1 each
        // and stable 65535 is the closest there is (1000/66535 ≈ 1.5 %).
        let s = split(&[d(99, 1), d(1, 1000)]);
        assert_eq!(s.weights, vec![MAX_WEIGHT, 1]);
        assert!((s.achieved[1] - 1000.0 / 66_535.0).abs() < 1e-12);
        assert!((s.rounding_error() - (1000.0 / 66_535.0 - 0.01)).abs() < 1e-12);
        assert_eq!(s.rounding_note(), "rounding error 0.5030 pp");
    }

    #[test]
    fn many_groups_are_split_closely_and_quickly() {
        // 60 groups with awkward shares and counts: no exact split fits.
        let demands: Vec<Demand> = (1..=60).map(|i| d(1_000 + i * 7_919 % 1_000, (i % 13 + 1) as u32)).collect();
        let started = std::time::Instant::now();
        let s = split(&demands);
        let took = started.elapsed();
        assert!(!s.is_exact());
        assert!(s.rounding_error() < 1e-4, "{}", s.rounding_error());
        assert!(s.weights.iter().all(|w| *w >= 1 && *w <= MAX_WEIGHT));
        // Far within the host's deadline for a whole evaluation (50 ms), even loaded.
        assert!(took < std::time::Duration::from_millis(50), "took {took:?}");
    }

    #[test]
    fn no_demands_no_weights() {
        let s = split(&[]);
        assert!(s.weights.is_empty());
        assert_eq!(s.rounding_error(), 0.0);
    }

    #[test]
    fn percentages_parse_and_print() {
        let p: Percent = serde_json::from_str("2.5").unwrap();
        assert_eq!(p.ppm(), 25_000);
        assert_eq!(p.to_string(), "2.5 %");
        assert_eq!(Percent::from_ppm(83_333).to_string(), "8.3333 %");
        assert_eq!(Percent::HUNDRED.to_string(), "100 %");
        assert_eq!(Percent::from_percent(10.0).unwrap().complement(), Percent::from_ppm(900_000));
        assert!(serde_json::from_str::<Percent>("101").is_err());
        assert!(serde_json::from_str::<Percent>("-1").is_err());
        assert_eq!(Percent::from_percent(f64::NAN), None);
    }
}
