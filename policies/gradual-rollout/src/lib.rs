//! Gradual rollout: moves a canary's share of new connections through steps
//! (`[{share: 1, hold: 5m}, {share: 10, hold: 10m}, …, {share: 100}]`) or a
//! linear ramp (`{from, to, over, every}`). Endpoints matching `canary` are the
//! canary, all others stable; each group's share is spread over its ready
//! endpoints, whatever the replica counts.
//!
//! The rollout starts at `startTime`, or else when the oldest canary pod was
//! created — so every node computes the same step with no shared state.
//! `holdAt` freezes it where it was at that time (pausing is a time, not a
//! flag, for the same reason); `abort` sends everything back to stable. It asks
//! to be evaluated again at the next step, and never gives every ready endpoint
//! 0: a group that has no ready endpoint leaves everything to the other.
#![cfg_attr(target_family = "wasm", no_std)]

use core::fmt::Write as _;

use ipvs_policy_sdk::prelude::*;

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    /// The canary's pods; all others are stable.
    canary: LabelSelector,
    /// The canary's share through steps, each held for a time (all but the last); or give `ramp`.
    steps: Option<Vec<Step>>,
    /// A linear ramp of the canary's share instead of steps.
    ramp: Option<Ramp>,
    /// When the rollout starts (default: when the oldest canary pod was created).
    start_time: Option<Timestamp>,
    /// Freeze the rollout where it was at this time.
    hold_at: Option<Timestamp>,
    /// Send everything back to stable.
    #[serde(default)]
    abort: bool,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Step {
    /// The canary's share of new connections, in percent.
    share: Percent,
    /// How long this step lasts (not on the last one).
    hold: Option<Duration>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Ramp {
    /// The canary's share at the start, in percent (default 0).
    #[serde(default)]
    from: Percent,
    /// Its share at the end (default 100).
    #[serde(default = "hundred")]
    to: Percent,
    /// How long the ramp takes.
    over: Duration,
    /// How often the share moves (default 1m).
    #[serde(default = "one_minute")]
    every: Duration,
}

fn hundred() -> Percent {
    Percent::HUNDRED
}

fn one_minute() -> Duration {
    Duration::from_secs(60)
}

/// The rollout plan, checked.
enum Plan {
    Steps(Vec<Step>),
    Ramp(Ramp),
}

/// Where a plan is at some time after its start.
#[derive(Debug, PartialEq)]
struct Position {
    /// 1-based.
    step: u64,
    steps: u64,
    share: Percent,
    /// When the next step begins, counted from the start; `None` on the last.
    next: Option<Duration>,
}

impl PolicyConfig for Config {
    fn check(&self) -> Result<(), ConfigError> {
        if self.canary.is_empty() {
            return Err(ConfigError::field(
                "canary",
                "an empty selector would make every endpoint the canary; name the canary's labels, e.g. {\"track\": \"canary\"}",
            ));
        }
        Plan::check(self.steps.as_deref(), self.ramp.as_ref())
    }
}

impl Plan {
    fn new(steps: Option<Vec<Step>>, ramp: Option<Ramp>) -> Result<Plan, ConfigError> {
        Plan::check(steps.as_deref(), ramp.as_ref())?;
        match (steps, ramp) {
            (Some(steps), _) => Ok(Plan::Steps(steps)),
            (_, Some(ramp)) => Ok(Plan::Ramp(ramp)),
            (None, None) => unreachable!("checked: a plan has steps or a ramp"),
        }
    }

    /// Steps or a ramp, not both; every step but the last holds; a ramp moves.
    fn check(steps: Option<&[Step]>, ramp: Option<&Ramp>) -> Result<(), ConfigError> {
        match (steps, ramp) {
            (Some(_), Some(_)) => Err(ConfigError::field(".", "give either steps or ramp, not both")),
            (None, None) => Err(ConfigError::field(".", "give steps (e.g. [{\"share\": 10, \"hold\": \"5m\"}, {\"share\": 100}]) or a ramp")),
            (Some(steps), None) => {
                if steps.is_empty() {
                    return Err(ConfigError::field("steps", "needs at least one step"));
                }
                let last = steps.len() - 1;
                if let Some(i) = steps[..last].iter().position(|s| s.hold.is_none()) {
                    return Err(ConfigError::field(format!("steps[{i}].hold"), "missing: only the last step may go without a hold"));
                }
                Ok(())
            }
            (None, Some(ramp)) => {
                for (field, d) in [("ramp.over", ramp.over), ("ramp.every", ramp.every)] {
                    if d == Duration::ZERO {
                        return Err(ConfigError::field(field, "must be longer than 0s"));
                    }
                }
                Ok(())
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Plan::Steps(_) => "step",
            Plan::Ramp(_) => "ramp",
        }
    }

    /// The position `elapsed` after the start.
    fn at(&self, elapsed: Duration) -> Position {
        match self {
            Plan::Steps(steps) => {
                let count = steps.len() as u64;
                let mut end: u64 = 0;
                for (i, step) in steps.iter().enumerate() {
                    let is_last = i + 1 == steps.len();
                    end = end.saturating_add(step.hold.map_or(0, Duration::as_millis));
                    if is_last || elapsed.as_millis() < end {
                        return Position {
                            step: i as u64 + 1,
                            steps: count,
                            share: step.share,
                            next: (!is_last).then(|| Duration::from_millis(end)),
                        };
                    }
                }
                unreachable!("the loop returns at the last step, and a plan has one")
            }
            Plan::Ramp(ramp) => {
                let (over, every) = (ramp.over.as_millis(), ramp.every.as_millis());
                let increments = over.div_ceil(every);
                // The last increment may be shorter: it ends at `over`, not at a multiple of `every`.
                let k = match elapsed.as_millis() >= over {
                    true => increments,
                    false => elapsed.as_millis() / every,
                };
                let reached = k.saturating_mul(every).min(over);
                let (from, to) = (i128::from(ramp.from.ppm()), i128::from(ramp.to.ppm()));
                let ppm = from + (to - from) * i128::from(reached) / i128::from(over);
                Position {
                    step: k + 1,
                    steps: increments + 1,
                    share: Percent::from_ppm(ppm as u32),
                    next: (reached < over).then(|| Duration::from_millis((k + 1).saturating_mul(every).min(over))),
                }
            }
        }
    }
}

/// The gradual-rollout policy.
pub struct GradualRollout;

impl Policy for GradualRollout {
    fn evaluate(input: &Input) -> Result<Decision, String> {
        let config: Config = config::parse(&input.config)?;
        config.check()?;
        let plan = Plan::new(config.steps, config.ramp)?;
        let set_is_canary: Vec<bool> = input.label_sets.iter().map(|l| config.canary.matches(l)).collect();
        let is_canary = |e: &Endpoint| set_is_canary.get(e.label_set as usize).copied().unwrap_or(false);

        // Where the rollout is: the canary's share, what to say, when to look again.
        let now = input.now.as_millis();
        let start = match config.start_time {
            Some(t) => Some(t),
            None => oldest_canary(input, &is_canary)?,
        };
        let (share, mut message, requeue_at) = match start {
            _ if config.abort => (Percent::ZERO, "aborted: all connections to stable".to_string(), None),
            None => (Percent::ZERO, "no canary endpoints".to_string(), None),
            Some(start) => {
                let hold_at = config.hold_at.map(|h| h.as_millis());
                // Frozen: the rollout is evaluated at holdAt, for ever.
                let at = hold_at.map_or(now, |h| h.min(now));
                let held = hold_at.filter(|h| *h <= now);
                let held_note = |m: String| match &config.hold_at {
                    Some(h) if held.is_some() => format!("held at {h}: {m}"),
                    _ => m,
                };
                if at < start.as_millis() {
                    let waiting = Duration::from_millis((start.as_millis() - now).max(0) as u64);
                    let m = match held {
                        Some(_) => "before its start".to_string(),
                        None => format!("starts in {waiting} (at {start})"),
                    };
                    let wake = held.is_none().then_some(start.as_millis());
                    (Percent::ZERO, held_note(m), wake.map(|w| w.min(hold_at.unwrap_or(i64::MAX))))
                } else {
                    let position = plan.at(Duration::from_millis((at - start.as_millis()) as u64));
                    let mut m = format!("{} {}/{}: canary {}", plan.name(), position.step, position.steps, position.share);
                    let next = position.next.map(|d| start.as_millis().saturating_add(d.as_millis() as i64));
                    let wake = match (held, next, hold_at) {
                        (Some(_), _, _) => None,
                        (None, None, _) => {
                            m.push_str(", rollout complete");
                            None
                        }
                        (None, Some(next), Some(h)) if h <= next => {
                            let _ = write!(m, ", held from {}", Timestamp::from_millis(h));
                            Some(h)
                        }
                        (None, Some(next), _) => {
                            let _ = write!(m, ", next in {}", Duration::from_millis((next - now) as u64));
                            Some(next)
                        }
                    };
                    (position.share, held_note(m), wake)
                }
            }
        };

        // Spread the shares over the ready endpoints.
        let canary_ready = input.endpoints.iter().filter(|e| e.is_ready() && is_canary(e)).count() as u32;
        let stable_ready = input.endpoints.iter().filter(|e| e.is_ready() && !is_canary(e)).count() as u32;
        let split = share::split(&[
            Demand { share: u64::from(share.ppm()), ready: canary_ready },
            Demand { share: u64::from(share.complement().ppm()), ready: stable_ready },
        ]);
        let (mut canary_weight, mut stable_weight) = (split.weights[0], split.weights[1]);
        if canary_ready == 0 && share > Percent::ZERO && stable_ready > 0 {
            message.push_str("; no canary endpoint is ready: stable takes everything");
            stable_weight = stable_weight.max(1);
        } else if stable_ready == 0 && share < Percent::HUNDRED && canary_ready > 0 {
            message.push_str("; no stable endpoint is ready: canary takes everything");
            canary_weight = canary_weight.max(1);
        } else if canary_ready > 0 && stable_ready > 0 && !split.is_exact() {
            let _ = write!(message, "; {}", split.rounding_note());
        }
        let weights = input
            .endpoints
            .iter()
            .map(|e| match (e.is_ready(), is_canary(e)) {
                (false, _) => 0,
                (true, true) => canary_weight,
                (true, false) => stable_weight,
            })
            .collect();
        let mut decision = Decision::new(weights).message(message);
        if let Some(at) = requeue_at {
            decision = decision.requeue_after_ms((at - now).max(1) as u64);
        }
        Ok(decision)
    }
}

/// When the oldest canary pod was created: the default start of the rollout.
fn oldest_canary(input: &Input, is_canary: &impl Fn(&Endpoint) -> bool) -> Result<Option<Timestamp>, String> {
    let canaries = input.endpoints.iter().filter(|e| is_canary(e));
    if canaries.clone().next().is_none() {
        return Ok(None);
    }
    canaries
        .filter_map(|e| e.created)
        .min_by_key(Timestamp::as_millis)
        .map(Some)
        .ok_or_else(|| "cannot tell when the rollout started: the canary pods have no creation time; set startTime".into())
}

export_policy!(GradualRollout, config = Config);

#[cfg(test)]
mod tests {
    use super::*;
    use ipvs_policy_sdk::testing::{pod, Testcase, DEFAULT_NOW};

    const STEPS: &str = r#""steps": [{"share": 1, "hold": "5m"}, {"share": 10, "hold": "10m"},
        {"share": 50, "hold": "10m"}, {"share": 100}]"#;

    /// 3 stable and 2 canary pods, the canaries created at `DEFAULT_NOW`, `now` `minutes` later.
    fn rollout(config: &str, minutes: u64) -> Testcase {
        Testcase::new()
            .config(&format!(r#"{{"canary": {{"track": "canary"}}, {config}}}"#))
            .endpoint(pod("stable-1").label("track", "stable"))
            .endpoint(pod("stable-2").label("track", "stable"))
            .endpoint(pod("stable-3").label("track", "stable"))
            .endpoint(pod("canary-1").label("track", "canary").created_at(DEFAULT_NOW))
            .endpoint(pod("canary-2").label("track", "canary").created_at(DEFAULT_NOW.plus(Duration::from_secs(30))))
            .advance(Duration::from_secs(minutes * 60))
    }

    /// The canary's share of new connections given by `weights` (ready endpoints only).
    fn canary_share(case: &Testcase, weights: &[u32]) -> f64 {
        let input = case.input();
        let (mut canary, mut total) = (0u64, 0u64);
        for (e, w) in input.endpoints.iter().zip(weights) {
            if e.is_ready() {
                total += u64::from(*w);
                if selector::get(input.labels(e), "track") == Some("canary") {
                    canary += u64::from(*w);
                }
            }
        }
        canary as f64 / total as f64
    }

    fn run(case: &Testcase) -> (Decision, f64) {
        let decision = case.evaluate::<GradualRollout>().unwrap();
        let share = canary_share(case, &decision.weights);
        (decision, share)
    }

    #[test]
    fn steps_move_the_canary_share_from_the_oldest_canary_pod() {
        for (minutes, share, message) in [
            (0, 0.01, "step 1/4: canary 1 %, next in 5m"),
            (4, 0.01, "step 1/4: canary 1 %, next in 1m"),
            (5, 0.10, "step 2/4: canary 10 %, next in 10m"),
            (16, 0.50, "step 3/4: canary 50 %, next in 9m"),
            (25, 1.00, "step 4/4: canary 100 %, rollout complete"),
            (500, 1.00, "step 4/4: canary 100 %, rollout complete"),
        ] {
            let (decision, got) = run(&rollout(STEPS, minutes));
            assert!((got - share).abs() < 1e-9, "at {minutes}m: canary {got}, expected {share}: {decision:?}");
            assert_eq!(decision.message.as_deref(), Some(message), "at {minutes}m");
        }
    }

    #[test]
    fn the_split_ignores_replica_counts() {
        // 10 % to 2 canaries against 3 stable: per endpoint 5 % vs 30 % → 1 : 6.
        let (decision, _) = run(&rollout(STEPS, 5));
        assert_eq!(decision.weights, vec![6, 6, 6, 1, 1]);
    }

    #[test]
    fn it_asks_to_be_evaluated_at_the_next_step() {
        let (decision, _) = run(&rollout(STEPS, 7).advance(Duration::from_secs(12)));
        // Step 2 ends 15m after the start: 7m12s have passed.
        assert_eq!(decision.requeue_after_ms, Some((7 * 60 + 48) * 1000));
        assert_eq!(decision.message.as_deref(), Some("step 2/4: canary 10 %, next in 7m48s"));
        let (decision, _) = run(&rollout(STEPS, 30));
        assert_eq!(decision.requeue_after_ms, None);
    }

    #[test]
    fn start_time_overrides_the_oldest_canary() {
        // Started 20 minutes before the canaries were created: step 3 already.
        let config = format!(r#""startTime": "2025-12-31T23:40:00Z", {STEPS}"#);
        let (decision, share) = run(&rollout(&config, 1));
        assert!((share - 0.5).abs() < 1e-9, "{decision:?}");
        assert_eq!(decision.message.as_deref(), Some("step 3/4: canary 50 %, next in 4m"));
    }

    #[test]
    fn a_start_in_the_future_waits_with_canary_at_zero() {
        let config = format!(r#""startTime": "2026-01-01T01:00:00Z", {STEPS}"#);
        let (decision, share) = run(&rollout(&config, 15));
        assert_eq!(share, 0.0);
        assert_eq!(decision.weights, vec![1, 1, 1, 0, 0]);
        assert_eq!(decision.requeue_after_ms, Some(45 * 60 * 1000));
        assert_eq!(decision.message.as_deref(), Some("starts in 45m (at 2026-01-01T01:00:00Z)"));
    }

    #[test]
    fn hold_at_freezes_the_rollout_where_it_was() {
        let config = format!(r#""holdAt": "2026-01-01T00:07:00Z", {STEPS}"#);
        let (decision, share) = run(&rollout(&config, 40));
        assert!((share - 0.10).abs() < 1e-9, "{decision:?}");
        assert_eq!(decision.requeue_after_ms, None);
        assert_eq!(
            decision.message.as_deref(),
            Some("held at 2026-01-01T00:07:00Z: step 2/4: canary 10 %")
        );
    }

    #[test]
    fn a_hold_in_the_future_is_announced_and_woken_for() {
        let config = format!(r#""holdAt": "2026-01-01T00:07:00Z", {STEPS}"#);
        let (decision, share) = run(&rollout(&config, 6));
        assert!((share - 0.10).abs() < 1e-9);
        assert_eq!(decision.requeue_after_ms, Some(60_000));
        assert_eq!(
            decision.message.as_deref(),
            Some("step 2/4: canary 10 %, held from 2026-01-01T00:07:00Z")
        );
    }

    #[test]
    fn abort_sends_everything_to_stable() {
        let config = format!(r#""abort": true, {STEPS}"#);
        let (decision, share) = run(&rollout(&config, 20));
        assert_eq!(share, 0.0);
        assert_eq!(decision.weights, vec![1, 1, 1, 0, 0]);
        assert_eq!(decision.message.as_deref(), Some("aborted: all connections to stable"));
        assert_eq!(decision.requeue_after_ms, None);
    }

    #[test]
    fn abort_with_no_stable_endpoint_still_serves() {
        let case = Testcase::new()
            .config(&format!(r#"{{"canary": {{"track": "canary"}}, "abort": true, {STEPS}}}"#))
            .endpoint(pod("canary-1").label("track", "canary"))
            .endpoint(pod("stable-1").label("track", "stable").not_ready());
        let decision = case.evaluate::<GradualRollout>().unwrap();
        assert_eq!(decision.weights, vec![1, 0]);
        assert_eq!(
            decision.message.as_deref(),
            Some("aborted: all connections to stable; no stable endpoint is ready: canary takes everything")
        );
    }

    #[test]
    fn no_canary_endpoints_means_all_stable() {
        let case = Testcase::new()
            .config(&format!(r#"{{"canary": {{"track": "canary"}}, {STEPS}}}"#))
            .endpoint(pod("stable-1").label("track", "stable"))
            .endpoint(pod("stable-2").label("track", "stable"));
        let decision = case.evaluate::<GradualRollout>().unwrap();
        assert_eq!(decision.weights, vec![1, 1]);
        assert_eq!(decision.message.as_deref(), Some("no canary endpoints"));
    }

    #[test]
    fn canaries_that_are_not_ready_leave_everything_to_stable() {
        let case = Testcase::new()
            .config(&format!(r#"{{"canary": {{"track": "canary"}}, {STEPS}}}"#))
            .endpoint(pod("stable-1").label("track", "stable"))
            .endpoint(pod("canary-1").label("track", "canary").not_ready());
        let decision = case.advance(Duration::from_secs(3600)).evaluate::<GradualRollout>().unwrap();
        // At 100 % with no ready canary: stable, not a black hole.
        assert_eq!(decision.weights, vec![1, 0]);
        assert_eq!(
            decision.message.as_deref(),
            Some("step 4/4: canary 100 %, rollout complete; no canary endpoint is ready: stable takes everything")
        );
    }

    #[test]
    fn a_zero_share_step_with_only_canaries_still_serves() {
        let case = Testcase::new()
            .config(r#"{"canary": {"track": "canary"}, "steps": [{"share": 0, "hold": "1h"}, {"share": 100}]}"#)
            .endpoint(pod("canary-1").label("track", "canary"));
        assert_eq!(case.weights::<GradualRollout>(), vec![1]);
    }

    #[test]
    fn at_100_percent_stable_gets_zero() {
        let (decision, share) = run(&rollout(STEPS, 30));
        assert_eq!(share, 1.0);
        assert_eq!(decision.weights, vec![0, 0, 0, 1, 1]);
    }

    #[test]
    fn terminating_and_unready_endpoints_get_zero_and_do_not_count() {
        let case = rollout(STEPS, 5)
            .endpoint(pod("stable-4").label("track", "stable").terminating())
            .endpoint(pod("canary-3").label("track", "canary").created_at(DEFAULT_NOW).not_ready());
        let (decision, share) = run(&case);
        assert!((share - 0.1).abs() < 1e-9);
        assert_eq!(decision.weights, vec![6, 6, 6, 1, 1, 0, 0]);
    }

    #[test]
    fn a_ramp_moves_linearly_in_increments() {
        let ramp = r#""ramp": {"from": 0, "to": 100, "over": "1h", "every": "15m"}"#;
        for (minutes, share, message) in [
            (0, 0.0, "ramp 1/5: canary 0 %, next in 15m"),
            (14, 0.0, "ramp 1/5: canary 0 %, next in 1m"),
            (15, 0.25, "ramp 2/5: canary 25 %, next in 15m"),
            (50, 0.75, "ramp 4/5: canary 75 %, next in 10m"),
            (60, 1.0, "ramp 5/5: canary 100 %, rollout complete"),
        ] {
            let (decision, got) = run(&rollout(ramp, minutes));
            assert!((got - share).abs() < 1e-9, "at {minutes}m: {got} {decision:?}");
            assert_eq!(decision.message.as_deref(), Some(message), "at {minutes}m");
        }
    }

    #[test]
    fn a_ramp_whose_increments_do_not_divide_it_ends_on_time() {
        let ramp = r#""ramp": {"from": 10, "to": 40, "over": "10m", "every": "4m"}"#;
        let shares: Vec<f64> = [0, 4, 8, 10].iter().map(|m| run(&rollout(ramp, *m)).1).collect();
        for (got, want) in shares.iter().zip([0.10, 0.22, 0.34, 0.40]) {
            assert!((got - want).abs() < 1e-9, "{shares:?}");
        }
        let (decision, _) = run(&rollout(ramp, 9));
        assert_eq!(decision.message.as_deref(), Some("ramp 3/4: canary 34 %, next in 1m"));
    }

    #[test]
    fn a_ramp_can_go_down() {
        let ramp = r#""ramp": {"from": 50, "to": 0, "over": "10m", "every": "5m"}"#;
        assert!((run(&rollout(ramp, 5)).1 - 0.25).abs() < 1e-9);
    }

    #[test]
    fn rounding_is_reported_when_the_split_is_not_exact() {
        let ramp = r#""ramp": {"from": 0, "to": 100, "over": "3h", "every": "1m"}"#;
        let (decision, share) = run(&rollout(ramp, 1));
        // 1/180 of 100 % = 0.5555 %, truncated to the ppm.
        assert!((share - 0.005555).abs() < 1e-6, "{share}");
        let message = decision.message.unwrap();
        assert!(message.starts_with("ramp 2/181: canary 0.5555 %, next in 1m; rounding error"), "{message}");
    }

    #[test]
    fn match_expressions_select_the_canary() {
        let case = Testcase::new()
            .config(&format!(
                r#"{{"canary": {{"matchExpressions": [{{"key": "version", "operator": "In", "values": ["v2"]}}]}},
                    "startTime": "2026-01-01T00:00:00Z", {STEPS}}}"#
            ))
            .endpoint(pod("v1").label("version", "v1"))
            .endpoint(pod("v2").label("version", "v2"))
            .advance(Duration::from_secs(6 * 60));
        assert_eq!(case.weights::<GradualRollout>(), vec![9, 1]);
    }

    #[test]
    fn configs_that_make_no_sense_are_refused_naming_the_field() {
        let refused = |config: &str, expected: &str| {
            let err = Testcase::new()
                .config(config)
                .endpoint(pod("a").label("track", "canary"))
                .evaluate::<GradualRollout>()
                .unwrap_err();
            assert!(err.contains(expected), "{config}: {err}");
        };
        refused(r#"{"steps": [{"share": 100}]}"#, "missing field `canary`");
        refused(r#"{"canary": {}, "steps": [{"share": 100}]}"#, "canary: an empty selector");
        refused(r#"{"canary": {"track": "canary"}}"#, "give steps");
        refused(
            r#"{"canary": {"track": "canary"}, "steps": [{"share": 100}], "ramp": {"over": "1h"}}"#,
            "not both",
        );
        refused(r#"{"canary": {"track": "canary"}, "steps": []}"#, "steps: needs at least one step");
        refused(
            r#"{"canary": {"track": "canary"}, "steps": [{"share": 1}, {"share": 100}]}"#,
            "steps[0].hold: missing",
        );
        refused(r#"{"canary": {"track": "canary"}, "steps": [{"share": 120}]}"#, "steps[0].share");
        refused(r#"{"canary": {"track": "canary"}, "steps": [{"share": 1, "hold": "5 min"}, {"share": 100}]}"#, "steps[0].hold");
        refused(r#"{"canary": {"track": "canary"}, "ramp": {"over": "0s"}}"#, "ramp.over: must be longer");
        refused(r#"{"canary": {"track": "canary"}, "startTime": "yesterday", "steps": [{"share": 1}]}"#, "startTime");
        refused(r#"{"canary": {"track": "canary"}, "steps": [{"share": 1}], "pause": true}"#, "unknown field `pause`");
    }

    #[test]
    fn canaries_without_creation_time_need_a_start_time() {
        let case = Testcase::new()
            .config(&format!(r#"{{"canary": {{"track": "canary"}}, {STEPS}}}"#))
            .endpoint(pod("c").label("track", "canary"));
        let mut input = case.input().clone();
        input.endpoints[0].created = None;
        let err = GradualRollout::evaluate(&input).unwrap_err();
        assert!(err.contains("set startTime"), "{err}");
    }

    #[test]
    fn every_node_computes_the_same_answer() {
        // Same input, different evaluating node: the same weights and message.
        let a = rollout(STEPS, 6).node("node-a", Some("zone-1"), &[]);
        let b = rollout(STEPS, 6).node("node-b", Some("zone-2"), &[]);
        assert_eq!(a.evaluate::<GradualRollout>(), b.evaluate::<GradualRollout>());
    }
}
