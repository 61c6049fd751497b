//! What a client does with an answer: the Windows client's rules (protocol reference §13.1),
//! as pure functions.

use std::time::Duration;

use http::StatusCode;

use super::error::{Error, ServerError};
use crate::protocol::{AckParseError, Hresult, MIN_FRAGMENT_SIZE, PacketType, ParsedAck};

/// What to do next.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A 2xx Ack to a body-less packet.
    Done(ParsedAck),
    /// A Fragment Ack (200 or 416): the server expects this byte next.
    Received(ParsedAck, u64),
    /// 413 to a Fragment: send the same bytes in smaller fragments.
    Shrink,
    /// `BG_E_SESSION_NOT_FOUND`: the session is gone.
    SessionLost,
    /// Try again later.
    Transient(ServerError),
    /// Stop.
    Fatal(Error),
}

/// Judges the answer to `packet`; `credentials` is whether the request carried any (an
/// `Authorization` header), which tells a refused password from a missing one.
pub(crate) fn judge(
    packet: PacketType,
    status: StatusCode,
    parsed: Result<ParsedAck, AckParseError>,
    credentials: bool,
) -> Verdict {
    let name = packet.as_str();
    let ack = match parsed {
        Ok(ack) => ack,
        Err(e) => {
            return if is_answer(packet, status) {
                Verdict::Fatal(invalid(name, status, e.to_string()))
            } else {
                by_status(name, status, None, None, false, credentials)
            };
        }
    };
    if ack.error_code() == Some(Hresult::BG_E_SESSION_NOT_FOUND) {
        return Verdict::SessionLost;
    }
    if packet == PacketType::Fragment && status == StatusCode::PAYLOAD_TOO_LARGE {
        return Verdict::Shrink;
    }
    if is_answer(packet, status) {
        if !ack.is_ack() {
            return Verdict::Fatal(invalid(
                name,
                status,
                "no `BITS-Packet-Type: Ack`; the server does not handle BITS at this URL".into(),
            ));
        }
        if packet != PacketType::Fragment {
            return Verdict::Done(ack);
        }
        return match ack.received() {
            Some(received) => Verdict::Received(ack, received),
            None => Verdict::Fatal(invalid(
                name,
                status,
                "a Fragment Ack without `BITS-Received-Content-Range`".into(),
            )),
        };
    }
    by_status(
        name,
        status,
        ack.error_code(),
        ack.error_context(),
        ack.is_ack(),
        credentials,
    )
}

/// Whether `status` is an answer to read rather than an error: 2xx, and 416 to a Fragment.
fn is_answer(packet: PacketType, status: StatusCode) -> bool {
    status.is_success()
        || (packet == PacketType::Fragment && status == StatusCode::RANGE_NOT_SATISFIABLE)
}

fn invalid(packet: &'static str, status: StatusCode, reason: String) -> Error {
    Error::InvalidResponse {
        packet,
        status,
        reason,
    }
}

/// Transient or fatal, by code first and then by status class (§13.1): codes that say the
/// request itself is wrong are fatal whatever the status; 3xx (a redirect, which uploads do
/// not follow), 4xx but 408, 409 and 429, and 501 and 505 are fatal; everything else is
/// retried.
fn by_status(
    packet: &'static str,
    status: StatusCode,
    code: Option<Hresult>,
    context: Option<u32>,
    is_ack: bool,
    credentials: bool,
) -> Verdict {
    let fatal_code = matches!(
        code,
        Some(Hresult::E_INVALIDARG | Hresult::E_ACCESSDENIED | Hresult::BG_E_TOO_LARGE)
    );
    let transient = !fatal_code
        && match status.as_u16() {
            300..=399 => false,
            408 | 409 | 429 => true,
            400..=499 => false,
            501 | 505 => false,
            _ => true,
        };
    let error = ServerError {
        packet,
        status,
        code,
        context,
        is_ack,
        transient,
        credentials,
    };
    if transient {
        Verdict::Transient(error)
    } else {
        Verdict::Fatal(Error::Server(error))
    }
}

/// The client's delays between retries: exponential backoff with jitter, `initial`,
/// doubling, capped at `max`, each delay drawn from the upper half of its step so that many
/// clients do not retry in lockstep. (The server's schedule for deferred commits is
/// [`crate::completion::Backoff`], which has no jitter and a bounded number of attempts.)
#[derive(Debug, Clone)]
pub(crate) struct RetryDelay {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl RetryDelay {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The next delay; `random` is any random number.
    pub(crate) fn next_delay(&mut self, random: u64) -> Duration {
        let step = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        let jitter = if spread == 0 {
            0
        } else {
            random % (spread + 1)
        };
        half + Duration::from_micros(jitter)
    }

    /// Back to the first step, after progress.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random number for jitter, without a dependency.
pub(crate) fn random() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// The next fragment size after a 413 to a fragment of `sent` bytes: half of it, never below
/// [`MIN_FRAGMENT_SIZE`]; `None` if it was already that small.
pub(crate) fn shrink(sent: u64) -> Option<u64> {
    (sent > MIN_FRAGMENT_SIZE).then(|| (sent / 2).max(MIN_FRAGMENT_SIZE))
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;

    fn answer(packet: PacketType, status: u16, pairs: &[(&str, &str)]) -> Verdict {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let status = StatusCode::from_u16(status).unwrap();
        judge(packet, status, ParsedAck::parse(status, &headers), false)
    }

    fn ack(packet: PacketType, status: u16, pairs: &[(&str, &str)]) -> Verdict {
        let mut all = vec![("BITS-Packet-Type", "Ack")];
        all.extend_from_slice(pairs);
        answer(packet, status, &all)
    }

    fn error(packet: PacketType, status: u16, code: &str) -> Verdict {
        ack(
            packet,
            status,
            &[("BITS-Error-Code", code), ("BITS-Error-Context", "0x5")],
        )
    }

    fn is_transient(v: &Verdict) -> bool {
        matches!(v, Verdict::Transient(_))
    }

    fn is_fatal(v: &Verdict) -> bool {
        matches!(v, Verdict::Fatal(_))
    }

    use PacketType::*;

    #[test]
    fn fragment_acks_are_followed_on_200_and_416() {
        for status in [200, 416] {
            match ack(Fragment, status, &[("BITS-Received-Content-Range", "4096")]) {
                Verdict::Received(_, 4096) => {}
                other => panic!("{status}: {other:?}"),
            }
        }
        // 416 with the MC-BUP pairing of HRESULT 0 is still just a resync.
        match ack(
            Fragment,
            416,
            &[
                ("BITS-Received-Content-Range", "10"),
                ("BITS-Error-Code", "0x0"),
                ("BITS-Error-Context", "0x5"),
            ],
        ) {
            Verdict::Received(_, 10) => {}
            other => panic!("{other:?}"),
        }
        assert!(is_fatal(&ack(Fragment, 200, &[])));
        assert!(is_fatal(&answer(
            Fragment,
            200,
            &[("BITS-Received-Content-Range", "1")]
        )));
    }

    #[test]
    fn too_large_fragment_shrinks_with_or_without_ack() {
        assert!(matches!(
            ack(Fragment, 413, &[("BITS-Received-Content-Range", "0")]),
            Verdict::Shrink
        ));
        assert!(matches!(answer(Fragment, 413, &[]), Verdict::Shrink));
        // 413 to anything else is just a fatal 4xx.
        assert!(is_fatal(&answer(CreateSession, 413, &[])));
    }

    #[test]
    fn session_not_found_restarts_on_any_status() {
        for status in [500, 400, 404, 200] {
            assert!(matches!(
                error(Fragment, status, "0x8020001F"),
                Verdict::SessionLost
            ));
        }
        assert!(matches!(
            error(CloseSession, 500, "8020001f"),
            Verdict::SessionLost
        ));
    }

    #[test]
    fn fatal_codes_are_fatal_whatever_the_status() {
        for code in ["0x80070057", "0x80070005", "0x80200020"] {
            for status in [400, 403, 500, 501, 503] {
                assert!(is_fatal(&error(Fragment, status, code)), "{code} {status}");
            }
        }
    }

    #[test]
    fn status_classes() {
        for status in [500, 502, 503, 504, 408, 409, 429, 507] {
            assert!(
                is_transient(&error(Fragment, status, "0x80004005")),
                "{status}"
            );
            assert!(is_transient(&answer(Fragment, status, &[])), "{status}");
        }
        for status in [
            400, 401, 403, 404, 405, 407, 410, 501, 505, 301, 302, 307, 308,
        ] {
            assert!(is_fatal(&error(Fragment, status, "0x80004005")), "{status}");
            assert!(is_fatal(&answer(CreateSession, status, &[])), "{status}");
        }
        // Our server's transient answers.
        for (status, code) in [
            (503, "0x800700AA"),
            (503, "0x8007045B"),
            (500, "0x80070070"),
            (409, "0x80070020"),
            (408, "0x800705B4"),
            (500, "0x801901F4"),
        ] {
            assert!(
                is_transient(&error(Fragment, status, code)),
                "{status} {code}"
            );
        }
    }

    #[test]
    fn success_needs_an_ack() {
        assert!(matches!(ack(Ping, 200, &[]), Verdict::Done(_)));
        assert!(matches!(ack(CreateSession, 201, &[]), Verdict::Done(_)));
        assert!(matches!(ack(CloseSession, 200, &[]), Verdict::Done(_)));
        assert!(is_fatal(&answer(Ping, 200, &[])));
        match answer(CreateSession, 200, &[("content-type", "text/html")]) {
            Verdict::Fatal(Error::InvalidResponse { reason, .. }) => {
                assert!(reason.contains("does not handle BITS"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_headers() {
        // On an answer it is an invalid response; on an error, the status decides.
        assert!(is_fatal(&ack(
            Fragment,
            200,
            &[("BITS-Received-Content-Range", "lots")]
        )));
        assert!(is_transient(&ack(
            Fragment,
            503,
            &[("BITS-Error-Code", "busy")]
        )));
        assert!(is_fatal(&ack(
            Fragment,
            403,
            &[("BITS-Error-Code", "denied")]
        )));
    }

    #[test]
    fn not_an_ack_is_flagged() {
        match answer(Fragment, 502, &[]) {
            Verdict::Transient(e) => assert!(!e.is_ack()),
            other => panic!("{other:?}"),
        }
        match error(Fragment, 503, "0x800700AA") {
            Verdict::Transient(e) => assert!(e.is_ack() && e.is_transient()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = RetryDelay::new(Duration::from_millis(100), Duration::from_secs(1));
        let lows: Vec<_> = (0..6).map(|_| b.next_delay(0)).collect();
        assert_eq!(
            lows,
            [50, 100, 200, 400, 500, 500].map(Duration::from_millis)
        );
        let mut b = RetryDelay::new(Duration::from_millis(100), Duration::from_secs(1));
        let highs: Vec<_> = (0..5).map(|_| b.next_delay(u64::MAX - 1)).collect();
        for (high, step) in highs.iter().zip([100, 200, 400, 800, 1000]) {
            assert!(*high <= Duration::from_millis(step), "{high:?} > {step}");
            assert!(*high >= Duration::from_millis(step / 2), "{high:?}");
        }
        b.reset();
        assert_eq!(b.next_delay(0), Duration::from_millis(50));
        let mut huge = RetryDelay::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..100 {
            assert!(huge.next_delay(random()) <= Duration::from_secs(60));
        }
    }

    #[test]
    fn shrinking_stops_at_five_kib() {
        assert_eq!(shrink(8 << 20), Some(4 << 20));
        assert_eq!(shrink(8 * 1024), Some(5 * 1024));
        assert_eq!(shrink(5 * 1024 + 1), Some(5 * 1024));
        assert_eq!(shrink(5 * 1024), None);
        assert_eq!(shrink(100), None);
        let mut size = 13_000_000;
        let mut steps = 0;
        while let Some(next) = shrink(size) {
            assert!(next < size && next >= MIN_FRAGMENT_SIZE);
            size = next;
            steps += 1;
        }
        assert_eq!(size, MIN_FRAGMENT_SIZE);
        assert!(steps < 20);
    }
}
