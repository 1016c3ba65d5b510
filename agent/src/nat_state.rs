//! What the agent knows of its own NAT and how far its check has come, in
//! one watch: connects wait on it (a pair's punching method depends on
//! the class), the check writes it.

use punch_protocol::allocator::Allocator;
use punch_protocol::signal::NatClass;
use std::time::Duration;
use tokio::sync::watch;

/// Our NAT as far as the check has read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NatState {
    /// The class (the mapping first, the filtering once tested).
    pub class: Option<NatClass>,
    /// How the NAT picks ports of new mappings (sizes the birthday
    /// method's extra sockets to the NAT's port budget).
    pub alloc: Allocator,
    /// A check runs, or ended with a class (no other one starts then).
    pub started: bool,
    /// The mapping is known (and, behind a counting NAT, the counter
    /// advertised), or a check ended: a connect need not wait longer.
    pub ready: bool,
    /// A check ended, with a class or without.
    pub done: bool,
}

/// The one writer's and many readers' handle.
#[derive(Debug)]
pub(crate) struct NatWatch(watch::Sender<NatState>);

impl NatWatch {
    pub fn new() -> Self {
        NatWatch(watch::channel(NatState::default()).0)
    }

    /// What is known now.
    pub fn get(&self) -> NatState {
        *self.0.borrow()
    }

    /// Our class, once known.
    pub fn class(&self) -> Option<NatClass> {
        self.0.borrow().class
    }

    /// Our NAT's allocator (`Unknown` until read).
    pub fn alloc(&self) -> Allocator {
        self.0.borrow().alloc
    }

    /// Claims the check: true when none runs and none has classified the
    /// NAT (a failed one may be tried again).
    pub fn try_start(&self) -> bool {
        self.0.send_if_modified(|s| {
            let start = !s.started;
            s.started = true;
            start
        })
    }

    /// The check read the class and allocator (maybe the mapping only).
    pub fn set_class(&self, class: NatClass, alloc: Allocator) {
        self.0.send_modify(|s| {
            s.class = Some(class);
            s.alloc = alloc;
        });
    }

    /// Connects waiting for the mapping may go on.
    pub fn set_ready(&self) {
        self.0
            .send_if_modified(|s| !std::mem::replace(&mut s.ready, true));
    }

    /// The check ended; without a class the next registration may try
    /// again.
    pub fn finish(&self) {
        self.0.send_modify(|s| {
            s.done = true;
            if s.class.is_none() {
                s.started = false;
            }
        });
    }

    /// Waits (at most `limit`, or for ever with `None`) until `pred`
    /// holds; true when it does.
    pub async fn wait(&self, pred: impl Fn(&NatState) -> bool, limit: Option<Duration>) -> bool {
        let mut rx = self.0.subscribe();
        let wait = async { rx.wait_for(|s| pred(s)).await.is_ok() };
        match limit {
            Some(d) => tokio::time::timeout(d, wait).await.unwrap_or(false),
            None => wait.await,
        }
    }
}

/// What the agent tells its user of the NAT check.
impl crate::Agent {
    /// Our NAT's class, once the agent has classified it (shortly after
    /// it first registers, when [`crate::AgentConfig::nat_check`] is on).
    pub fn nat_class(&self) -> Option<punch_protocol::signal::NatClass> {
        self.inner.nat.class()
    }

    /// Resolves once the background NAT check has ended (at once when it
    /// is off): [`Agent::nat_class`] and [`Agent::nat_allocator`] then say
    /// all they will.
    pub async fn nat_checked(&self) {
        if !self.inner.config.nat_check {
            return;
        }
        self.inner.nat.wait(|s| s.done, None).await;
    }

    /// How our NAT picks the external ports of new mappings, as the same
    /// check read it (`Unknown` until then).
    pub fn nat_allocator(&self) -> punch_protocol::allocator::Allocator {
        self.inner.nat.alloc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use punch_protocol::signal::NatBehaviour;

    fn class() -> NatClass {
        NatClass {
            public: false,
            mapping: NatBehaviour::EndpointIndependent,
            filtering: NatBehaviour::Unknown,
            port_preserved: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_check_at_a_time_and_a_failed_one_may_run_again() {
        let n = NatWatch::new();
        assert!(n.try_start());
        assert!(!n.try_start(), "a second check while one runs");
        assert!(!n.wait(|s| s.ready, Some(Duration::from_millis(10))).await);
        n.set_ready();
        assert!(n.wait(|s| s.ready, Some(Duration::from_millis(10))).await);
        n.finish();
        assert!(n.get().done && n.class().is_none());
        assert!(
            n.try_start(),
            "without a class, the next registration tries again"
        );
        n.set_class(class(), Allocator::Preserving);
        n.finish();
        assert!(!n.try_start(), "classified: no more checks");
        assert_eq!(n.alloc(), Allocator::Preserving);
        assert!(n.get().ready && n.get().done);
    }
}
