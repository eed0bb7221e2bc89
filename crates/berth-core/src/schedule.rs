//! `config.schedule`: when a scheduled Machine is due to start. Periods count from the
//! Machine's creation; a monthly one keeps its day of the month (the last day of a shorter
//! month).

use berth_api::Schedule;

/// The `k`-th start after `created_ms` (ms since the epoch), `k` ≥ 1.
pub fn nth_start_ms(schedule: Schedule, created_ms: i64, k: i64) -> i64 {
    const HOUR_MS: i64 = 3_600_000;
    let fixed = match schedule {
        Schedule::Hourly => HOUR_MS,
        Schedule::Daily => 24 * HOUR_MS,
        Schedule::Weekly => 7 * 24 * HOUR_MS,
        Schedule::Monthly => return add_months(created_ms, k),
    };
    created_ms.saturating_add(fixed.saturating_mul(k))
}

/// The latest start due at or before `now_ms`, if any is.
pub fn last_due_ms(schedule: Schedule, created_ms: i64, now_ms: i64) -> Option<i64> {
    if now_ms < nth_start_ms(schedule, created_ms, 1) {
        return None;
    }
    // A first guess from the shortest period each kind can have, then forward.
    let shortest: i64 = match schedule {
        Schedule::Hourly => 3_600_000,
        Schedule::Daily => 86_400_000,
        Schedule::Weekly => 604_800_000,
        Schedule::Monthly => 28 * 86_400_000,
    };
    let mut k = ((now_ms - created_ms) / shortest).max(1);
    while k > 1 && nth_start_ms(schedule, created_ms, k) > now_ms {
        k -= 1;
    }
    while nth_start_ms(schedule, created_ms, k + 1) <= now_ms {
        k += 1;
    }
    Some(nth_start_ms(schedule, created_ms, k))
}

fn add_months(at_ms: i64, months: i64) -> i64 {
    let Ok(at) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
    else {
        return i64::MAX;
    };
    let index = i64::from(at.year()) * 12 + i64::from(u8::from(at.month())) - 1 + months;
    let (Ok(year), Ok(month_number)) = (
        i32::try_from(index.div_euclid(12)),
        u8::try_from(index.rem_euclid(12) + 1),
    ) else {
        return i64::MAX;
    };
    let Ok(month) = time::Month::try_from(month_number) else {
        return i64::MAX;
    };
    let day = at.day().min(month.length(year));
    time::Date::from_calendar_date(year, month, day)
        .map(|date| at.replace_date(date))
        .ok()
        .and_then(|moment| i64::try_from(moment.unix_timestamp_nanos() / 1_000_000).ok())
        .unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_count_periods_from_creation() {
        let created = 1_700_000_000_000; // 2023-11-14T22:13:20Z
        let hour = 3_600_000;
        assert_eq!(
            last_due_ms(Schedule::Hourly, created, created + hour - 1),
            None
        );
        assert_eq!(
            last_due_ms(Schedule::Hourly, created, created + hour),
            Some(created + hour)
        );
        assert_eq!(
            last_due_ms(Schedule::Daily, created, created + 50 * hour),
            Some(created + 48 * hour)
        );
        assert_eq!(
            last_due_ms(Schedule::Weekly, created, created + 15 * 24 * hour),
            Some(created + 14 * 24 * hour)
        );
        // Jan 31 → Feb 29 (2024 is a leap year) → Mar 31.
        let jan31 = 1_706_659_200_000; // 2024-01-31T00:00:00Z
        let feb29 = 1_709_164_800_000;
        let mar31 = 1_711_843_200_000;
        assert_eq!(nth_start_ms(Schedule::Monthly, jan31, 1), feb29);
        assert_eq!(nth_start_ms(Schedule::Monthly, jan31, 2), mar31);
        assert_eq!(
            last_due_ms(Schedule::Monthly, jan31, mar31 + 5),
            Some(mar31)
        );
        assert_eq!(last_due_ms(Schedule::Monthly, jan31, feb29 - 1), None);
        let parsed: berth_api::MachineConfig =
            serde_json::from_str(r#"{"image":"x","schedule":"daily"}"#).expect("parses");
        assert_eq!(parsed.schedule, Some(Schedule::Daily));
        assert!(serde_json::from_str::<berth_api::MachineConfig>(
            r#"{"image":"x","schedule":"yearly"}"#
        )
        .is_err());
    }
}
