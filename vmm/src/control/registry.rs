//! The VMs the control API can reach: each running VM's owner registers its channel under the
//! VM's name while the VM runs.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::control::request::{ControlRequest, OwnerEvent, Replier};

#[derive(Debug)]
struct Entry {
    id: u64,
    name: String,
    owner: Sender<OwnerEvent>,
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
        let mut inner = self.lock();
        inner.next += 1;
        let id = inner.next;
        inner.entries.push(Entry { id, name: name.to_string(), owner });
        Registered { registry: self.clone(), id }
    }

    /// The names of the VMs running now, in the order they started.
    pub(crate) fn names(&self) -> Vec<String> {
        self.lock().entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Sends `request` to VM `name`'s owner; `Err` gives the replier back when no VM of that
    /// name runs.
    pub(crate) fn send(&self, name: &str, request: ControlRequest, replier: Replier) -> Result<(), Replier> {
        let owner = self.lock().entries.iter().find(|e| e.name == name).map(|e| e.owner.clone());
        match owner {
            Some(o) => o.send(OwnerEvent::Control(request, replier)).map_err(|e| match e.0 {
                OwnerEvent::Control(_, r) => r,
                // Only control events are sent here.
                _ => Replier::new(name, |_| {}),
            }),
            None => Err(replier),
        }
    }
}
