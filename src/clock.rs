//! Calendar arithmetic for timestamps shown to people: RFC 3339 in UTC, and days in a fixed
//! offset (KST is UTC+9 with no daylight saving). No time-zone database needed.

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01; the inverse of [`civil_from_days`].
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if month > 2 { month - 3 } else { month + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// KST, the accounting zone of the usage ledger: UTC+9 all year.
pub const KST_OFFSET_MS: u64 = 9 * 3_600_000;
const DAY_MS: u64 = 86_400_000;

/// The KST day (`YYYY-MM-DD`) that `unix_ms` falls on.
pub fn kst_day(unix_ms: u64) -> String {
    let days = ((unix_ms + KST_OFFSET_MS) / DAY_MS) as i64;
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The next KST midnight after `unix_ms` (ms since the epoch).
pub fn next_kst_midnight(unix_ms: u64) -> u64 {
    ((unix_ms + KST_OFFSET_MS) / DAY_MS + 1) * DAY_MS - KST_OFFSET_MS
}

/// The UTC span `[start, end)` in ms of the KST day `YYYY-MM-DD`; None unless it is a real
/// calendar date from 1970 on.
pub fn kst_day_span(day: &str) -> Option<(u64, u64)> {
    let b = day.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let number = |r: std::ops::Range<usize>| -> Option<u32> {
        let text = day.get(r)?;
        text.bytes().all(|c| c.is_ascii_digit()).then(|| text.parse().ok())?
    };
    let (year, month, dom) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let days = days_from_civil(i64::from(year), month, dom);
    if civil_from_days(days) != (i64::from(year), month, dom) || days < 0 {
        return None;
    }
    let start = (days as u64 * DAY_MS).checked_sub(KST_OFFSET_MS)?;
    Some((start, start + DAY_MS))
}

/// Milliseconds since the Unix epoch as `2026-11-21T13:05:09.123Z`.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let seconds = (unix_ms / 1_000) as i64;
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let second_of_day = seconds.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3_600,
        second_of_day % 3_600 / 60,
        second_of_day % 60,
        unix_ms % 1_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_309_375_123), "2026-11-22T01:02:55.123Z");
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn civil_days_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn kst_days_start_at_15_utc() {
        // 2026-11-22T14:59:59.999Z is 23:59:59.999 KST on the 22nd; one ms later it is the 23rd.
        let before = 1_795_359_599_999;
        assert_eq!(rfc3339_ms(before), "2026-11-22T14:59:59.999Z");
        assert_eq!(kst_day(before), "2026-11-22");
        assert_eq!(kst_day(before + 1), "2026-11-23");
        assert_eq!(next_kst_midnight(before), before + 1);
        assert_eq!(next_kst_midnight(before + 1), before + 1 + 86_400_000);
        assert_eq!(kst_day_span("2026-11-23"), Some((before + 1, before + 1 + 86_400_000)));
        assert_eq!(kst_day_span("2024-02-29").map(|(s, e)| e - s), Some(86_400_000));
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "2026-1-01",
            "20261122",
            "2026-11-2x",
            "",
            "1969-12-31",
        ] {
            assert_eq!(kst_day_span(bad), None, "{bad}");
        }
    }
}
