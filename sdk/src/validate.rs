//! The checks the host applies to every decision, shared with the native test
//! harness so a policy's unit tests fail exactly where the host would refuse it.

use crate::MAX_WEIGHT;

/// Why a decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDecision {
    /// Not one weight per endpoint.
    #[error("returned {got} weights for {expected} endpoints")]
    WrongLength {
        /// The number of endpoints in the input.
        expected: usize,
        /// The number of weights returned.
        got: usize,
    },
    /// A weight above [`MAX_WEIGHT`].
    #[error("weight {weight} for endpoint #{index} is out of range 0..=65535")]
    OutOfRange {
        /// Position in `input.endpoints`.
        index: usize,
        /// The weight returned.
        weight: u32,
    },
    /// Every ready endpoint got 0: the Service would take no new connections.
    #[error(
        "gives weight 0 to all {ready} ready endpoints, so the Service would take no new \
         connections; set \"allowAllZero\": true in the policy config if that is intended"
    )]
    AllZero {
        /// How many endpoints were ready.
        ready: usize,
    },
}

/// Check `weights` against the endpoints' readiness (`ready[i]` for endpoint `i`).
pub fn check(weights: &[u32], ready: &[bool], allow_all_zero: bool) -> Result<(), InvalidDecision> {
    if weights.len() != ready.len() {
        return Err(InvalidDecision::WrongLength {
            expected: ready.len(),
            got: weights.len(),
        });
    }
    if let Some((index, &weight)) = weights.iter().enumerate().find(|(_, w)| **w > MAX_WEIGHT) {
        return Err(InvalidDecision::OutOfRange { index, weight });
    }
    let ready_count = ready.iter().filter(|r| **r).count();
    let all_zero = weights.iter().zip(ready).all(|(w, r)| !*r || *w == 0);
    if ready_count > 0 && all_zero && !allow_all_zero {
        return Err(InvalidDecision::AllZero { ready: ready_count });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_good_decision() {
        assert_eq!(check(&[10, 1, 0], &[true, true, false], false), Ok(()));
    }

    #[test]
    fn wrong_length() {
        assert_eq!(
            check(&[1], &[true, true], false),
            Err(InvalidDecision::WrongLength { expected: 2, got: 1 })
        );
    }

    #[test]
    fn out_of_range() {
        assert_eq!(
            check(&[1, 70000], &[true, true], false),
            Err(InvalidDecision::OutOfRange { index: 1, weight: 70000 })
        );
        assert_eq!(check(&[65535], &[true], false), Ok(()));
    }

    #[test]
    fn all_zero_is_refused_unless_allowed() {
        assert_eq!(
            check(&[0, 0, 5], &[true, true, false], false),
            Err(InvalidDecision::AllZero { ready: 2 })
        );
        assert_eq!(check(&[0, 0], &[true, true], true), Ok(()));
    }

    #[test]
    fn no_ready_endpoints_is_not_all_zero() {
        assert_eq!(check(&[0, 0], &[false, false], false), Ok(()));
        assert_eq!(check(&[], &[], false), Ok(()));
    }
}
