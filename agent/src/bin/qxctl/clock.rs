//! Times as qxctl prints them: the local time of day to the millisecond, `03:17:15.885`.

use std::sync::OnceLock;

use time::{OffsetDateTime, UtcOffset};

static LOCAL_OFFSET: OnceLock<UtcOffset> = OnceLock::new();

/// Reads the local UTC offset (from `TZ` or `/etc/localtime`) while qxctl has one thread: the `time` crate refuses
/// to read it once there are more, as that could race with a `setenv`. UTC when it cannot be read.
pub fn read_local_offset() {
    LOCAL_OFFSET.get_or_init(|| UtcOffset::current_local_offset().unwrap_or(UtcOffset::UTC));
}

/// `HH:MM:SS.mmm` of `unix_ms` in local time (UTC when the offset was never read).
pub fn time_of_day(unix_ms: i64) -> String {
    let offset = LOCAL_OFFSET.get().copied().unwrap_or(UtcOffset::UTC);
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .to_offset(offset);
    format!("{:02}:{:02}:{:02}.{:03}", at.hour(), at.minute(), at.second(), at.millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_day_to_the_millisecond() {
        // Nothing read the offset in this test process: UTC.
        assert_eq!(time_of_day(1_764_645_435_885), "03:17:15.885");
        assert_eq!(time_of_day(0), "00:00:00.000");
        // Out of range falls back to the epoch rather than failing.
        assert_eq!(time_of_day(i64::MAX), "00:00:00.000");
    }
}
