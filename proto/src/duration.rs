//! Durations as people write them: `"90s"`, `"5m"`, `"1h"`, `"1h30m"`, `"250ms"`, or bare seconds.

use std::time::Duration;

/// Parses a duration such as `90s`, `5m`, `1h30m`, `250ms`, or `45` (seconds).
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration: write e.g. \"90s\", \"5m\" or \"1h\"".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let (number, unit) = (&rest[..digits], &rest[digits..digits + unit_len]);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("bad duration {text:?}: write e.g. \"90s\", \"5m\" or \"1h\""))?;
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => {
                return Err(format!(
                    "bad duration {text:?}: unit {unit:?} is not one of ms, s, m, h, d"
                ))
            }
        };
        total = total.saturating_add(part);
        rest = &rest[digits + unit_len..];
    }
    Ok(total)
}

/// Formats a duration compactly for people (`1h2m`, `45s`), the inverse of [`parse`] for
/// whole seconds.
#[must_use]
pub fn format(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
    match (h, m, sec) {
        (0, 0, _) => format!("{sec}s"),
        (0, _, 0) => format!("{m}m"),
        (0, _, _) => format!("{m}m{sec}s"),
        (_, 0, 0) => format!("{h}h"),
        (_, _, 0) => format!("{h}h{m}m"),
        _ => format!("{h}h{m}m{sec}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse(" 45 "), Ok(Duration::from_secs(45)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn refuses_nonsense_with_a_hint() {
        for bad in ["", "m", "5x", "-1s", "1.5h", "s5"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("duration"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in [0, 5, 60, 61, 3600, 3660, 3661, 86_400] {
            let d = Duration::from_secs(s);
            assert_eq!(parse(&format(d)), Ok(d), "{s}");
        }
    }
}
