//! HRESULTs, the error codes of `BITS-Error-Code`: each known code's constant, symbolic name and
//! description come from one table.

use std::fmt;

use http::StatusCode;

/// An HRESULT as carried by `BITS-Error-Code`, formatted `0x` + 8 upper-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hresult(pub u32);

/// Declares the known codes: a constant each, and the table [`Hresult::name`] and
/// [`Hresult::description`] read.
macro_rules! known_codes {
    ($(
        $(#[$doc:meta])*
        $constant:ident = $value:literal, $name:literal, $description:literal;
    )*) => {
        impl Hresult {
            $(
                $(#[$doc])*
                pub const $constant: Self = Self($value);
            )*
        }

        /// `(code, symbolic name, description)` of every known code.
        const KNOWN: &[(u32, &str, &str)] = &[$(($value, $name, $description)),*];
    };
}

known_codes! {
    /// No error; paired with 416 as [MC-BUP] does.
    S_OK = 0, "S_OK", "no error";
    /// `E_INVALIDARG`: the request is malformed or refers to something invalid. Fatal.
    E_INVALIDARG = 0x8007_0057, "E_INVALIDARG", "the server rejected the request as invalid";
    /// `E_ACCESSDENIED`: not allowed (403), or uploads disabled (501). Fatal.
    E_ACCESSDENIED = 0x8007_0005, "E_ACCESSDENIED",
        "access denied: not allowed to write this URL, the file exists and may not be \
         overwritten, or BITS uploads are not enabled here";
    /// `E_FAIL`: an unspecified server-side failure; sent with 500 so the client retries.
    E_FAIL = 0x8000_4005, "E_FAIL", "the server failed for an unspecified reason";
    /// `BG_E_SESSION_NOT_FOUND`: the session id is unknown; the client starts a new session.
    BG_E_SESSION_NOT_FOUND = 0x8020_001F, "BG_E_SESSION_NOT_FOUND",
        "the server does not know the upload session (expired or lost)";
    /// `BG_E_TOO_LARGE`: the file is larger than the server accepts. Fatal.
    BG_E_TOO_LARGE = 0x8020_0020, "BG_E_TOO_LARGE", "the file is larger than the server accepts";
    /// `BG_E_INVALID_SERVER_RESPONSE`: what a client reports when an answer breaks the protocol.
    BG_E_INVALID_SERVER_RESPONSE = 0x8020_001B, "BG_E_INVALID_SERVER_RESPONSE",
        "the server's answer did not follow the BITS protocol";
    /// `BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH`: client and server share no upload protocol.
    BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH = 0x8020_0022, "BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH",
        "client and server have no upload protocol in common";
    /// `BG_E_LOCAL_FILE_CHANGED`: what a client reports when its file changed mid-upload.
    BG_E_LOCAL_FILE_CHANGED = 0x8020_001D, "BG_E_LOCAL_FILE_CHANGED",
        "the local file changed while it was being uploaded";
    /// `HRESULT_FROM_WIN32(ERROR_DISK_FULL)`: the server is out of space. Transient.
    DISK_FULL = 0x8007_0070, "ERROR_DISK_FULL", "the server is out of disk space";
    /// `HRESULT_FROM_WIN32(ERROR_PATH_NOT_FOUND)`: the destination's folder does not exist.
    PATH_NOT_FOUND = 0x8007_0003, "ERROR_PATH_NOT_FOUND",
        "the destination folder does not exist on the server";
    /// `HRESULT_FROM_WIN32(ERROR_SHARING_VIOLATION)`: another session is uploading the same
    /// destination.
    SHARING_VIOLATION = 0x8007_0020, "ERROR_SHARING_VIOLATION",
        "another upload to the same destination is in progress";
    /// `HRESULT_FROM_WIN32(ERROR_TOO_MANY_SESS)`: the server's session limit is reached.
    TOO_MANY_SESSIONS = 0x8007_0045, "ERROR_TOO_MANY_SESS",
        "the server has too many upload sessions open";
    /// `HRESULT_FROM_WIN32(ERROR_TIMEOUT)`: the fragment body stalled, or the server
    /// application did not answer in time. ([MC-BUP] prints `0x80070112` for the latter, which
    /// decodes to an unrelated Win32 error; the client only displays the code, the 408 status
    /// is what makes it retry.)
    TIMEOUT = 0x8007_05B4, "ERROR_TIMEOUT",
        "the server (or its application) did not finish in time";
    /// The code [MC-BUP] prints for an application timeout (see [`Hresult::TIMEOUT`]).
    TIMEOUT_AS_PRINTED_BY_MC_BUP = 0x8007_0112, "ERROR_TIMEOUT (as printed by MC-BUP)",
        "the server (or its application) did not finish in time";
    /// `HRESULT_FROM_WIN32(ERROR_FILE_EXISTS)`: the destination exists (transient form).
    FILE_EXISTS = 0x8007_0050, "ERROR_FILE_EXISTS", "the destination file already exists";
    /// `HRESULT_FROM_WIN32(ERROR_SHUTDOWN_IN_PROGRESS)`: the server is shutting down (sent
    /// with 503, so the client retries later).
    SHUTTING_DOWN = 0x8007_045B, "ERROR_SHUTDOWN_IN_PROGRESS", "the server is shutting down";
    /// `ERROR_BUSY`: another server node is working on the session (503; the client retries).
    BUSY = 0x8007_00AA, "ERROR_BUSY", "another server node is busy with this session";
}

impl Hresult {
    /// `BG_E_HTTP_ERROR_<status>` (`0x80190000 + status`): how an application's HTTP status
    /// is relayed to the client.
    pub fn http_error(status: StatusCode) -> Self {
        Self(0x8019_0000 + u32::from(status.as_u16()))
    }

    /// The HTTP status a `BG_E_HTTP_ERROR_<status>` code relays, if this is one.
    pub fn relayed_http_status(self) -> Option<StatusCode> {
        let status = self.0.checked_sub(0x8019_0000)?;
        u16::try_from(status)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
    }

    fn known(self) -> Option<&'static (u32, &'static str, &'static str)> {
        KNOWN.iter().find(|(code, ..)| *code == self.0)
    }

    /// The symbolic name of a code a BITS server sends or a BITS client reports, if known
    /// (`BG_E_SESSION_NOT_FOUND`, `E_INVALIDARG`, ...).
    pub fn name(self) -> Option<&'static str> {
        match self.known() {
            Some((_, name, _)) => Some(name),
            None => self.relayed_http_status().map(|_| "BG_E_HTTP_ERROR"),
        }
    }

    /// What the code means, in a sentence a person can act on; `None` for unknown codes.
    pub fn description(self) -> Option<String> {
        match self.known() {
            Some((_, _, description)) => Some((*description).to_owned()),
            None => self
                .relayed_http_status()
                .map(|s| format!("the server application answered HTTP {s}")),
        }
    }
}

impl fmt::Display for Hresult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("0x0")
        } else {
            write!(f, "0x{:08X}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_known_code_is_listed_once_with_a_name_and_a_description() {
        let codes: HashSet<u32> = KNOWN.iter().map(|(code, ..)| *code).collect();
        assert_eq!(codes.len(), KNOWN.len(), "a code is listed twice");
        for (code, name, description) in KNOWN {
            assert!(!name.is_empty() && !description.is_empty(), "{code:#x}");
            assert_eq!(Hresult(*code).name(), Some(*name));
            assert!(Hresult(*code).relayed_http_status().is_none(), "{code:#x}");
        }
        assert_eq!(Hresult::DISK_FULL.name(), Some("ERROR_DISK_FULL"));
        assert_eq!(
            Hresult::BUSY.description().as_deref(),
            Some("another server node is busy with this session")
        );
    }

    #[test]
    fn relayed_http_statuses() {
        let code = Hresult::http_error(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(code, Hresult(0x8019_01F7));
        assert_eq!(
            code.relayed_http_status(),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(code.name(), Some("BG_E_HTTP_ERROR"));
        assert_eq!(Hresult(0x8019_0063).relayed_http_status(), None);
    }
}
