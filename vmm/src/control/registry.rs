//! The VMs the control API can reach: each running VM's owner registers its channel under the
//! VM's name while the VM runs; an on-demand VM that sleeps (no VM between clients) registers
//! a stand-in that answers for it, so it stays visible.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::control::request::{ControlReply, ControlRequest, OwnerEvent, Replier};

/// Answers requests about a sleeping VM on the API's thread (it must not block).
pub(crate) type StandIn = Arc<dyn Fn(ControlRequest) -> ControlReply + Send + Sync>;

enum Target {
    Owner(Sender<OwnerEvent>),
    Sleeping(StandIn),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Owner(_) => "Owner",
            Target::Sleeping(_) => "Sleeping",
        })
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    name: String,
    target: Target,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    entries: Vec<Entry>,
}

/// The running VMs by name.
#[derive(Debug, Clone, Default)]
pub(crate) struct Registry(Arc<Mutex<Inner>>);

/// A VM's place in the [`Registry`], removed when dropped.
#[derive(Debug)]
pub(crate) struct Registered {
    registry: Registry,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().entries.retain(|e| e.id != self.id);
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers VM `name`, whose owner listens on `owner`.
    pub(crate) fn register(&self, name: &str, owner: Sender<OwnerEvent>) -> Registered {
        self.add(name, Target::Owner(owner))
    }

    /// Registers sleeping VM `name`, for which `stand_in` answers.
    pub(crate) fn register_sleeping(&self, name: &str, stand_in: StandIn) -> Registered {
        self.add(name, Target::Sleeping(stand_in))
    }

    fn add(&self, name: &str, target: Target) -> Registered {
        let mut inner = self.lock();
        inner.next += 1;
        let id = inner.next;
        inner.entries.push(Entry { id, name: name.to_string(), target });
        Registered { registry: self.clone(), id }
    }

    /// The names of the VMs running now, in the order they started.
    pub(crate) fn names(&self) -> Vec<String> {
        self.lock().entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Sends `request` to VM `name`'s owner; `Err` gives the replier back when no VM of that
    /// name runs.
    pub(crate) fn send(&self, name: &str, request: ControlRequest, replier: Replier) -> Result<(), Replier> {
        let target = self.lock().entries.iter().find(|e| e.name == name).map(|e| match &e.target {
            Target::Owner(o) => Target::Owner(o.clone()),
            Target::Sleeping(f) => Target::Sleeping(Arc::clone(f)),
        });
        match target {
            Some(Target::Owner(o)) => o.send(OwnerEvent::Control(request, replier)).map_err(|e| match e.0 {
                OwnerEvent::Control(_, r) => r,
                // Only control events are sent here.
                _ => Replier::new(name, |_| {}),
            }),
            Some(Target::Sleeping(stand_in)) => {
                replier.reply(stand_in(request));
                Ok(())
            }
            None => Err(replier),
        }
    }
}
