//! Lifecycle events (`/tasks/create`, `/tasks/start`, `/tasks/exit`, ...) forwarded to
//! containerd in order by one publishing thread, so no RPC waits on containerd's event
//! service.

use std::sync::mpsc::{Sender, channel};

use containerd_shim::event::Event;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;
use log::warn;

/// A handle that queues events for the publishing thread.
#[derive(Clone)]
pub struct Events {
    tx: Sender<Box<dyn Event + Send>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl Events {
    /// Starts the publishing thread for containerd namespace `namespace`.
    pub fn start(publisher: RemotePublisher, namespace: String) -> Self {
        let (tx, rx) = channel::<Box<dyn Event + Send>>();
        std::thread::spawn(move || {
            for event in rx {
                let topic = event.topic();
                if let Err(e) = publisher.publish(Context::default(), &topic, &namespace, event) {
                    warn!("cannot publish {topic}: {e}");
                }
            }
        });
        Events { tx }
    }

    /// Queues `event`.
    pub fn publish(&self, event: impl Event + Send + 'static) {
        if self.tx.send(Box::new(event)).is_err() {
            warn!("event publisher is gone; an event was dropped");
        }
    }
}
