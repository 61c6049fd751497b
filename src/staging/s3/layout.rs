//! What a session's staged objects are called, and what they hold, read back from a listing.
//! Pure: no I/O.
//!
//! Under `PREFIX/.bits/staging/<session>/` a session keeps:
//!
//! * `upload-<part size>-<hex upload id>`: the multipart upload, created with the session at
//!   the session's own key `object`; its presence is what makes the part exist;
//! * or `upload-at-<part size>-<hex upload id>`, whose content is the key the upload was
//!   created at: the destination itself (a session created for its destination), so that the
//!   commit completes the upload in place, without a copy;
//! * `part/<n>-<hex ETag>`: zero-byte markers, one per uploaded part `n` (1-based, part `n`
//!   holds bytes `[(n-1)P, nP)`), written after the part is stored;
//! * `last/<n>-<len>-<hex ETag>`: a zero-byte marker of the short last part `n` (`len`
//!   bytes) a commit uploaded, so that a retried commit completes the same parts (the upload
//!   may be gone by then, completed by the attempt whose answer was lost);
//! * `tail/<generation>-<start>-<nonce>`: the bytes from `start` (the object's size is its
//!   length) that do not fill a part yet; written once and never changed;
//! * `object`: the completed multipart upload at the session's key, before it is published to
//!   its destination (by a copy);
//! * `done`: written after the file was published, so that a retried commit can tell.
//!
//! The session's bytes are the contiguous parts from 1, then the tails replayed in generation
//! order: a tail starting inside what is held replaces everything from its start on (a write
//! after a rewind), one starting past it is left over from an abandoned write and ignored.

use std::collections::BTreeMap;

/// One staged object of a session, as its name (relative to the session's folder) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Entry {
    Upload {
        part_size: u64,
        upload_id: String,
        in_place: bool,
    },
    Part {
        number: u32,
        etag: String,
    },
    Last {
        number: u32,
        len: u64,
        etag: String,
    },
    Tail(Tail),
    Object,
    Done,
}

/// A tail object: `len` bytes from `start`, written by the generation `generation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tail {
    pub(super) generation: u64,
    pub(super) start: u64,
    pub(super) nonce: u32,
    pub(super) len: u64,
}

impl Tail {
    pub(super) fn name(&self) -> String {
        format!(
            "tail/{:010}-{:020}-{:08x}",
            self.generation, self.start, self.nonce
        )
    }
}

pub(super) fn upload_name(part_size: u64, upload_id: &str, in_place: bool) -> String {
    let at = if in_place { "at-" } else { "" };
    format!("upload-{at}{part_size}-{}", hex(upload_id))
}

pub(super) fn part_name(number: u32, etag: &str) -> String {
    format!("part/{number:05}-{}", hex(etag))
}

pub(super) fn last_name(number: u32, len: u64, etag: &str) -> String {
    format!("last/{number:05}-{len}-{}", hex(etag))
}

pub(super) const OBJECT: &str = "object";
pub(super) const DONE: &str = "done";

/// Reads the name of a staged object; `len` is its size. `None` for a name the staging does not
/// write (ignored, and deleted with the session).
pub(super) fn parse(name: &str, len: u64) -> Option<Entry> {
    match name {
        OBJECT => return Some(Entry::Object),
        DONE => return Some(Entry::Done),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("upload-") {
        let (rest, in_place) = match rest.strip_prefix("at-") {
            Some(rest) => (rest, true),
            None => (rest, false),
        };
        let (size, id) = rest.split_once('-')?;
        return Some(Entry::Upload {
            part_size: size.parse().ok()?,
            upload_id: unhex(id)?,
            in_place,
        });
    }
    if let Some(rest) = name.strip_prefix("part/") {
        let (number, etag) = rest.split_once('-')?;
        return Some(Entry::Part {
            number: number.parse().ok().filter(|n| *n > 0)?,
            etag: unhex(etag)?,
        });
    }
    if let Some(rest) = name.strip_prefix("last/") {
        let mut fields = rest.splitn(3, '-');
        return Some(Entry::Last {
            number: fields.next()?.parse().ok().filter(|n| *n > 0)?,
            len: fields.next()?.parse().ok().filter(|n| *n > 0)?,
            etag: unhex(fields.next()?)?,
        });
    }
    let rest = name.strip_prefix("tail/")?;
    let mut fields = rest.splitn(3, '-');
    let generation = fields.next()?.parse().ok()?;
    let start = fields.next()?.parse().ok()?;
    let nonce = u32::from_str_radix(fields.next()?, 16).ok()?;
    Some(Entry::Tail(Tail {
        generation,
        start,
        nonce,
        len,
    }))
}

/// A piece of the bytes after the last part: `len` bytes of a tail object from its byte
/// `from`, which are the file's bytes from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Piece {
    pub(super) name: String,
    pub(super) start: u64,
    pub(super) from: u64,
    pub(super) len: u64,
}

/// What a session holds, resolved from its objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct State {
    pub(super) upload_id: String,
    pub(super) part_size: u64,
    /// The marker of an upload made at its destination (its content is the key), if it was.
    pub(super) in_place: Option<String>,
    /// The key the upload was made at, once known (read from the marker); `None` for the
    /// session's own `object`.
    pub(super) key: Option<String>,
    /// ETags of parts 1..=parts.len(), all stored.
    pub(super) parts: Vec<String>,
    /// The short last part a commit uploaded: (number, length, ETag). Only one that follows
    /// the parts counts.
    pub(super) last: Option<(u32, u64, String)>,
    /// The bytes after the parts, in order and contiguous from `covered()`.
    pub(super) pieces: Vec<Piece>,
    /// The next generation a writer uses (above every tail seen).
    pub(super) next_generation: u64,
    /// Objects that hold nothing the session needs any more (tails already in a part or
    /// replaced, markers of parts past a gap): deleted once what replaces them is stored.
    pub(super) stale: Vec<String>,
    /// Size of the completed multipart upload, if it was completed.
    pub(super) object: Option<u64>,
    /// Whether the file was published.
    pub(super) done: bool,
}

impl State {
    /// Bytes held in whole parts.
    pub(super) fn covered(&self) -> u64 {
        self.parts.len() as u64 * self.part_size
    }

    /// Contiguous bytes held from 0.
    pub(super) fn held(&self) -> u64 {
        self.covered() + self.pieces.iter().map(|p| p.len).sum::<u64>()
    }

    /// Forgets the pieces from `offset` on (`offset` at or past `covered()`), keeping the
    /// bytes before it: a write starts there. Pieces dropped become stale.
    pub(super) fn truncate(&mut self, offset: u64) {
        let mut kept = Vec::with_capacity(self.pieces.len());
        for mut piece in std::mem::take(&mut self.pieces) {
            if piece.start >= offset {
                self.stale.push(piece.name);
            } else {
                piece.len = piece.len.min(offset - piece.start);
                kept.push(piece);
            }
        }
        self.pieces = kept;
    }
}

/// Resolves a session's objects (name, size) into what it holds. `None` if the session has no
/// multipart upload (its part does not exist), unless it was already published (`done`).
pub(super) fn resolve<'a>(objects: impl IntoIterator<Item = (&'a str, u64)>) -> Option<State> {
    let mut uploads = Vec::new();
    let mut parts = BTreeMap::new();
    let mut tails = Vec::new();
    let mut lasts = Vec::new();
    let mut unknown = Vec::new();
    let (mut object, mut done) = (None, false);
    for (name, len) in objects {
        match parse(name, len) {
            Some(Entry::Upload {
                part_size,
                upload_id,
                in_place,
            }) => uploads.push((name.to_owned(), part_size, upload_id, in_place)),
            Some(Entry::Part { number, etag }) => {
                // Two markers for one part (a writer that lost its lease): the bytes are the
                // same, so either ETag names them; keep one, the other is stale.
                if let Some((old, _)) = parts.insert(number, (name.to_owned(), etag)) {
                    unknown.push(old);
                }
            }
            Some(Entry::Last { number, len, etag }) => {
                lasts.push((name.to_owned(), number, len, etag));
            }
            Some(Entry::Tail(tail)) => tails.push((name.to_owned(), tail)),
            Some(Entry::Object) => object = Some(len),
            Some(Entry::Done) => done = true,
            None => unknown.push(name.to_owned()),
        }
    }
    uploads.sort();
    let (upload_id, part_size, in_place) = match uploads.into_iter().next() {
        Some((name, size, id, in_place)) if size > 0 => (id, size, in_place.then_some(name)),
        _ if done => (String::new(), 1, None),
        _ => return None,
    };
    let mut state = State {
        upload_id,
        part_size,
        in_place,
        key: None,
        parts: Vec::new(),
        last: None,
        pieces: Vec::new(),
        next_generation: tails
            .iter()
            .map(|(_, t)| t.generation + 1)
            .max()
            .unwrap_or(1),
        stale: unknown,
        object,
        done,
    };
    for (number, (name, etag)) in parts {
        if u64::from(number) == state.parts.len() as u64 + 1 {
            state.parts.push(etag);
        } else {
            state.stale.push(name);
        }
    }
    for (name, number, len, etag) in lasts {
        if u64::from(number) == state.parts.len() as u64 + 1 && state.last.is_none() {
            state.last = Some((number, len, etag));
        } else {
            state.stale.push(name);
        }
    }
    tails.sort_by_key(|(_, t)| (t.generation, t.start, t.nonce));
    let covered = state.covered();
    for (name, tail) in tails {
        let end = state.held();
        // A tail that began inside the parts (written by a node that did not know another
        // one had uploaded them) still holds the file's bytes past them.
        let start = tail.start.max(covered);
        let from = start - tail.start;
        if from >= tail.len || start > end {
            // All in the parts already, or past a gap (its writer's earlier bytes never
            // arrived).
            state.stale.push(name);
            continue;
        }
        state.truncate(start);
        state.pieces.push(Piece {
            name,
            start,
            from,
            len: tail.len - from,
        });
    }
    // A tail that crossed into the next part cannot be: parts are cut at their boundaries.
    // Trust nothing past the first part's worth of pieces.
    let limit = covered + state.part_size;
    if state.held() > limit {
        state.truncate(limit);
    }
    Some(state)
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if s.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(generation: u64, start: u64, len: u64) -> (String, u64) {
        let t = Tail {
            generation,
            start,
            nonce: 7,
            len,
        };
        (t.name(), len)
    }

    fn state(objects: &[(String, u64)]) -> Option<State> {
        resolve(objects.iter().map(|(n, l)| (n.as_str(), *l)))
    }

    fn upload() -> (String, u64) {
        (upload_name(100, "id/with+odd=chars", false), 0)
    }

    #[test]
    fn names_round_trip() {
        for in_place in [false, true] {
            assert_eq!(
                parse(&upload_name(8 << 20, "abc-DEF.ghi", in_place), 0),
                Some(Entry::Upload {
                    part_size: 8 << 20,
                    upload_id: "abc-DEF.ghi".into(),
                    in_place,
                })
            );
        }
        assert_eq!(
            parse(&part_name(12, "\"0a1b\""), 0),
            Some(Entry::Part {
                number: 12,
                etag: "\"0a1b\"".into()
            })
        );
        let t = Tail {
            generation: 3,
            start: 123_456,
            nonce: 0xdead_beef,
            len: 99,
        };
        assert_eq!(parse(&t.name(), 99), Some(Entry::Tail(t)));
        assert_eq!(
            parse(&last_name(3, 77, "\"e\""), 0),
            Some(Entry::Last {
                number: 3,
                len: 77,
                etag: "\"e\"".into()
            })
        );
        assert_eq!(parse("object", 5), Some(Entry::Object));
        assert_eq!(parse("done", 0), Some(Entry::Done));
        for junk in [
            "",
            "part/0-00",
            "part/x-00",
            "tail/1-2",
            "upload-x-00",
            "upload-at-x-00",
            "upload-at-",
            "last/1-0-00",
            "last/0-5-00",
            "last/1-5",
            "part/1-0",
        ] {
            assert_eq!(parse(junk, 0), None, "{junk}");
        }
    }

    #[test]
    fn an_upload_in_place_names_its_marker() {
        let marker = upload_name(100, "u", true);
        let s = state(&[(marker.clone(), 9), tail(1, 0, 10)]).unwrap();
        assert_eq!((&s.in_place, &s.key, s.held()), (&Some(marker), &None, 10));
        assert_eq!(state(&[upload()]).unwrap().in_place, None);
    }

    #[test]
    fn no_upload_means_no_part() {
        assert_eq!(state(&[tail(1, 0, 10)]), None);
        let done = state(&[("done".into(), 0)]).unwrap();
        assert!(done.done);
    }

    #[test]
    fn parts_then_tails_in_order() {
        let s = state(&[
            upload(),
            (part_name(1, "a"), 0),
            (part_name(2, "b"), 0),
            tail(1, 200, 30),
            tail(2, 230, 20),
        ])
        .unwrap();
        assert_eq!(s.parts, ["a", "b"]);
        assert_eq!((s.covered(), s.held(), s.next_generation), (200, 250, 3));
        assert!(s.stale.is_empty());
    }

    #[test]
    fn a_last_part_counts_only_right_after_the_parts() {
        let s = state(&[
            upload(),
            (part_name(1, "a"), 0),
            (last_name(2, 40, "z"), 0),
            (last_name(3, 40, "y"), 0),
            tail(1, 100, 40),
        ])
        .unwrap();
        assert_eq!(s.last, Some((2, 40, "z".into())));
        assert_eq!(s.held(), 140, "a last part does not count as held bytes");
        assert_eq!(s.stale, [last_name(3, 40, "y")]);
    }

    #[test]
    fn a_gap_in_the_parts_stops_them() {
        let s = state(&[upload(), (part_name(1, "a"), 0), (part_name(3, "c"), 0)]).unwrap();
        assert_eq!(s.parts, ["a"]);
        assert_eq!(s.stale, [part_name(3, "c")]);
    }

    #[test]
    fn a_later_generation_replaces_from_its_start() {
        // Written 0..80 in one generation, then rewound to 50 and written 50..70.
        let s = state(&[upload(), tail(1, 0, 50), tail(1, 50, 30), tail(2, 50, 20)]).unwrap();
        assert_eq!(s.held(), 70);
        assert_eq!(
            s.pieces
                .iter()
                .map(|p| (p.start, p.len))
                .collect::<Vec<_>>(),
            [(0, 50), (50, 20)]
        );
        assert_eq!(s.stale, [tail(1, 50, 30).0]);

        // Rewound into the middle of a piece: its prefix is kept.
        let s = state(&[upload(), tail(1, 0, 50), tail(2, 20, 5)]).unwrap();
        assert_eq!(
            s.pieces
                .iter()
                .map(|p| (p.start, p.len))
                .collect::<Vec<_>>(),
            [(0, 20), (20, 5)]
        );
    }

    #[test]
    fn tails_past_a_gap_or_inside_parts_are_stale() {
        let s = state(&[
            upload(),
            (part_name(1, "a"), 0),
            tail(1, 40, 60),
            tail(2, 130, 5),
            tail(2, 100, 10),
        ])
        .unwrap();
        assert_eq!(s.held(), 110);
        assert_eq!(s.stale, [tail(1, 40, 60).0, tail(2, 130, 5).0]);
    }

    #[test]
    fn a_tail_reaching_past_the_parts_keeps_its_end() {
        // Part 1 is 0..100; a tail written from 70 by a node that did not know of the part.
        let s = state(&[upload(), (part_name(1, "a"), 0), tail(3, 70, 50)]).unwrap();
        assert_eq!(s.held(), 120);
        assert_eq!(
            s.pieces
                .iter()
                .map(|p| (p.start, p.from, p.len))
                .collect::<Vec<_>>(),
            [(100, 30, 20)]
        );
    }

    #[test]
    fn truncate_keeps_prefixes() {
        let mut s = state(&[upload(), tail(1, 0, 50), tail(1, 50, 50)]).unwrap();
        s.truncate(60);
        assert_eq!(s.held(), 60);
        s.truncate(50);
        assert_eq!(s.held(), 50);
        assert_eq!(s.stale, [tail(1, 50, 50).0]);
        s.truncate(0);
        assert_eq!((s.held(), s.pieces.len()), (0, 0));
    }

    #[test]
    fn unknown_objects_are_stale() {
        let s = state(&[upload(), ("tail/zz".into(), 3)]).unwrap();
        assert_eq!(s.stale, ["tail/zz"]);
    }
}
