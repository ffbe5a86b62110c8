//! Per-connection protocol state and the [`Conn::feed`] loop step.

use alloc::vec::Vec;

use super::body::Body;
use super::request::{self, Framing, Head, Parsed, Persist, Reject};
use super::response::{self, CONTINUE, JSON, Reply, Response, TEXT};
use super::routes::{ALLOW, Figures, GREETING, Route};
use super::work::WorkOrder;

/// What the caller is to do next on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the reply (then close if it says so).
    Reply(Reply),
    /// Do the work, then send [`WorkOrder::reply`] (then close if the order says so), before
    /// feeding the connection again.
    Work(WorkOrder),
    /// Wait for more bytes.
    NeedMore,
    /// The connection is finished (a closing reply was already given); close it.
    Close,
}

/// The answer owed once the current request's body has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    route: Route,
    head_only: bool,
    persist: Persist,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a request head.
    Head,
    /// Discarding a request body; `pending` is answered when it ends.
    Body { body: Body, pending: Pending },
    /// A closing reply was given.
    Closed,
}

/// One connection's parser state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    state: State,
}

impl Default for Conn {
    fn default() -> Self {
        Self::new()
    }
}

impl Conn {
    /// A fresh connection, waiting for its first request.
    pub fn new() -> Self {
        Conn { state: State::Head }
    }

    #[cfg_attr(not(test), allow(dead_code))] // part of the core's API; the tests use it
    /// The connection is finished: every further [`feed`](Self::feed) answers
    /// [`Action::Close`].
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Takes the bytes received and not yet consumed (`input`, oldest first) and returns how
    /// many of them were consumed (`<= input.len()`) and what to do next. The caller drops the
    /// consumed bytes, acts, and calls again while the action is not [`Action::NeedMore`] or
    /// a close. `figures` is called only to answer `GET /stats`.
    pub fn feed(&mut self, input: &[u8], figures: &dyn Fn() -> Figures) -> (usize, Action) {
        let mut used = 0;
        loop {
            match self.state {
                State::Closed => return (used, Action::Close),
                State::Head => {
                    let (len, head) = match request::parse(&input[used..]) {
                        Parsed::Partial => return (used, Action::NeedMore),
                        Parsed::Rejected(reject) => return (used, self.reject(reject)),
                        Parsed::Done { len, head } => (len, head),
                    };
                    used += len;
                    let Head { route, head_only, persist, framing, expect_continue } = head;
                    let pending = Pending { route, head_only, persist };
                    let body = match framing {
                        Framing::Length(0) => return (used, self.answer(pending, figures)),
                        Framing::Length(n) => Body::Length(n),
                        Framing::Chunked => Body::ChunkSize { total: 0 },
                    };
                    self.state = State::Body { body, pending };
                    if expect_continue {
                        let interim = Reply { bytes: CONTINUE.to_vec(), status: 100, close: false };
                        return (used, Action::Reply(interim));
                    }
                }
                State::Body { mut body, pending } => match body.advance(&input[used..]) {
                    Err(reject) => return (used, self.reject(reject)),
                    Ok(step) => {
                        used += step.used;
                        if step.done {
                            return (used, self.answer(pending, figures));
                        }
                        self.state = State::Body { body, pending };
                        return (used, Action::NeedMore);
                    }
                },
            }
        }
    }

    /// The error reply for `reject`; the connection closes after it.
    fn reject(&mut self, reject: Reject) -> Action {
        self.state = State::Closed;
        let mut body = Vec::with_capacity(64);
        let status = reject.status();
        body.extend_from_slice(response::reason(status).as_bytes());
        body.extend_from_slice(b": ");
        body.extend_from_slice(reject.detail().as_bytes());
        body.push(b'\n');
        let response = Response {
            status,
            content_type: TEXT,
            body: &body,
            head_only: false,
            persist: Persist::Close,
            allow: None,
        };
        Action::Reply(Reply { bytes: response.to_bytes(), status, close: true })
    }

    /// The answer to a fully read request.
    fn answer(&mut self, pending: Pending, figures: &dyn Fn() -> Figures) -> Action {
        let Pending { route, head_only, persist } = pending;
        self.state = if persist == Persist::Close { State::Closed } else { State::Head };
        let close = persist == Persist::Close;
        let reply = |status: u16, content_type: &'static str, body: &[u8], allow: Option<&'static str>| {
            let response = Response { status, content_type, body, head_only, persist, allow };
            Action::Reply(Reply { bytes: response.to_bytes(), status, close })
        };
        match route {
            Route::Root => reply(200, TEXT, GREETING.as_bytes(), None),
            Route::Work { ms, kb } => Action::Work(WorkOrder::new(ms, kb, head_only, persist)),
            Route::BadWork(why) => {
                let mut body = Vec::with_capacity(why.len() + 16);
                body.extend_from_slice(b"Bad Request: ");
                body.extend_from_slice(why.as_bytes());
                body.push(b'\n');
                reply(400, TEXT, &body, None)
            }
            Route::Stats => reply(200, JSON, figures().to_json().as_bytes(), None),
            Route::NotFound => reply(404, TEXT, b"Not Found\n", None),
            Route::NotAllowed => reply(405, TEXT, b"Method Not Allowed\n", Some(ALLOW)),
        }
    }
}
