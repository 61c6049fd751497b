//! The live status page: an [`Overview`] rendered as one HTML document, server-side, with no
//! script but a refresh. Pure: no I/O, every client-controlled string escaped.

use std::fmt::Write;

use super::{EndedSession, Overview, SessionInfo};

/// Seconds between the page's own refreshes.
const REFRESH_SECONDS: u32 = 5;

/// Escapes text for HTML element content and double-quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1.5 MiB`, for people.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// [`bytes`] that never breaks between the number and its unit.
fn bytes_nb(n: u64) -> String {
    bytes(n).replace(' ', "&nbsp;")
}

/// `3 m 20 s`, for people.
pub(crate) fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} m {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} m", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86400, (s % 86400) / 3600),
    }
}

/// Whole percent received, if the size is known.
fn percent(received: u64, total: Option<u64>) -> Option<u64> {
    match total {
        Some(0) => Some(100),
        Some(total) => Some(((received as u128 * 100) / total as u128) as u64),
        None => None,
    }
}

/// Average rate over the session's active life (creation to last packet), bytes per second.
fn rate(session: &SessionInfo) -> Option<u64> {
    let active_ms = session.last_activity_ms.saturating_sub(session.created_ms);
    (active_ms > 0 && session.received > 0)
        .then(|| (session.received as u128 * 1000 / active_ms as u128) as u64)
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0.5rem;max-width:72rem;color:#222}\
h1{font-size:1.3rem}h2{font-size:1.1rem;margin-top:1.5rem}\
.totals{display:flex;flex-wrap:wrap;gap:0.5rem 1.5rem}.totals div{white-space:nowrap}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:0.3rem;border-bottom:1px solid #ddd;vertical-align:top}\
td.name{overflow-wrap:anywhere}progress{flex:1;min-width:4rem}\
.bar{display:flex;align-items:center;gap:0.4rem}.id{font-size:0.75em}\
.muted{color:#666}.wrap{overflow-x:auto}\
@media (max-width:40rem){th.wide,td.wide,.id{display:none}progress{flex:none;width:3.5rem;min-width:0}\
.bar{flex-direction:column;align-items:flex-start;gap:0}}";

/// The whole page.
pub(crate) fn render(overview: &Overview) -> String {
    let mut html = String::with_capacity(8192);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>BITS uploads</title><style>{STYLE}</style></head><body>\
         <h1>BITS uploads</h1>"
    );
    totals(&mut html, overview);
    in_flight(&mut html, overview);
    deferred(&mut html, overview);
    recent(&mut html, overview);
    let _ = writeln!(
        html,
        "<p class=\"muted\">Refreshes every {REFRESH_SECONDS} s. Rates are averages over each \
         session's active time.</p></body></html>"
    );
    html
}

fn totals(html: &mut String, o: &Overview) {
    let state = if o.running {
        "running"
    } else {
        "not taking uploads"
    };
    let _ = write!(
        html,
        "<div class=\"totals\" id=\"totals\">\
         <div>State: <b id=\"state\">{state}</b></div>\
         <div>Open sessions: <b id=\"open\">{}</b></div>\
         <div>Received: <b>{}</b> of <b>{}</b></div>\
         <div>Deferred commits: <b>{}</b></div>\
         <div>Recently ended: <b>{}</b></div></div>",
        o.open,
        bytes(o.bytes_received),
        bytes(o.bytes_expected),
        o.deferred.len(),
        o.recent.len(),
    );
}

fn owner_cell(owner: Option<&str>, peer: Option<&str>) -> String {
    match (owner, peer) {
        (Some(owner), _) => escape(owner),
        (None, Some(peer)) => format!("<span class=\"muted\">{}</span>", escape(peer)),
        (None, None) => "<span class=\"muted\">anonymous</span>".to_owned(),
    }
}

fn in_flight(html: &mut String, o: &Overview) {
    let _ = write!(html, "<h2>In flight</h2>");
    if o.in_flight.is_empty() {
        let _ = write!(
            html,
            "<p class=\"muted\" id=\"no-sessions\">No open sessions.</p>"
        );
        return;
    }
    let _ = write!(
        html,
        "<div class=\"wrap\"><table id=\"sessions\"><thead><tr><th>Destination</th>\
         <th>Progress</th><th>Bytes</th><th class=\"wide\">Rate</th><th>Idle</th>\
         <th class=\"wide\">Owner</th></tr></thead><tbody>"
    );
    for s in &o.in_flight {
        let progress = match percent(s.received, s.total) {
            Some(p) => format!(
                "<span class=\"bar\"><progress max=\"100\" value=\"{p}\">{p}%</progress> <span class=\"percent\">{p}%</span></span>"
            ),
            None => "<span class=\"muted\">size not known yet</span>".to_owned(),
        };
        let total = s.total.map_or_else(|| "?".to_owned(), bytes_nb);
        let rate = rate(s).map_or_else(|| "–".to_owned(), |r| format!("{}/s", bytes_nb(r)));
        let _ = write!(
            html,
            "<tr class=\"session\" data-session=\"{id}\" data-received=\"{received}\" \
             data-total=\"{total_raw}\"><td class=\"name\">{dest}<br><span class=\"muted id\">{id}</span></td>\
             <td>{progress}</td><td class=\"num\">{} / {total}</td><td class=\"wide num\">{rate}</td><td class=\"num\">{}</td>\
             <td class=\"wide\">{}</td></tr>",
            bytes_nb(s.received),
            duration(o.now_ms.saturating_sub(s.last_activity_ms)),
            owner_cell(s.owner.as_deref(), s.peer.as_deref()),
            id = s.id,
            received = s.received,
            total_raw = s.total.map_or_else(String::new, |t| t.to_string()),
            dest = escape(&s.destination),
        );
    }
    let _ = write!(html, "</tbody></table></div>");
}

fn deferred(html: &mut String, o: &Overview) {
    if o.deferred.is_empty() {
        return;
    }
    let _ = write!(
        html,
        "<h2>Deferred commits</h2><div class=\"wrap\"><table id=\"deferred\"><thead><tr>\
         <th>Destination</th><th>Status</th><th>Attempts</th><th>Last error</th></tr></thead><tbody>"
    );
    for s in &o.deferred {
        let Some(d) = &s.deferred else { continue };
        let _ = write!(
            html,
            "<tr><td class=\"name\">{}</td><td>{:?}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.destination),
            d.status,
            d.attempts,
            escape(d.last_error.as_deref().unwrap_or("")),
        );
    }
    let _ = write!(html, "</tbody></table></div>");
}

fn recent(html: &mut String, o: &Overview) {
    let _ = write!(html, "<h2>Recently ended</h2>");
    if o.recent.is_empty() {
        let _ = write!(html, "<p class=\"muted\">None.</p>");
        return;
    }
    let _ = write!(
        html,
        "<div class=\"wrap\"><table id=\"recent\"><thead><tr><th>Destination</th><th>How</th>\
         <th>Bytes</th><th>Ended</th><th class=\"wide\">Owner</th></tr></thead><tbody>"
    );
    for e in &o.recent {
        let EndedSession {
            destination,
            owner,
            received,
            total,
            reason,
            ended_ms,
            committed,
            ..
        } = e;
        let how = if *committed {
            format!("{} (committed)", reason.as_str())
        } else {
            reason.as_str().to_owned()
        };
        let _ = write!(
            html,
            "<tr class=\"ended\" data-session=\"{}\"><td class=\"name\">{}</td><td>{how}</td>\
             <td class=\"num\">{} / {}</td><td class=\"num\">{} ago</td><td class=\"wide\">{}</td></tr>",
            e.id,
            escape(destination),
            bytes_nb(*received),
            total.map_or_else(|| "?".to_owned(), bytes_nb),
            duration(o.now_ms.saturating_sub(*ended_ms)),
            owner_cell(owner.as_deref(), None),
        );
    }
    let _ = write!(html, "</tbody></table></div>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{EndReason, SessionState};
    use crate::session::SessionId;

    fn session(
        destination: &str,
        owner: Option<&str>,
        received: u64,
        total: Option<u64>,
    ) -> SessionInfo {
        SessionInfo {
            id: SessionId::new(),
            state: SessionState::Receiving,
            destination: destination.into(),
            owner: owner.map(Into::into),
            peer: None,
            content_name: None,
            received,
            total,
            staged_bytes: received,
            committed: false,
            created_ms: 1_000,
            last_activity_ms: 3_000,
            expires_ms: None,
            node: None,
            reply: None,
            deferred: None,
        }
    }

    fn overview(in_flight: Vec<SessionInfo>, recent: Vec<EndedSession>) -> Overview {
        Overview {
            now_ms: 10_000,
            open: in_flight.len(),
            bytes_received: in_flight.iter().map(|s| s.received).sum(),
            bytes_expected: in_flight.iter().filter_map(|s| s.total).sum(),
            in_flight,
            deferred: Vec::new(),
            recent,
            running: true,
        }
    }

    #[test]
    fn escapes_every_markup_character() {
        assert_eq!(
            escape(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape("plain/ö.bin"), "plain/ö.bin");
    }

    #[test]
    fn client_controlled_names_appear_only_escaped() {
        let evil = r#"<img src=x onerror="alert(1)">.bin"#;
        let owner = "<b>mallory</b>";
        let ended = EndedSession {
            id: SessionId::new(),
            destination: format!("old/{evil}"),
            owner: Some(owner.into()),
            received: 1,
            total: Some(1),
            committed: true,
            reason: EndReason::Closed,
            ended_ms: 9_000,
        };
        let html = render(&overview(
            vec![session(evil, Some(owner), 5, Some(10))],
            vec![ended],
        ));
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<b>mallory"), "{html}");
        assert!(html.contains("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.bin"));
        assert!(html.contains("&lt;b&gt;mallory&lt;/b&gt;"));
    }

    #[test]
    fn shows_progress_rate_and_idle_time() {
        let html = render(&overview(
            vec![session("a.bin", None, 512 << 10, Some(1 << 20))],
            Vec::new(),
        ));
        assert!(
            html.contains("<progress max=\"100\" value=\"50\">"),
            "{html}"
        );
        assert!(html.contains("512.0&nbsp;KiB / 1.0&nbsp;MiB"), "{html}");
        // 512 KiB over the 2 s between creation and the last packet.
        assert!(html.contains("256.0&nbsp;KiB/s"), "{html}");
        assert!(html.contains(">7 s</td>"), "{html}");
        assert!(html.contains("anonymous"));
    }

    #[test]
    fn unknown_sizes_and_empty_lists_read_well() {
        let html = render(&overview(vec![session("a.bin", None, 0, None)], Vec::new()));
        assert!(html.contains("size not known yet"));
        let html = render(&overview(Vec::new(), Vec::new()));
        assert!(html.contains("No open sessions."));
    }

    #[test]
    fn human_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(59_999), "59 s");
        assert_eq!(duration(200_000), "3 m 20 s");
        assert_eq!(duration(7_200_000), "2 h 0 m");
        assert_eq!(duration(90_000_000), "1 d 1 h");
        assert_eq!(percent(1, Some(3)), Some(33));
        assert_eq!(percent(0, Some(0)), Some(100));
        assert_eq!(percent(u64::MAX, Some(u64::MAX)), Some(100));
    }
}
