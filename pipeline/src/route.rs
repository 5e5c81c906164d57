//! Retry and dead-letter routing decisions.
//!
//! Attempts are numbered from 1 on the main topic, and each tier runs the
//! attempts that follow those of the tiers before it. With the default tiers
//! (`retry-30s` and `retry-5m`, one attempt each), attempt 2 runs on
//! `retry-30s` and attempt 3 on `retry-5m`, and a third failure goes to the
//! dead-letter topic. The decision depends only on the attempt that
//! failed and the kind of failure, so every member reaches the same one.

use crate::config::TierSettings;

/// How a failed attempt should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// May succeed later: walks the tiers.
    Retryable,
    /// Will never succeed: goes straight to the dead-letter topic.
    Permanent,
}

/// Where a failed job goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Retry on `tiers[tier]` as attempt `attempt`.
    Retry { tier: usize, attempt: u32 },
    /// Dead-letter after `attempts` attempts ran.
    DeadLetter { attempts: u32 },
}

/// Decides the next hop of a job whose attempt `failed_attempt` failed.
pub fn next_hop(tiers: &[TierSettings], failed_attempt: u32, kind: FailureKind) -> Hop {
    let failed_attempt = failed_attempt.max(1);
    if kind == FailureKind::Permanent {
        return Hop::DeadLetter {
            attempts: failed_attempt,
        };
    }
    let next = failed_attempt.saturating_add(1);
    // The first tier starts at attempt 2; each tier's range follows the last.
    let mut first_of_tier: u32 = 2;
    for (index, tier) in tiers.iter().enumerate() {
        let end = first_of_tier.saturating_add(tier.attempts);
        if (first_of_tier..end).contains(&next) {
            return Hop::Retry {
                tier: index,
                attempt: next,
            };
        }
        first_of_tier = end;
    }
    Hop::DeadLetter {
        attempts: failed_attempt,
    }
}

/// Total attempts a job gets before it is dead-lettered.
pub fn max_attempts(tiers: &[TierSettings]) -> u32 {
    tiers
        .iter()
        .fold(1u32, |total, tier| total.saturating_add(tier.attempts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tier(name: &str, attempts: u32) -> TierSettings {
        TierSettings {
            name: name.into(),
            delay_ms: 10,
            attempts,
        }
    }

    #[test]
    fn default_tiers_walk_once_each_then_dead_letter() {
        let tiers = [tier("retry-30s", 1), tier("retry-5m", 1)];
        let retry = FailureKind::Retryable;
        assert_eq!(
            next_hop(&tiers, 1, retry),
            Hop::Retry {
                tier: 0,
                attempt: 2
            }
        );
        assert_eq!(
            next_hop(&tiers, 2, retry),
            Hop::Retry {
                tier: 1,
                attempt: 3
            }
        );
        assert_eq!(next_hop(&tiers, 3, retry), Hop::DeadLetter { attempts: 3 });
        assert_eq!(max_attempts(&tiers), 3);
    }

    #[test]
    fn permanent_failure_skips_tiers() {
        let tiers = [tier("retry-30s", 1)];
        assert_eq!(
            next_hop(&tiers, 1, FailureKind::Permanent),
            Hop::DeadLetter { attempts: 1 }
        );
        assert_eq!(
            next_hop(&tiers, 2, FailureKind::Permanent),
            Hop::DeadLetter { attempts: 2 }
        );
    }

    #[test]
    fn tier_with_several_attempts_repeats_itself() {
        let tiers = [tier("fast", 2), tier("slow", 1)];
        let retry = FailureKind::Retryable;
        assert_eq!(
            next_hop(&tiers, 1, retry),
            Hop::Retry {
                tier: 0,
                attempt: 2
            }
        );
        assert_eq!(
            next_hop(&tiers, 2, retry),
            Hop::Retry {
                tier: 0,
                attempt: 3
            }
        );
        assert_eq!(
            next_hop(&tiers, 3, retry),
            Hop::Retry {
                tier: 1,
                attempt: 4
            }
        );
        assert_eq!(next_hop(&tiers, 4, retry), Hop::DeadLetter { attempts: 4 });
    }

    #[test]
    fn no_tiers_means_dead_letter_on_first_failure() {
        assert_eq!(
            next_hop(&[], 1, FailureKind::Retryable),
            Hop::DeadLetter { attempts: 1 }
        );
    }

    proptest! {
        #[test]
        fn attempts_only_grow_and_end_in_dead_letter(counts in proptest::collection::vec(1u32..4, 0..5)) {
            let tiers: Vec<_> = counts.iter().enumerate().map(|(i, c)| tier(&format!("t{i}"), *c)).collect();
            let mut attempt = 1;
            let mut last_tier = None;
            loop {
                match next_hop(&tiers, attempt, FailureKind::Retryable) {
                    Hop::Retry { tier, attempt: next } => {
                        prop_assert_eq!(next, attempt + 1);
                        prop_assert!(last_tier.is_none_or(|last| tier >= last));
                        last_tier = Some(tier);
                        attempt = next;
                    }
                    Hop::DeadLetter { attempts } => {
                        prop_assert_eq!(attempts, max_attempts(&tiers));
                        break;
                    }
                }
            }
        }
    }
}
