//! Why a participant wakes: a named table of deadlines (after quinn's
//! `TimerTable`), so the core serves the timer that fired instead of working
//! out from the participant's state why it was woken.

use std::time::Instant;

/// One reason a participant wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// No datagram was accepted from it for the disconnect grace: it is
    /// removed (`ice_timeout`). Pushed back by every datagram it sends.
    Silence,
    /// ICE has been disconnected for the disconnect grace: it is removed
    /// (`ice_timeout`). Armed when str0m reports the disconnection, cleared
    /// when ICE connects again.
    IceDisconnected,
    /// Its `Rtc`'s own deadline: retransmits, RTCP, ICE keep-alives, and RTP
    /// written since it was last driven.
    Rtc,
}

impl Timer {
    /// Served in this order when several are due at once: a participant
    /// past its grace is removed without driving its `Rtc` first.
    const ALL: [Timer; 3] = [Timer::Silence, Timer::IceDisconnected, Timer::Rtc];
}

/// A participant's deadlines, one per [`Timer`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Timers([Option<Instant>; Timer::ALL.len()]);

impl Timers {
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.0[timer as usize] = Some(at);
    }

    pub(crate) fn clear(&mut self, timer: Timer) {
        self.0[timer as usize] = None;
    }

    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.0[timer as usize]
    }

    /// The soonest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }

    /// The first timer due at `now`, in [`Timer::ALL`] order; it is cleared.
    pub(crate) fn expire(&mut self, now: Instant) -> Option<Timer> {
        let timer = Timer::ALL.into_iter().find(|t| self.get(*t).is_some_and(|at| at <= now))?;
        self.clear(timer);
        Some(timer)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn due_timers_expire_removal_first_and_only_once() {
        let now = Instant::now();
        let mut timers = Timers::default();
        assert_eq!((timers.next(), timers.expire(now)), (None, None));
        timers.set(Timer::Rtc, now);
        timers.set(Timer::Silence, now + Duration::from_secs(5));
        assert_eq!(timers.next(), Some(now));
        timers.set(Timer::IceDisconnected, now);
        assert_eq!(timers.expire(now), Some(Timer::IceDisconnected));
        assert_eq!(timers.expire(now), Some(Timer::Rtc));
        assert_eq!(timers.expire(now), None, "the silence is not due yet");
        assert_eq!(timers.next(), Some(now + Duration::from_secs(5)));
    }
}
