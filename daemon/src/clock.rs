//! Wall-clock time and a wall-clock alarm.
//!
//! Token expiry is a wall-clock fact, and tokio's timers run on `CLOCK_MONOTONIC`, which
//! stops while the machine is suspended: a laptop that sleeps through a refresh would wake
//! with an expired token and a timer that still thinks it has minutes to go. [`Alarm`] is a
//! `timerfd` on `CLOCK_REALTIME` with an absolute deadline, so it fires at once after a
//! resume (or a clock jump) that passed the deadline, and does not wake at all before.

use std::os::fd::OwnedFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tokio::io::unix::AsyncFd;

/// Now, on the wall clock.
#[must_use]
pub fn now() -> SystemTime {
    SystemTime::now()
}

/// Unix seconds, rounding down; 0 before 1970.
#[must_use]
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The inverse of [`unix`].
#[must_use]
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A one-shot alarm at a wall-clock deadline, re-armable, with no wake-ups while disarmed.
#[derive(Debug)]
pub struct Alarm {
    /// The timerfd; readable once the deadline has passed or the clock was set.
    fd: AsyncFd<OwnedFd>,
    /// The armed deadline, to skip redundant `timerfd_settime` calls.
    armed: Option<SystemTime>,
}

impl Alarm {
    /// A disarmed alarm. Needs a tokio runtime with I/O enabled.
    pub fn new() -> std::io::Result<Self> {
        let fd = timerfd_create(
            TimerfdClockId::Realtime,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: an `OwnedFd` stays open and keeps its number until the `AsyncFd` that owns
        // it is dropped, which is all `register` asks.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Self { fd, armed: None })
    }

    /// Arms the alarm for `deadline`, or disarms it with `None`.
    pub fn set(&mut self, deadline: Option<SystemTime>) -> std::io::Result<()> {
        if self.armed == deadline {
            return Ok(());
        }
        let value = match deadline {
            // A deadline at or before the epoch would read as "disarm": use 1 ns instead.
            Some(t) => {
                let d = t
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::from_nanos(1))
                    .max(Duration::from_nanos(1));
                Timespec {
                    tv_sec: d.as_secs() as _,
                    tv_nsec: d.subsec_nanos().into(),
                }
            }
            None => Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        timerfd_settime(
            self.fd.get_ref(),
            TimerfdTimerFlags::ABSTIME | TimerfdTimerFlags::CANCEL_ON_SET,
            &spec,
        )?;
        self.armed = deadline;
        Ok(())
    }

    /// Waits until the armed deadline passes. Also returns when the wall clock is set, so the
    /// caller re-checks its deadlines against the new time. Cancel-safe; pends forever while
    /// disarmed.
    pub async fn fired(&mut self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let mut buf = [0u8; 8];
            match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut buf)?)) {
                Ok(Ok(_)) => {
                    self.armed = None;
                    return;
                }
                // ECANCELED: the clock was set. The timer stays armed; let the caller look.
                Ok(Err(e))
                    if e.raw_os_error() == Some(rustix::io::Errno::CANCELED.raw_os_error()) =>
                {
                    self.armed = None;
                    return;
                }
                Ok(Err(_)) | Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_at_a_wall_clock_deadline_and_not_before() {
        let mut alarm = Alarm::new().unwrap();
        let start = std::time::Instant::now();
        alarm.set(Some(now() + Duration::from_millis(150))).unwrap();
        alarm.fired().await;
        assert!(start.elapsed() >= Duration::from_millis(140));
    }

    #[tokio::test]
    async fn a_past_deadline_fires_at_once_and_disarmed_never() {
        let mut alarm = Alarm::new().unwrap();
        alarm.set(Some(from_unix(5))).unwrap();
        tokio::time::timeout(Duration::from_secs(5), alarm.fired())
            .await
            .unwrap();
        alarm.set(None).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(100), alarm.fired()).await;
        assert!(waited.is_err());
    }
}
