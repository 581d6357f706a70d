//! Scale-in protection, debounced: protected as soon as a job runs,
//! unprotected only after the agent has been idle for the debounce period,
//! so short gaps between jobs cost no API calls. At most one call per
//! transition (plus bounded retries of a failed one).

use std::time::Duration;

use tokio::time::Instant;

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Call SetInstanceProtection with this value.
    Set(bool),
    /// Nothing until this moment (or until busy/idle changes).
    WaitUntil(Instant),
    /// Nothing until busy/idle changes.
    Wait,
}

/// The debounce state machine. Starts unprotected: instances launch without
/// protection unless the group says otherwise, and an idle agent never needs
/// it (its own TerminateInstanceInAutoScalingGroup ignores protection).
#[derive(Debug)]
pub struct Debounce {
    protected: bool,
    idle_since: Option<Instant>,
    retry_at: Option<Instant>,
    debounce: Duration,
}

impl Debounce {
    pub fn new(debounce: Duration) -> Debounce {
        Debounce {
            protected: false,
            idle_since: None,
            retry_at: None,
            debounce,
        }
    }

    pub fn protected(&self) -> bool {
        self.protected
    }

    /// The next step given whether jobs run now.
    pub fn next(&mut self, busy: bool, now: Instant) -> Step {
        if busy {
            self.idle_since = None;
        } else if self.idle_since.is_none() {
            self.idle_since = Some(now);
        }
        let wanted = match self.idle_since {
            None => true,
            Some(since) if self.protected && now < since + self.debounce => {
                return Step::WaitUntil(since + self.debounce);
            }
            Some(_) => false,
        };
        if wanted == self.protected {
            return Step::Wait;
        }
        match self.retry_at {
            Some(at) if now < at => Step::WaitUntil(at),
            _ => Step::Set(wanted),
        }
    }

    /// The call for `protected` succeeded.
    pub fn applied(&mut self, protected: bool) {
        self.protected = protected;
        self.retry_at = None;
    }

    /// The call failed (after its own retries): try again at `at`.
    pub fn failed(&mut self, at: Instant) {
        self.retry_at = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(30);

    #[test]
    fn busy_protects_at_once_and_idle_unprotects_after_the_debounce() {
        let t0 = Instant::now();
        let mut d = Debounce::new(D);
        assert_eq!(d.next(false, t0), Step::Wait, "idle at start: no call");
        assert_eq!(d.next(true, t0), Step::Set(true));
        d.applied(true);
        assert_eq!(d.next(true, t0), Step::Wait);
        let idle = t0 + Duration::from_secs(5);
        assert_eq!(d.next(false, idle), Step::WaitUntil(idle + D));
        assert_eq!(
            d.next(false, idle + Duration::from_secs(10)),
            Step::WaitUntil(idle + D)
        );
        assert_eq!(d.next(false, idle + D), Step::Set(false));
        d.applied(false);
        assert_eq!(d.next(false, idle + D * 2), Step::Wait);
    }

    #[test]
    fn a_short_gap_between_jobs_costs_no_call() {
        let t0 = Instant::now();
        let mut d = Debounce::new(D);
        assert_eq!(d.next(true, t0), Step::Set(true));
        d.applied(true);
        let gap = t0 + Duration::from_secs(1);
        assert!(matches!(d.next(false, gap), Step::WaitUntil(_)));
        assert_eq!(d.next(true, gap + Duration::from_secs(2)), Step::Wait);
        // The idle clock restarts with the next gap.
        let gap2 = gap + Duration::from_secs(40);
        assert_eq!(d.next(false, gap2), Step::WaitUntil(gap2 + D));
        assert!(d.protected());
    }

    #[test]
    fn a_failed_call_is_retried_later_not_in_a_loop() {
        let t0 = Instant::now();
        let mut d = Debounce::new(D);
        assert_eq!(d.next(true, t0), Step::Set(true));
        d.failed(t0 + Duration::from_secs(5));
        assert_eq!(
            d.next(true, t0 + Duration::from_secs(1)),
            Step::WaitUntil(t0 + Duration::from_secs(5))
        );
        assert_eq!(d.next(true, t0 + Duration::from_secs(5)), Step::Set(true));
        d.applied(true);
        assert_eq!(d.next(true, t0 + Duration::from_secs(6)), Step::Wait);
    }
}
