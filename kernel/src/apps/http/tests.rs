//! Unit tests of the protocol core: routes, persistence, pipelining, split input, errors,
//! and a deterministic fuzz loop.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::*;

fn figures() -> Figures {
    Figures {
        vcpus_online: 3,
        vcpus_peak: 3,
        vcpus_min: 1,
        vcpus_max: 4,
        vcpus_burst: 8,
        memory_held: 64 << 20,
        heap_used: 12345,
        connections_open: 2,
        connections_total: 17,
        requests_total: 99,
        requests_by_class: [1, 90, 0, 7, 1],
    }
}

/// A caller: buffers the chunks as they "arrive", feeds after each, does work orders with a
/// clock that makes one unit take longer than any order, and stops at a close.
fn drive(conn: &mut Conn, chunks: &[&[u8]]) -> Vec<Reply> {
    let mut buf: Vec<u8> = Vec::new();
    let mut replies = Vec::new();
    let mut clock = 0u64;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let (used, action) = conn.feed(&buf, &figures);
            assert!(used <= buf.len(), "consumed {used} of {}", buf.len());
            buf.drain(..used);
            let reply = match action {
                Action::Reply(r) => r,
                Action::Work(order) => {
                    let done = order.perform(&mut || {
                        clock += 20_000_000;
                        clock
                    });
                    assert_eq!(done.units, 1);
                    order.reply(&done)
                }
                Action::NeedMore => {
                    assert!(buf.len() < MAX_HEAD, "NeedMore with {} bytes buffered", buf.len());
                    break;
                }
                Action::Close => return replies,
            };
            let close = reply.close;
            replies.push(reply);
            if close {
                return replies;
            }
        }
    }
    replies
}

fn one(request: &[u8]) -> Reply {
    let replies = drive(&mut Conn::new(), &[request]);
    assert_eq!(replies.len(), 1, "{replies:?}");
    replies.into_iter().next().unwrap_or_else(|| unreachable!())
}

fn text(reply: &Reply) -> String {
    String::from_utf8(reply.bytes.clone()).expect("replies are UTF-8")
}

/// The head and the body of a reply.
fn split(reply: &Reply) -> (String, String) {
    let t = text(reply);
    let (head, body) = t.split_once("\r\n\r\n").expect("a blank line ends the head");
    (String::from(head), String::from(body))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(": ")?;
        n.eq_ignore_ascii_case(name).then_some(v)
    })
}

#[test]
fn get_root_is_200_with_the_greeting_and_the_fixed_headers() {
    let reply = one(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        text(&reply),
        "HTTP/1.1 200 OK\r\nServer: elastic-unikernel\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: 34\r\n\r\nHello from the elastic unikernel!\n"
    );
    assert_eq!((reply.status, reply.close, reply.is_final()), (200, false, true));
}

#[test]
fn head_has_the_get_headers_without_the_body() {
    for path in ["/", "/stats", "/work?ms=3", "/nope"] {
        let get = one(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let head = one(format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let (get_head, get_body) = split(&get);
        let (head_head, head_body) = split(&head);
        assert_eq!(get_head, head_head, "{path}");
        assert!(!get_body.is_empty() && head_body.is_empty(), "{path}");
        assert_eq!(header(&head_head, "content-length"), Some(format!("{}", get_body.len()).as_str()));
    }
}

#[test]
fn work_gives_an_order_whose_reply_proves_the_work() {
    let mut conn = Conn::new();
    let request = b"GET /work?ms=25 HTTP/1.1\r\nHost: x\r\n\r\n";
    let (used, action) = conn.feed(request, &figures);
    assert_eq!(used, request.len());
    let Action::Work(order) = action else { panic!("{action:?}") };
    assert_eq!((order.ms, order.close), (25, false));
    // A clock that advances 1 ms per reading: 25 units.
    let mut t = 0;
    let done = order.perform(&mut || {
        t += 1000;
        t
    });
    assert_eq!(done.units, 25);
    assert_eq!(done.elapsed_us, 25_000);
    assert_eq!(done.checksum, work_units(order.seed, 25));
    let (head, body) = split(&order.reply(&done));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "content-type"), Some("application/json"));
    assert_eq!(
        body,
        format!(
            "{{\"ms\":25,\"units\":25,\"elapsed_us\":25000,\"seed\":\"{:#018x}\",\"checksum\":\"{:#018x}\"}}\n",
            order.seed, done.checksum
        )
    );
    // The connection is ready for the next request.
    assert_eq!(conn.feed(b"", &figures), (0, Action::NeedMore));
}

#[test]
fn work_units_chain_and_differ() {
    assert_eq!(work_units(5, 0), 5);
    assert_eq!(work_units(5, 3), work_unit(work_unit(work_unit(5))));
    assert_ne!(work_unit(0), 0);
    assert_ne!(work_unit(1), work_unit(2));
    // ms = 0 still runs one unit.
    let Action::Work(order) = one_action(b"GET /work?ms=0 HTTP/1.1\r\nHost: x\r\n\r\n") else { panic!() };
    assert_eq!(order.perform(&mut || 7).units, 1);
}

fn one_action(request: &[u8]) -> Action {
    Conn::new().feed(request, &figures).1
}

#[test]
fn work_ms_is_checked_and_capped() {
    assert!(matches!(
        one_action(format!("GET /work?ms={MAX_WORK_MS} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()),
        Action::Work(WorkOrder { ms: MAX_WORK_MS, .. })
    ));
    assert!(matches!(
        one_action(b"GET /work?a=1&ms=7&b HTTP/1.1\r\nHost: x\r\n\r\n"),
        Action::Work(WorkOrder { ms: 7, .. })
    ));
    for (query, why) in [
        ("?ms=10001", "over the maximum of 10000"),
        ("?ms=99999999999999999999999999", "over the maximum"),
        ("", "missing ms"),
        ("?ms=", "decimal"),
        ("?ms=-1", "decimal"),
        ("?ms=1.5", "decimal"),
        ("?m=5", "missing ms"),
    ] {
        let mut conn = Conn::new();
        let replies = drive(&mut conn, &[format!("GET /work{query} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()]);
        let (head, body) = split(&replies[0]);
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{query}: {head}");
        assert!(body.contains(why), "{query}: {body}");
        // A well-framed request with a bad parameter keeps the connection.
        assert!(!replies[0].close && !conn.is_closed(), "{query}");
    }
    assert_eq!(MAX_WORK_MS, 10_000, "the 400 text names the cap");
}

#[test]
fn stats_reports_the_callers_figures_as_json() {
    let (head, body) = split(&one(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert_eq!(header(&head, "content-type"), Some("application/json"));
    assert_eq!(
        body,
        "{\"vcpus\":{\"online\":3,\"peak_since_last_stats\":3,\"min\":1,\"max\":4,\"burst\":8},\
         \"memory\":{\"held_bytes\":67108864,\"heap_used_bytes\":12345},\
         \"connections\":{\"open\":2,\"total\":17},\
         \"requests\":{\"total\":99,\"1xx\":1,\"2xx\":90,\"3xx\":0,\"4xx\":7,\"5xx\":1}}\n"
    );
}

#[test]
fn figures_are_asked_for_only_by_stats() {
    let mut conn = Conn::new();
    let asked = core::cell::Cell::new(0);
    let f = || {
        asked.set(asked.get() + 1);
        figures()
    };
    conn.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &f);
    assert_eq!(asked.get(), 0);
    conn.feed(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n", &f);
    assert_eq!(asked.get(), 1);
}

#[test]
fn unknown_paths_are_404_and_keep_the_connection() {
    for path in ["/x", "/work/", "/stats/", "//", "/index.html"] {
        let reply = one(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let (head, body) = split(&reply);
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{path}: {head}");
        assert_eq!(body, "Not Found\n");
        assert!(!reply.close);
    }
    // `/?` is `/` with an empty query.
    assert_eq!(one(b"GET /?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").status, 200);
}

#[test]
fn other_methods_are_405_with_allow() {
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get", "BREW"] {
        let reply = one(format!("{method} / HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let (head, _) = split(&reply);
        assert!(head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{method}: {head}");
        assert_eq!(header(&head, "allow"), Some("GET, HEAD"));
        assert!(!reply.close);
    }
}

#[test]
fn absolute_form_targets_route_by_their_path() {
    assert_eq!(one(b"GET http://example.com/stats HTTP/1.1\r\nHost: x\r\n\r\n").status, 200);
    assert_eq!(one(b"GET HTTP://example.com:80 HTTP/1.1\r\nHost: x\r\n\r\n").status, 200);
    assert_eq!(one(b"GET http://example.com?ms=1 HTTP/1.1\r\nHost: x\r\n\r\n").status, 200);
    assert!(matches!(
        one_action(b"GET http://h/work?ms=2 HTTP/1.1\r\nHost: h\r\n\r\n"),
        Action::Work(WorkOrder { ms: 2, .. })
    ));
    assert_eq!(one(b"GET http://h/nope HTTP/1.1\r\nHost: h\r\n\r\n").status, 404);
}

#[test]
fn http11_keeps_alive_unless_told_to_close() {
    let keep = one(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!keep.close);
    assert_eq!(header(&split(&keep).0, "connection"), None);
    for value in ["close", "Close", "keep-alive, close", " CLOSE "] {
        let mut conn = Conn::new();
        let reply = drive(&mut conn, &[format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: {value}\r\n\r\n").as_bytes()]);
        assert!(reply[0].close, "{value}");
        assert_eq!(header(&split(&reply[0]).0, "connection"), Some("close"));
        assert!(conn.is_closed());
        assert_eq!(conn.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &figures), (0, Action::Close));
    }
}

#[test]
fn http10_closes_unless_keep_alive_is_asked() {
    let reply = one(b"GET / HTTP/1.0\r\n\r\n");
    assert!(reply.close);
    assert_eq!(header(&split(&reply).0, "connection"), Some("close"));
    let mut conn = Conn::new();
    let replies = drive(
        &mut conn,
        &[b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\nGET /stats HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"],
    );
    assert_eq!(replies.len(), 2);
    for r in &replies {
        assert!(!r.close);
        assert_eq!(header(&split(r).0, "connection"), Some("keep-alive"));
    }
    // Work orders carry the persistence too.
    let Action::Work(order) = one_action(b"GET /work?ms=1 HTTP/1.0\r\n\r\n") else { panic!() };
    assert!(order.close);
    let reply = order.reply(&WorkDone { units: 1, checksum: 2, elapsed_us: 3 });
    assert!(reply.close);
    assert_eq!(header(&split(&reply).0, "connection"), Some("close"));
}

const PIPELINE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\
    POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world\
    GET /work?ms=4 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
    HEAD /stats HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab\
    GET /nope HTTP/1.1\r\nHost: x\r\n\r\n\
    GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n\
    GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn pipelined_requests_are_answered_in_order_with_bodies_skipped() {
    let replies = drive(&mut Conn::new(), &[PIPELINE]);
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    // The request after `Connection: close` is never answered.
    assert_eq!(statuses, [200, 405, 200, 100, 200, 404, 200]);
    assert_eq!(replies.iter().filter(|r| r.is_final()).count(), 6);
    assert!(text(&replies[2]).contains("\"ms\":4"));
    assert_eq!(replies[3].bytes, b"HTTP/1.1 100 Continue\r\n\r\n");
    assert!(replies[6].close);
    assert!(replies[..6].iter().all(|r| !r.close));
}

#[test]
fn every_split_point_gives_the_same_replies() {
    let whole = drive(&mut Conn::new(), &[PIPELINE]);
    for at in 0..=PIPELINE.len() {
        let (a, b) = PIPELINE.split_at(at);
        assert_eq!(drive(&mut Conn::new(), &[a, b]), whole, "split at {at}");
    }
    let bytes: Vec<&[u8]> = PIPELINE.chunks(1).collect();
    assert_eq!(drive(&mut Conn::new(), &bytes), whole, "byte by byte");
    for size in [2, 3, 7, 64] {
        let chunks: Vec<&[u8]> = PIPELINE.chunks(size).collect();
        assert_eq!(drive(&mut Conn::new(), &chunks), whole, "chunks of {size}");
    }
}

#[test]
fn partial_heads_wait_without_consuming() {
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    for at in 0..request.len() {
        assert_eq!(Conn::new().feed(&request[..at], &figures), (0, Action::NeedMore), "{at}");
    }
}

#[test]
fn bodies_are_consumed_as_they_arrive() {
    let mut conn = Conn::new();
    let (used, action) = conn.feed(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", &figures);
    assert_eq!((used, action), (50, Action::NeedMore));
    assert_eq!(conn.feed(b"defg", &figures), (4, Action::NeedMore));
    let (used, action) = conn.feed(b"hijGET", &figures);
    assert_eq!(used, 3);
    assert!(matches!(action, Action::Reply(Reply { status: 405, close: false, .. })));
}

fn rejected(request: &[u8], status: u16) -> String {
    let mut conn = Conn::new();
    let replies = drive(&mut conn, &[request]);
    assert_eq!(replies.len(), 1, "{replies:?}");
    let reply = &replies[0];
    assert_eq!(reply.status, status, "{}", text(reply));
    assert!(reply.close, "{status} closes");
    assert!(conn.is_closed());
    let (head, body) = split(reply);
    assert_eq!(header(&head, "connection"), Some("close"));
    assert_eq!(header(&head, "server"), Some(SERVER));
    body
}

#[test]
fn malformed_requests_are_400_and_close() {
    for request in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;a\nb\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: \r1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\n\r\n",
        b"GET / HTTP/1.1\rHost: x\r\n\r\n",
        b"GET\x00/ HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let body = rejected(request, 400);
        assert!(body.starts_with("Bad Request: "), "{body}");
    }
    // Identical repeated lengths are one length.
    assert_eq!(one(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n!").status, 200);
    // Empty lines before a request are ignored.
    assert_eq!(one(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n").status, 200);
}

#[test]
fn errors_end_the_connection_but_earlier_replies_stand() {
    let replies =
        drive(&mut Conn::new(), &[b"GET / HTTP/1.1\r\nHost: x\r\n\r\nNONSENSE\r\n\r\nGET / HTTP/1.1\r\n\r\n"]);
    assert_eq!(replies.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 400]);
}

#[test]
fn oversized_heads_are_431() {
    let pad = "a".repeat(MAX_HEAD);
    // A complete head over the cap.
    rejected(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n").as_bytes(), 431);
    // A head that has not ended within the cap.
    let mut conn = Conn::new();
    let (used, action) = conn.feed(format!("GET /{pad}").as_bytes(), &figures);
    assert_eq!(used, 0);
    assert!(matches!(action, Action::Reply(Reply { status: 431, close: true, .. })));
    // One byte under the cap waits.
    let almost = format!("GET / HTTP/1.1\r\nX: {}", &pad[..MAX_HEAD - 20]);
    assert_eq!(almost.len(), MAX_HEAD - 1);
    assert_eq!(Conn::new().feed(almost.as_bytes(), &figures), (0, Action::NeedMore));
    // A head of exactly the cap is served.
    let exact = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", &pad[..MAX_HEAD - 32]);
    assert_eq!(exact.len(), MAX_HEAD);
    assert_eq!(one(exact.as_bytes()).status, 200);
    // Too many fields.
    let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
    let body = rejected(format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(), 431);
    assert_eq!(body, "Request Header Fields Too Large: request head too large\n");
    // Trailers count against their own cap.
    let trailer = format!("GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: {pad}\r\n\r\n");
    rejected(trailer.as_bytes(), 431);
}

#[test]
fn oversized_bodies_are_413_and_bodies_within_the_cap_are_skipped() {
    let body =
        rejected(format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1).as_bytes(), 413);
    assert_eq!(body, "Content Too Large: request body too large\n");
    rejected(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999999999\r\n\r\n", 413);
    // Chunked bodies are totalled across chunks.
    let half = format!("{:x}\r\n{}\r\n", MAX_BODY / 2, "z".repeat(MAX_BODY as usize / 2));
    let over = format!("GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{half}{half}1\r\n");
    rejected(over.as_bytes(), 413);
    rejected(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n", 413);
    // Exactly the cap, by either framing, is read and skipped, and the next request served.
    let full = "y".repeat(MAX_BODY as usize);
    let by_length = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY}\r\n\r\n{full}GET /stats HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    let chunked = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{half}{half}0\r\n\r\nGET /stats HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    for stream in [by_length, chunked] {
        let chunks: Vec<&[u8]> = stream.as_bytes().chunks(1000).collect();
        let replies = drive(&mut Conn::new(), &chunks);
        assert_eq!(replies.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200]);
        assert!(text(&replies[1]).contains("\"vcpus\""));
    }
}

#[test]
fn other_transfer_codings_are_501() {
    for coding in ["gzip", "gzip, chunked", "chunked, gzip", "chunked, chunked"] {
        let body =
            rejected(format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\r\n").as_bytes(), 501);
        assert_eq!(body, "Not Implemented: unsupported transfer coding\n");
    }
    // Repeated fields accumulate: `chunked` twice is refused too.
    rejected(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501);
}

#[test]
fn expect_100_continue_is_answered_only_when_a_body_follows() {
    let mut conn = Conn::new();
    let (used, action) =
        conn.feed(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n", &figures);
    assert_eq!(used, 68);
    let Action::Reply(interim) = action else { panic!("{action:?}") };
    assert_eq!((interim.status, interim.close, interim.is_final()), (100, false, false));
    assert_eq!(conn.feed(b"", &figures), (0, Action::NeedMore));
    assert!(matches!(conn.feed(b"abc", &figures), (3, Action::Reply(Reply { status: 405, .. }))));
    // No body, no interim reply; an over-large body gets the final 413 instead.
    assert_eq!(one(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n").status, 200);
    rejected(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n", 413);
}

#[test]
fn status_classes() {
    assert_eq!(status_class(100), Some(0));
    assert_eq!(status_class(200), Some(1));
    assert_eq!(status_class(431), Some(3));
    assert_eq!(status_class(599), Some(4));
    assert_eq!(status_class(99), None);
    assert_eq!(status_class(600), None);
}

/// xorshift64: the fuzz loop's deterministic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const CORPUS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /work?ms=3 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /stats HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n",
    b"GET http://h:1/stats?x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8000\r\n",
];

const TOKENS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"/",
    b"/work?ms=",
    b"/stats",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b": ",
    b"Host: x",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b"0",
    b"9",
    b"f",
    b";",
    b"\x00",
    b"\xff",
    b" ",
    b"\t",
    b"Expect: 100-continue",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(6) {
            0 if at < input.len() => input[at] ^= 1 << rng.below(8),
            1 if at < input.len() => {
                input.remove(at);
            }
            2 => input.insert(at, rng.next() as u8),
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                input.splice(at..at, token.iter().copied());
            }
            4 => input.truncate(at),
            _ => {
                let other = CORPUS[rng.below(CORPUS.len())];
                input.splice(at..at, other.iter().copied());
            }
        }
    }
}

#[test]
fn fuzz_never_panics_and_never_overconsumes() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut seen = [0u32; 600];
    for round in 0..20_000 {
        let input: Vec<u8> = match round % 3 {
            0 => (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
            1 => (0..rng.below(40)).flat_map(|_| TOKENS[rng.below(TOKENS.len())].iter().copied()).collect(),
            _ => {
                let mut v: Vec<u8> =
                    (0..=rng.below(3)).flat_map(|_| CORPUS[rng.below(CORPUS.len())].to_vec()).collect();
                mutate(&mut rng, &mut v);
                v
            }
        };
        // Whole, then at a random split, then in random small chunks: `drive` asserts the
        // consumption bound and that NeedMore never comes with MAX_HEAD bytes buffered.
        let whole = drive(&mut Conn::new(), &[&input]);
        let at = rng.below(input.len() + 1);
        let (a, b) = input.split_at(at);
        assert_eq!(drive(&mut Conn::new(), &[a, b]), whole, "round {round}: split at {at}");
        let size = 1 + rng.below(16);
        let chunks: Vec<&[u8]> = input.chunks(size).collect();
        assert_eq!(drive(&mut Conn::new(), &chunks), whole, "round {round}: chunks of {size}");
        for reply in &whole {
            assert!(reply.bytes.starts_with(b"HTTP/1.1 "));
            assert!(matches!(reply.status, 100 | 200 | 400 | 404 | 405 | 413 | 431 | 501));
            seen[usize::from(reply.status)] += 1;
        }
    }
    // The inputs reach every kind of answer but the head-size one (they are too short).
    for status in [100, 200, 400, 404, 405, 413, 501] {
        assert!(
            seen[status] > 0,
            "no {status} in {:?}",
            seen.iter().enumerate().filter(|s| *s.1 > 0).collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_full_buffer_always_makes_progress() {
    let mut rng = Rng(0xfeed_beef_0bad_f00d);
    for _ in 0..200 {
        let mut input: Vec<u8> = Vec::new();
        while input.len() < MAX_HEAD + 100 {
            let mut piece = CORPUS[rng.below(CORPUS.len())].to_vec();
            mutate(&mut rng, &mut piece);
            input.extend_from_slice(&piece);
            input.extend((0..rng.below(300)).map(|_| rng.next() as u8));
        }
        let mut conn = Conn::new();
        let mut rest = &input[..];
        while rest.len() >= MAX_HEAD {
            let (used, action) = conn.feed(rest, &figures);
            assert!(used <= rest.len());
            assert!(used > 0 || action != Action::NeedMore, "stalled with {} bytes", rest.len());
            rest = &rest[used..];
            if matches!(action, Action::Close) || matches!(&action, Action::Reply(r) if r.close) {
                break;
            }
            if let Action::Work(order) = action {
                assert!(order.ms <= MAX_WORK_MS);
                if order.close {
                    break;
                }
            }
        }
    }
}
