//! Named deadlines for a sans-IO core: set and clear them by name, ask for
//! the earliest, take the due ones in order. A wake costs the timers that
//! are due, not a scan of every device.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::time::Instant;

/// Deadlines by name (`T`: an enum of reasons).
#[derive(Debug)]
pub struct Timers<T> {
    /// The one deadline in force per timer.
    deadlines: HashMap<T, Instant>,
    /// Every deadline set, earliest first; entries a later `set` or `clear`
    /// replaced are skipped when they come up.
    queue: BinaryHeap<Reverse<(Instant, T)>>,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Timers { deadlines: HashMap::new(), queue: BinaryHeap::new() }
    }
}

impl<T: Copy + Eq + Hash + Ord> Timers<T> {
    /// Arms `timer` for `at`, replacing its deadline.
    pub fn set(&mut self, timer: T, at: Instant) {
        if self.deadlines.insert(timer, at) != Some(at) {
            self.queue.push(Reverse((at, timer)));
        }
    }

    /// Disarms `timer`.
    pub fn clear(&mut self, timer: T) {
        self.deadlines.remove(&timer);
    }

    /// When `timer` fires, if armed.
    pub fn get(&self, timer: T) -> Option<Instant> {
        self.deadlines.get(&timer).copied()
    }

    /// Whether `timer` is armed.
    pub fn is_set(&self, timer: T) -> bool {
        self.deadlines.contains_key(&timer)
    }

    /// The earliest armed deadline.
    pub fn earliest(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, timer))) = self.queue.peek() {
            if self.deadlines.get(&timer) == Some(&at) {
                return Some(at);
            }
            self.queue.pop();
        }
        None
    }

    /// A timer due at `now` (disarmed as it is returned), earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        while let Some(&Reverse((at, timer))) = self.queue.peek() {
            if at > now {
                return None;
            }
            self.queue.pop();
            if self.deadlines.get(&timer) == Some(&at) {
                self.deadlines.remove(&timer);
                return Some(timer);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn due_timers_come_in_order_and_replaced_ones_never() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut timers = Timers::default();
        timers.set('a', at(30));
        timers.set('b', at(10));
        timers.set('c', at(20));
        timers.set('b', at(40));
        timers.clear('c');
        timers.set('d', at(5));
        timers.set('d', at(5));
        assert_eq!(timers.earliest(), Some(at(5)));
        assert_eq!(timers.pop_due(at(4)), None, "nothing due yet");
        assert_eq!(timers.pop_due(at(35)), Some('d'));
        assert_eq!(timers.pop_due(at(35)), Some('a'), "b moved, c cleared");
        assert_eq!(timers.pop_due(at(35)), None);
        assert!(timers.is_set('b') && !timers.is_set('a'));
        assert_eq!(timers.get('b'), Some(at(40)));
        assert_eq!(timers.earliest(), Some(at(40)));
        assert_eq!(timers.pop_due(at(40)), Some('b'));
        assert_eq!(timers.earliest(), None);
    }
}
