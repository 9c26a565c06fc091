//! When to refresh and how long to back off: pure functions of the clock and a jitter value
//! in `[0, 1)`, so they are tested without waiting.

use std::time::{Duration, SystemTime};

/// The first backoff step; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Backoff never waits longer than this (unless Spotify's `Retry-After` says so).
pub const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// A `Retry-After` longer than this is treated as this, so a bogus header cannot park the
/// daemon for days.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(6 * 3600);
/// Spotify refresh tokens die this long after the login.
pub const LOGIN_LIFETIME: Duration = Duration::from_secs(182 * 86_400);
/// The login-end warning starts this long before.
pub const LOGIN_WARNING: Duration = Duration::from_secs(14 * 86_400);
/// A proactive refresh never comes sooner than this after the token was issued, whatever
/// the lifetime: the floor that keeps a tiny `expires_in` from becoming a refresh storm.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// When to refresh a token issued at `issued_at` that expires at `expires_at`: `margin`
/// before expiry, the margin clamped to half the lifetime, minus up to a tenth of the margin
/// of jitter so many machines do not refresh in lockstep.
#[must_use]
pub fn refresh_at(
    issued_at: SystemTime,
    expires_at: SystemTime,
    margin: Duration,
    jitter: f64,
) -> SystemTime {
    let lifetime = expires_at
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO);
    let margin = margin.min(lifetime / 2);
    let jitter = margin.mul_f64(jitter.clamp(0.0, 1.0) / 10.0);
    let at = expires_at - margin - jitter;
    at.max(issued_at + MIN_REFRESH_INTERVAL)
}

/// How long to wait after the `failures`-th consecutive transient failure (1 = the first):
/// exponential with "equal jitter" (half fixed, half random), capped, and never shorter than
/// the server's `Retry-After`.
#[must_use]
pub fn backoff(failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1 << failures.saturating_sub(1).min(20))
        .min(BACKOFF_MAX);
    let wait = exp / 2 + (exp / 2).mul_f64(jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => wait.max(ra.min(RETRY_AFTER_MAX)),
        None => wait,
    }
}

/// Whether a token is good enough for a caller that needs it valid for `min_valid` more.
#[must_use]
pub fn fresh_enough(expires_at: SystemTime, now: SystemTime, min_valid: Duration) -> bool {
    expires_at
        .duration_since(now)
        .is_ok_and(|left| left >= min_valid)
}

/// Whether the login-end warning is due.
#[must_use]
pub fn login_ending(login_expires_at: SystemTime, now: SystemTime) -> bool {
    login_expires_at
        .duration_since(now)
        .map_or(true, |left| left <= LOGIN_WARNING)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_800_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    #[test]
    fn refresh_margin_before_expiry() {
        let r = refresh_at(at(0), at(3600), Duration::from_secs(300), 0.0);
        assert_eq!(r, at(3300));
    }

    #[test]
    fn jitter_only_makes_it_earlier_by_at_most_a_tenth() {
        let r = refresh_at(at(0), at(3600), Duration::from_secs(300), 0.999);
        assert!(r < at(3300) && r >= at(3270), "{r:?}");
    }

    #[test]
    fn margin_is_clamped_to_half_the_lifetime() {
        let r = refresh_at(at(0), at(4), Duration::from_secs(300), 0.0);
        assert_eq!(r, at(2));
        let r = refresh_at(at(0), at(4), Duration::from_secs(2), 0.0);
        assert_eq!(r, at(2));
    }

    #[test]
    fn no_storm_for_tiny_or_expired_lifetimes() {
        // expires_in 0 or a token issued already expired: still at least a second apart.
        assert_eq!(
            refresh_at(at(0), at(0), Duration::from_secs(300), 0.5),
            at(1)
        );
        assert_eq!(
            refresh_at(at(10), at(5), Duration::from_secs(300), 0.5),
            at(11)
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        assert_eq!(backoff(1, None, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(1, None, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, None, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(3, None, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(30, None, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, None, 0.0), BACKOFF_MAX / 2);
    }

    #[test]
    fn retry_after_is_a_floor_and_capped() {
        let ra = Some(Duration::from_secs(3));
        assert_eq!(backoff(1, ra, 0.0), Duration::from_secs(3));
        assert_eq!(backoff(8, ra, 1.0), Duration::from_secs(128));
        let huge = Some(Duration::from_secs(10 * 86_400));
        assert_eq!(backoff(1, huge, 0.0), RETRY_AFTER_MAX);
    }

    #[test]
    fn freshness_and_login_warning() {
        assert!(fresh_enough(at(100), at(40), Duration::from_secs(60)));
        assert!(!fresh_enough(at(100), at(41), Duration::from_secs(60)));
        assert!(!fresh_enough(at(100), at(200), Duration::ZERO));
        let end = at(0) + LOGIN_LIFETIME;
        assert!(!login_ending(end, at(0)));
        assert!(login_ending(end, end - LOGIN_WARNING));
        assert!(login_ending(end, end + Duration::from_secs(1)));
    }
}
