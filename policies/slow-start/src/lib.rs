//! Slow start: an endpoint that became ready less than `window` ago gets only
//! part of its full weight, growing until the window has passed, as in Envoy's
//! slow start:
//!
//! `weight = full · max(minWeightPercent / 100, (max(t, 1s) / window) ^ (1 / aggression))`
//!
//! where `t` is the time since the endpoint became ready. `aggression` 1 (the
//! default) is linear; larger values ramp up faster at first. The full weight is
//! the label-selector policy's (`mode` and `defaultWeight` as there), so
//! slow-start can replace label-selector on any WeightedService.
//!
//! While an endpoint warms up, every weight is multiplied by up to 100 (so that
//! a warming endpoint's weight can grow in small steps when the full weights are
//! small); the split between warm endpoints stays the same. It asks to be
//! evaluated again until every endpoint is warm.
//!
//! The time an endpoint became ready is as the agent saw it; one ready when first
//! seen (agent restart, a new WeightedService) counts from its pod's creation.
#![cfg_attr(target_family = "wasm", no_std)]

use core::fmt::Write as _;

use ipvs_policy_sdk::prelude::*;

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    /// How long an endpoint that became ready warms up.
    window: Duration,
    /// 1 (the default) ramps up linearly; larger values ramp up faster at first.
    #[serde(default = "one")]
    aggression: f64,
    /// The least part of its full weight a warming endpoint gets (default 10).
    #[serde(default = "ten_percent")]
    min_weight_percent: Percent,
    /// The full weights: label-selector's `mode`.
    #[serde(default)]
    mode: groups::Mode,
    /// The full weights: label-selector's `defaultWeight`.
    default_weight: Option<u32>,
}

fn one() -> f64 {
    1.0
}

fn ten_percent() -> Percent {
    // Envoy's default: low enough to protect a cold endpoint, high enough that it gets some traffic.
    Percent::from_ppm(100_000)
}

/// The largest factor weights are multiplied by while an endpoint warms up.
const RESOLUTION: u32 = 100;

/// How warming endpoints are listed in the message, at most.
const LISTED: usize = 3;

impl PolicyConfig for Config {
    fn check(&self) -> Result<(), ConfigError> {
        if self.window == Duration::ZERO {
            return Err(ConfigError::field("window", "must be longer than 0s"));
        }
        // The negated comparison also refuses NaN.
        if !(self.aggression > 0.0 && self.aggression.is_finite()) {
            return Err(ConfigError::field("aggression", "must be a number greater than 0"));
        }
        Ok(())
    }
}

/// The slow-start policy.
pub struct SlowStart;

impl Policy for SlowStart {
    fn evaluate(input: &Input) -> Result<Decision, String> {
        let config: Config = config::parse(&input.config)?;
        config.check()?;
        let (full, base_message) = groups::weights(input, config.mode, config.default_weight);
        let window = config.window.as_millis();

        // How far each endpoint is through its warm-up, 0..=1 (1 = warm).
        let progress: Vec<f64> = input
            .endpoints
            .iter()
            .map(|e| match (e.is_ready(), &e.ready_since) {
                (false, _) => 0.0,
                // Ready since an unknown time: nothing to go by, treat as warm.
                (true, None) => 1.0,
                (true, Some(since)) => {
                    let t = input.now.since(since).as_millis();
                    if t >= window { 1.0 } else { t.max(1000) as f64 / window as f64 }
                }
            })
            .collect();
        let warming = |i: usize| input.endpoints[i].is_ready() && progress[i] < 1.0 && full[i] > 0;
        if !(0..full.len()).any(warming) {
            let mut message = "all endpoints warm".to_string();
            if let Some(base) = base_message {
                let _ = write!(message, "; {base}");
            }
            return Ok(Decision::new(full).message(message));
        }

        let largest = full.iter().copied().max().unwrap_or(1).max(1);
        let scale = (MAX_WEIGHT / largest).clamp(1, RESOLUTION);
        let floor = f64::from(config.min_weight_percent.ppm()) / 1e6;
        let mut warm_in: u64 = u64::MAX;
        let mut listed: Vec<String> = Vec::new();
        let mut count = 0;
        let weights = full
            .iter()
            .zip(&progress)
            .enumerate()
            .map(|(i, (full, progress))| {
                let full = full * scale;
                if *progress >= 1.0 || full == 0 {
                    return full;
                }
                let factor = libm::pow(*progress, 1.0 / config.aggression).max(floor).min(1.0);
                // + 0.5 and truncation: rounding without std's f64::round. At least 1:
                // a cold endpoint still gets some traffic, and never all-zero.
                let weight = ((f64::from(full) * factor + 0.5) as u32).clamp(1, full);
                if warming(i) {
                    count += 1;
                    let e = &input.endpoints[i];
                    if let Some(since) = &e.ready_since {
                        warm_in = warm_in.min(window - input.now.since(since).as_millis().min(window));
                    }
                    if listed.len() < LISTED {
                        let name = e.pod_name.clone().unwrap_or_else(|| e.address.clone());
                        let percent = Percent::from_ppm((f64::from(weight) / f64::from(full) * 1e6 + 0.5) as u32);
                        listed.push(format!("{name} at {percent}"));
                    }
                }
                weight
            })
            .collect();

        let mut message = format!("{count} warming up ({}", listed.join(", "));
        if count > listed.len() {
            let _ = write!(message, " and {} more", count - listed.len());
        }
        let _ = write!(message, "); all warm in {}", Duration::from_millis(warm_in));
        if scale > 1 {
            let _ = write!(message, "; weights ×{scale} until then");
        }
        if let Some(base) = base_message {
            let _ = write!(message, "; {base}");
        }
        // Often enough to follow the curve, at most 20 steps per window, at least 1 s apart.
        let step = (window / 20).max(1000);
        Ok(Decision::new(weights).message(message).requeue_after_ms(warm_in.clamp(1, step)))
    }
}

export_policy!(SlowStart, config = Config);

#[cfg(test)]
mod tests {
    use super::*;
    use ipvs_policy_sdk::testing::{pod, Testcase, DEFAULT_NOW};

    /// Three endpoints warm for an hour, and one that became ready `seconds` ago.
    fn scaled_out(config: &str, seconds: u64) -> Testcase {
        Testcase::new()
            .config(config)
            .endpoint(pod("web-1"))
            .endpoint(pod("web-2"))
            .endpoint(pod("web-3"))
            .endpoint(pod("web-4").ready_since(DEFAULT_NOW))
            .advance(Duration::from_secs(seconds))
    }

    #[test]
    fn a_new_endpoint_grows_linearly_from_the_minimum_to_full() {
        let config = r#"{"window": "100s"}"#;
        for (seconds, weight) in [(0, 10), (5, 10), (10, 10), (30, 30), (50, 50), (99, 99)] {
            let weights = scaled_out(config, seconds).weights::<SlowStart>();
            assert_eq!(weights, vec![100, 100, 100, weight], "after {seconds}s");
        }
        // Warm: back to the label-selector weights, unscaled.
        assert_eq!(scaled_out(config, 100).weights::<SlowStart>(), vec![1, 1, 1, 1]);
    }

    #[test]
    fn aggression_ramps_up_faster_at_first() {
        let config = r#"{"window": "100s", "aggression": 2, "minWeightPercent": 0}"#;
        // (t / window) ^ (1/2): 25 s → 50 %, 81 s → 90 %.
        assert_eq!(scaled_out(config, 25).weights::<SlowStart>()[3], 50);
        assert_eq!(scaled_out(config, 81).weights::<SlowStart>()[3], 90);
        // At least a second has passed, as in Envoy, and at least weight 1.
        assert_eq!(scaled_out(config, 0).weights::<SlowStart>()[3], 10);
    }

    #[test]
    fn the_minimum_percent_bounds_the_weight_below() {
        let config = r#"{"window": "100s", "minWeightPercent": 40}"#;
        assert_eq!(scaled_out(config, 10).weights::<SlowStart>()[3], 40);
        assert_eq!(scaled_out(config, 60).weights::<SlowStart>()[3], 60);
    }

    #[test]
    fn it_asks_to_be_evaluated_again_until_every_endpoint_is_warm() {
        let config = r#"{"window": "100s"}"#;
        let d = scaled_out(config, 30).evaluate::<SlowStart>().unwrap();
        // Every 5 s (a twentieth of the window).
        assert_eq!(d.requeue_after_ms, Some(5000));
        assert_eq!(
            d.message.as_deref(),
            Some("1 warming up (web-4 at 30 %); all warm in 1m10s; weights ×100 until then")
        );
        let d = scaled_out(config, 98).evaluate::<SlowStart>().unwrap();
        assert_eq!(d.requeue_after_ms, Some(2000));
        let d = scaled_out(config, 100).evaluate::<SlowStart>().unwrap();
        assert_eq!(d.requeue_after_ms, None);
        assert_eq!(d.message.as_deref(), Some("all endpoints warm"));
    }

    #[test]
    fn full_weights_come_from_the_label_groups() {
        let case = Testcase::new()
            .config(r#"{"window": "100s"}"#)
            .group(10, &[("env", "prod")])
            .group(1, &[("env", "canary")])
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("prod-2").label("env", "prod").ready_since(DEFAULT_NOW))
            .endpoint(pod("canary-1").label("env", "canary"))
            .endpoint(pod("other").label("env", "dev"))
            .advance(Duration::from_secs(50));
        // ×100 while warming: prod 1000, canary 100; prod-2 at half of 1000.
        assert_eq!(case.weights::<SlowStart>(), vec![1000, 500, 100, 100]);
        let case = case.config(r#"{"window": "100s", "defaultWeight": 0}"#);
        assert_eq!(case.weights::<SlowStart>(), vec![1000, 500, 100, 0]);
    }

    #[test]
    fn share_mode_is_the_base_when_asked() {
        let case = Testcase::new()
            .config(r#"{"window": "100s", "mode": "share"}"#)
            .group(90, &[("env", "prod")])
            .group(10, &[("env", "canary")])
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("canary-1").label("env", "canary").ready_since(DEFAULT_NOW))
            .advance(Duration::from_secs(50));
        // Shares 9 : 1, ×100 while warming; the canary at half its weight.
        let d = case.evaluate::<SlowStart>().unwrap();
        assert_eq!(d.weights, vec![900, 50]);
        assert!(d.message.unwrap().ends_with("env=prod 90 % (1 × 9), env=canary 10 % (1 × 1); exact"));
    }

    #[test]
    fn large_weights_are_not_scaled_past_the_maximum() {
        let case = Testcase::new()
            .config(r#"{"window": "100s"}"#)
            .group(30000, &[])
            .endpoint(pod("old"))
            .endpoint(pod("new").ready_since(DEFAULT_NOW))
            .advance(Duration::from_secs(50));
        assert_eq!(case.weights::<SlowStart>(), vec![60000, 30000]);
    }

    #[test]
    fn when_every_endpoint_is_new_none_gets_zero() {
        let case = Testcase::new()
            .config(r#"{"window": "10m", "minWeightPercent": 0}"#)
            .endpoint(pod("a").ready_since(DEFAULT_NOW))
            .endpoint(pod("b").ready_since(DEFAULT_NOW));
        assert_eq!(case.weights::<SlowStart>(), vec![1, 1]);
    }

    #[test]
    fn unready_and_terminating_endpoints_do_not_warm() {
        let case = scaled_out(r#"{"window": "100s"}"#, 50)
            .endpoint(pod("web-5").not_ready())
            .endpoint(pod("web-6").terminating());
        let d = case.evaluate::<SlowStart>().unwrap();
        // Not ready: cold (the minimum), ready to start from there; terminating: 0.
        assert_eq!(d.weights, vec![100, 100, 100, 50, 10, 0]);
        assert!(d.message.unwrap().starts_with("1 warming up (web-4 at 50 %)"));
    }

    #[test]
    fn an_endpoint_ready_since_an_unknown_time_is_warm() {
        let mut input = scaled_out(r#"{"window": "100s"}"#, 10).input().clone();
        input.endpoints[3].ready_since = None;
        assert_eq!(SlowStart::evaluate(&input).unwrap().weights, vec![1, 1, 1, 1]);
    }

    #[test]
    fn many_warming_endpoints_are_summarised() {
        let mut case = Testcase::new().config(r#"{"window": "1m"}"#).endpoint(pod("old"));
        for i in 0..5 {
            case = case.endpoint(pod(&format!("new-{i}")).ready_since(DEFAULT_NOW.plus(Duration::from_secs(i))));
        }
        let d = case.advance(Duration::from_secs(30)).evaluate::<SlowStart>().unwrap();
        let message = d.message.unwrap();
        assert!(message.starts_with("5 warming up (new-0 at 50 %, new-1 at 48 %, new-2 at 47 % and 2 more); all warm in 30s"), "{message}");
    }

    #[test]
    fn bad_configs_name_the_field() {
        for (config, field) in [
            (r#"{}"#, "missing field `window`"),
            (r#"{"window": "0s"}"#, "window: must be longer"),
            (r#"{"window": "1m", "aggression": 0}"#, "aggression"),
            (r#"{"window": "1m", "minWeightPercent": 200}"#, "minWeightPercent"),
            (r#"{"window": "1m", "mode": "sum"}"#, "mode"),
            (r#"{"window": "1m", "minWeight": 1}"#, "unknown field `minWeight`"),
        ] {
            let err = Testcase::new().config(config).endpoint(pod("a")).evaluate::<SlowStart>().unwrap_err();
            assert!(err.contains(field), "{config}: {err}");
        }
    }
}
