//! What axum-bits promises, and what it does not. Documentation only: this module has no items.
//!
//! Each guarantee names the tests that check it (in `tests/`, or a unit test in `src/` where
//! noted); the README keeps a one-line summary of each.
//!
//! # Every packet gets an Ack
//!
//! A `BITS_POST` under the prefix is answered with `BITS-Packet-Type: Ack`,
//! `Content-Length: 0` and, for errors, `BITS-Error-Code` and `BITS-Error-Context` with the
//! status of the protocol's table (see
//! [what clients are told](crate::BitsLayerBuilder#what-clients-are-told)): never a panic, a
//! bare 500 or a hung request. `tests/malformed.rs` (`malformed_packet_storm`) sends 10,000+
//! generated malformed packets at a live server; `tests/protocol.rs` checks the protocol's answers;
//! the `fuzz/` targets feed the parsers. The exceptions are HTTP-level: a request hyper cannot
//! parse (bad method token, header block over its limits: 431, target over its limit: 414),
//! and a fragment over [`max_fragment_size`](crate::BitsLayerBuilder::max_fragment_size)
//! (plain 413, which makes Windows shrink its fragments).
//!
//! # An acknowledged byte survives a crash of the process
//!
//! It is in the part file before its Ack, and the record never claims more than the part
//! holds: the part is the ground truth, and both the fragment path and recovery rewind a
//! record that is ahead of its data. A SIGKILL at any moment loses nothing acknowledged:
//! `concurrent_uploads_survive_sigkills_at_random_moments` (`tests/crash.rs`) kills the server
//! 50+ times during concurrent uploads, and every file is byte-identical afterwards with no
//! part or record left; `tests/restart.rs`
//! (`resumes_after_sigkill_between_and_during_fragments`,
//! `sigkill_with_half_a_fragment_sent_then_after_the_final_ack`) kills it at chosen points.
//! The record is written only after the bytes it claims: on the default stores a fragment's
//! last write and the record's update share one blocking call, bytes first, and a fragment
//! whose bytes cannot be written leaves the record where it was
//! (`a_fragment_whose_bytes_cannot_be_written_leaves_the_record_where_it_was`,
//! `tests/faults.rs`; `update_after_writes_the_record_only_after_the_work_before_it_succeeded`,
//! a unit test in `src/store/file.rs`).
//!
//! **Power loss** is covered only with
//! [`sync_data(true)`](crate::BitsLayerBuilder::sync_data) (an fsync of the fragment's data
//! and its record before each Ack; `sync_data_uploads_work` runs uploads with it, a power
//! loss itself is not simulated). Without it, a power loss can
//! lose the page cache's last seconds; recovery then rewinds those sessions to what is on
//! disk, and clients resend the rest
//! (`restart_after_losing_unsynced_part_data_resumes_from_the_data`; a session whose record
//! was caught half-written on disk is dropped: its client starts over). It costs 15% of the
//! throughput with 8 MiB fragments and about 40% with 64 KiB ones on the development machine
//! (`benches/README.md` in the repository has the numbers); Windows clients send fragments of
//! up to about 13 MB, so the cost is nearer the first figure for large files on a fast link.
//!
//! # A destination is absent or complete
//!
//! Files are committed by fsync, an atomic no-clobber link (or a rename when overwrites are
//! allowed) and an fsync of the folder (with
//! [`sync_on_commit(false)`](crate::BitsLayerBuilder::sync_on_commit) the two fsyncs are
//! skipped: still atomic against a crash of the process, not against a power loss;
//! `write_commit_no_clobber` and `commit_without_fsync_is_still_a_no_clobber_move`, unit
//! tests in `src/staging/local.rs`). An existing file is never replaced unless overwrites are
//! allowed, checked at Create-Session and again at the commit
//! (`existing_file_without_overwrites_is_access_denied`, `tests/protocol.rs`). A commit that
//! runs out of space leaves no partial file
//! (`commit_out_of_space_is_transient_leaves_no_partial_file_and_the_retry_commits`,
//! `tests/faults.rs`). A crash between the move and its record is recognised, by recovery or by
//! the next packet, as a finished commit
//! (`a_commit_that_finished_before_a_crash_is_recognised_without_recovery`,
//! `tests/lifecycle.rs`).
//!
//! # Nothing leaks
//!
//! Close, Cancel and expiry delete staged data and replies; disabling uploads deletes every
//! session of the prefix (`disabled_uploads_get_501_and_their_sessions_are_cleaned_up`). At
//! start-up ([`Sweeper::run`](crate::Sweeper::run), or
//! [`BitsHandle::recover`](crate::BitsHandle::recover)) a recovery scan deletes parts and
//! replies no open session owns, recreates a part that vanished (the session restarts from
//! byte 0), rewinds offsets ahead of their data, and records finished commits; one log line
//! says what it did (`recovery_repairs_what_a_crash_left_behind`,
//! `recovery_removes_orphan_replies`, `tests/lifecycle.rs`).
//!
//! # Orderly shutdown loses nothing
//!
//! [`BitsHandle::shutdown`](crate::BitsHandle::shutdown) refuses new sessions, lets fragments
//! in flight finish or stops them at a frame boundary with their offset recorded, and deletes
//! nothing; every open session resumes after a restart
//! (`shutdown_refuses_new_sessions_and_lets_fragments_in_flight_finish`,
//! `shutdown_stops_a_stalled_fragment_at_the_deadline_and_the_client_resumes`,
//! `tests/lifecycle.rs`; `shutdown_composes_with_the_accept_loop`, `tests/serving.rs`).
//!
//! # Faults are transient for the client
//!
//! Disk full is 500 `0x80070070` with the true offset: the client retries and resumes
//! (`real_full_disk_acks_disk_full_keeps_acknowledged_bytes_and_resumes`). A failing store is
//! 500 `0x80004005` (`store_outage_gets_transient_acks_and_the_client_carries_on`). A client
//! that vanishes mid-body keeps what arrived
//! (`client_closing_mid_body_keeps_at_most_what_arrived_and_the_upload_resumes`). A body that
//! stalls for [`body_idle_timeout`](crate::BitsLayerBuilder::body_idle_timeout) (60 s) is cut
//! off with 408 and what arrived is kept
//! (`fifty_stalled_bodies_are_cut_off_while_an_upload_proceeds`; all four in
//! `tests/faults.rs`). With [`axum_bits::serve`](crate::serve), headers that take longer than
//! the header read timeout close the connection, so a slow-loris cannot hold the server
//! (`slow_loris_cannot_hold_the_server`, `tests/serving.rs`).
//!
//! # A trickled body cannot hold a connection or its session
//!
//! After [`body_rate_grace`](crate::BitsLayerBuilder::body_rate_grace) (30 s) a fragment body
//! must average [`min_body_rate`](crate::BitsLayerBuilder::min_body_rate) (1 KiB/s, an eighth
//! of a 64 kbit/s link), or it is cut off with 408 `0x800705B4` and
//! `BITS-Received-Content-Range`; what arrived is kept
//! (`a_trickled_fragment_is_cut_off_with_408_and_keeps_what_arrived`). A packet whose body is
//! not used (a Ping, Create-, Close- or Cancel-Session with a body, a refused Fragment) is
//! answered at once; its body is then read in the background at the same pace, up to 64 KiB
//! (32 MiB for a fragment), and the connection is closed if it is not
//! (`a_packet_whose_body_is_not_used_is_answered_at_once`). With 1,000 connections trickling
//! bodies, another client's Pings took about 1.5 ms (p50) and under 80 ms (max) on the 2-core
//! development VM, the trickled Pings were answered within 0.2 s and the trickled fragments
//! cut off 2 s after their grace period began
//! (`a_thousand_trickling_connections_leave_the_server_responsive`). All three are in
//! `tests/abuse.rs`.
//!
//! # Paths never escape the root
//!
//! The URL is percent-decoded once (a `%` not followed by two hex digits is 400 `0x80070057`);
//! only plain names are accepted (no `..`, `.`, `\`, `:`, NUL, control characters, `<>|"*?`,
//! trailing dots or spaces, Windows device names including `COM¹`–`LPT³`; at most 255 bytes a
//! name and 1,024 a path; see [`destination`](crate::destination)). The `.bits` folder is
//! reserved at every depth and in every spelling a case-insensitive or normalizing filesystem
//! could take for it (Unicode case folding and compatibility forms, invisible characters:
//! `.bit%C5%BF` with a long s is 403 too;
//! `the_servers_own_folder_is_forbidden_in_any_unicode_spelling`,
//! `malformed_percent_escapes_are_invalid_arg`, `encoded_traversal_is_refused_with_invalid_arg`,
//! `windows_device_names_and_invalid_characters_are_refused`, all in `tests/security.rs`).
//!
//! On Unix the default staging never follows a symbolic link inside the upload tree: the root
//! (as configured, even if it is itself a link) and the staging and reply folders are opened
//! once at start-up; each operation (the Create-Session check, the commit's link or rename and
//! its fsync of the folder, recovery's checks) opens the destination's folder beneath the
//! root's handle without following links (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS` on Linux, otherwise one `O_NOFOLLOW` folder at a time;
//! `create_directories` creates missing ones the same way) and acts on that handle only. So a
//! folder on the way that is a symbolic link, or is swapped for one at any moment, is refused
//! with 403 `E_ACCESSDENIED`, and a symbolic link at the destination is an existing file:
//! refused without overwrites, replaced (never written through) with them
//! (`folder_swapped_for_a_link_mid_upload_is_not_followed`,
//! `file_link_out_of_the_root_is_replaced_not_written_through`, `tests/security.rs`;
//! `swapped_folder_never_leads_a_commit_outside_the_root` and
//! `swapped_folder_never_leads_an_overwrite_outside_the_root`, `tests/escape.rs`, race 300
//! commits against a folder swapped back and forth with a link out of the root; and the
//! `destination` fuzz target). On Windows the checks are by path and not atomic with the
//! commit. Part, record and reply files are created `0600`; a committed file gets `0644`
//! (`staged_files_are_private_and_the_result_is_not_world_writable`).
//!
//! # A session belongs to its creator
//!
//! An authentication layer in front of the BITS layer puts an [`Owner`](crate::Owner) into the
//! request extensions; packets for another owner's session get exactly the answer of a session
//! that does not exist (`another_owner_cannot_tell_a_session_from_an_unknown_one`,
//! `tests/security.rs`), and replies are served only to their owner
//! (`reply_download_ranges_and_owner`, `tests/upload_reply.rs`). Without an `Owner`, session
//! ids (random v4 GUIDs) are the only capability.
//!
//! # The server connects only where the operator says
//!
//! Notifications go to the configured URL (a relative one resolves against
//! [`public_origin`](crate::BitsLayerBuilder::public_origin), and is refused without it); no
//! `Host` header, absolute-form request target, upload path or query a client sends changes
//! where the server connects (`notifications_go_only_where_the_operator_says`,
//! `tests/upload_reply.rs`, has a recording internal service that must receive nothing; see
//! [where notifications go](crate::Notification#where-notifications-go)). What still comes
//! from the request are URLs handed back to the client: reply URLs and
//! `BITS-Original-Request-URL` use the request's `Host` (never one with user info) unless
//! `public_origin` is set. Behind a proxy, set `public_origin`, and have the proxy accept only
//! the host names it serves. A reply file the notification writes is never written through a
//! symbolic link (`a_link_in_place_of_the_reply_file_is_not_written_through`, a unit test in
//! `src/completion/notification/exchange.rs`).
//!
//! # Bounded
//!
//! Open sessions ([`max_sessions`](crate::BitsLayerBuilder::max_sessions), 1024) and sessions
//! per owner ([`max_sessions_per_owner`](crate::BitsLayerBuilder::max_sessions_per_owner), 50,
//! as IIS; `per_owner_session_limit`, `tests/lifecycle.rs`) are capped: beyond them
//! Create-Session gets 503 `0x80070045` (transient). Anonymous sessions are capped per client
//! address ([`max_sessions_per_peer`](crate::BitsLayerBuilder::max_sessions_per_peer), 100; an
//! IPv6 address counts by its /64) when the request carries the address: `axum_bits::serve`
//! provides it, with `axum::serve` use `into_make_service_with_connect_info::<SocketAddr>()`,
//! and behind a proxy insert an [`PeerAddr`](crate::PeerAddr) from the proxy's forwarding
//! header yourself, otherwise every client has the proxy's address
//! (`one_anonymous_address_cannot_fill_the_server`). A full server reclaims the place of a
//! session that never received a byte and has been idle for
//! [`reclaim_empty_after`](crate::BitsLayerBuilder::reclaim_empty_after) (60 s)
//! (`a_full_server_reclaims_sessions_that_never_received_a_byte`). A session idle for
//! [`session_timeout`](crate::BitsLayerBuilder::session_timeout) is answered as gone (500
//! `0x8020001F`) at its next packet, and its data deleted then, whatever the sweep interval
//! (`a_session_past_its_timeout_is_gone_at_its_next_packet`).
//!
//! What ended sessions leave behind is bounded on every store: a closed or cancelled session
//! shrinks to a compact tombstone (about 320 bytes in the [`FileStore`](crate::store::FileStore))
//! that answers repeats for
//! [`tombstone_retention`](crate::BitsLayerBuilder::tombstone_retention) (24 hours: a client
//! whose Close-Session Ack was lost retries after 10 minutes by default, later if it went
//! offline, and without the tombstone it would start the whole upload over), at most
//! [`max_tombstones_per_owner`](crate::BitsLayerBuilder::max_tombstones_per_owner) (256) per
//! owner or address and [`max_tombstones`](crate::BitsLayerBuilder::max_tombstones) (8,192) in
//! all, oldest forgotten first, enforced every 64 ended sessions and at each sweep. 20,000
//! Create/Cancel cycles on one connection leave at most 320 record files and a flat memory
//! (`twenty_thousand_create_cancel_cycles_leave_storage_and_memory_flat`; the same bound on
//! the memory, file, SQLite, PostgreSQL and Redis stores: `churn_is_bounded_on_the_*_store`;
//! all of these in `tests/abuse.rs`).
//!
//! Header values over 4 KB are 400 `0x80070057`
//! (`header_value_over_4096_bytes_is_invalid_arg`); fragments over `max_fragment_size`
//! (16 MiB) get 413 (`fragment_over_max_fragment_size_gets_a_plain_413`); files over
//! [`max_upload_size`](crate::BitsLayerBuilder::max_upload_size) get 500 `0x80200020`
//! (`total_over_max_upload_size_is_too_large`; unlimited by default: set it), all three in
//! `tests/security.rs`. Memory does not grow with file or fragment size: that one is measured
//! rather than tested, by part (d) of `cargo bench --bench throughput` (about 10 MiB of peak
//! RSS for 1 GiB and for 4 GiB).
//!
//! With [`axum_bits::serve`](crate::serve) the connections' read buffers are bounded
//! ([`Serve::read_buffers`](crate::Serve::read_buffers)): at most 64 connections at a time
//! may grow theirs to hyper's default of about 400 KiB, the others read into 16 KiB, and a
//! slot comes back when its connection closes
//! (`read_buffers_are_full_only_for_the_first_connections_and_come_back`, `tests/serving.rs`).
//! With 1,000 slow clients uploading at once the example server stays under 100 MiB of RSS:
//! measured rather than tested, by part (c) of `cargo bench --bench throughput`.
//!
//! # On object storage
//!
//! With `S3Staging` (feature `s3`) the same lines hold, with the bucket in place of the
//! disk. An acknowledged byte is stored in the bucket before its Ack (a whole part, or a tail
//! object), so a node that dies in the middle of a fragment is taken over by another that
//! shares only the session store and the bucket, and the file comes out byte-identical
//! (`no_shared_filesystem_postgres`, `no_shared_filesystem_redis` in `tests/farm.rs`;
//! `another_node_takes_over_in_the_middle_of_a_fragment`,
//! `a_node_whose_memory_of_the_session_is_stale` in `tests/staging_s3.rs`). No step deletes a
//! tail before the part that holds its bytes is stored and recorded
//! (`a_fragment_resent_from_inside_an_uploaded_part`). A key that appears at the destination
//! during the upload is never replaced without overwrites: the publish is a conditional PUT, a
//! completion in place with `If-None-Match: *`, or a conditional multipart copy
//! (`a_key_that_appears_during_the_upload_is_not_replaced`, and the racing commits and
//! `parts_created_for_their_destination` of `staging::conformance`); a completion whose
//! answer was lost is recognised as done by its ETag, and someone else's object is not
//! (`a_completion_whose_answer_is_lost_is_recognised`). Recovery deletes the objects and
//! aborts the upload of a session that has no record, and disabling uploads deletes every
//! session's (`recovery_and_disabling_clean_the_bucket`), as does expiry
//! (`expired_sessions_leave_nothing_in_the_bucket`). Replies of upload-reply sessions are
//! kept in the bucket, served by any node and deleted with the session
//! (`any_node_serves_a_reply_kept_in_the_bucket`). Cancel and expiry abort the multipart upload
//! and delete every staged object: 1,000 cancelled uploads leave no object and no open
//! multipart upload (`a_thousand_cancelled_uploads_leave_nothing`). An unreachable store, a
//! 503 and a full bucket are transient Acks with the held offset (500 `E_FAIL`, 500
//! `ERROR_DISK_FULL`), and one session waiting on a slow store does not hold up another
//! (`an_unreachable_or_failing_object_store_is_a_transient_error`). What a crash at each step
//! leaves behind, and what cleans it, is the table in `S3Staging`'s docs; the bucket needs a
//! lifecycle rule that aborts incomplete multipart uploads for the one case nothing records.
//!
//! # Operations never expose what a client controls
//!
//! The status page of [`admin::router`](crate::admin::router) escapes every file and owner
//! name and forbids scripts by its `Content-Security-Policy`
//! (`the_status_page_shows_client_names_as_text` in `tests/admin.rs`,
//! `client_controlled_names_appear_only_escaped`), also as a real browser renders it
//! (`tests/browser.rs`). No metric label carries a session id, an owner, a file name or a URL,
//! and each metric counts what happened (`a_scripted_upload_records_what_happened` in
//! `tests/metrics.rs`). The admin router is never mounted by the layer: the application mounts
//! it behind its own authentication. An operator's cancel deletes the session's data as
//! Cancel-Session does (`an_operator_cancels_a_session_and_its_data_goes`). Readiness turns
//! 503 while draining or disabled (`readiness_follows_draining_disabling_and_free_space`),
//! and a hung store fails it within its timeout rather than hanging the probe
//! (`readiness_fails_fast_when_the_store_is_down_or_hangs` in `tests/faults.rs`).
//!
//! # Not promised
//!
//! * Rate limiting per client, TLS, and authentication itself: put tower or proxy layers in
//!   front.
//! * Anonymous sessions without a client address in the request (no `PeerAddr`, no
//!   `ConnectInfo`) are bounded only by the global limit and the reclaiming of empty sessions.
//! * Two processes must not share one `FileStore` directory; a farm needs a shared store (see
//!   [running a farm](crate::store#running-a-farm)).
//! * Power-loss durability without `sync_data(true)`.
//! * Hyper-level rejections (431, 414, a malformed request line) are not BITS Acks.
//! * A completion handler or notification that never returns delays that session (up to the
//!   notification timeouts), and shutdown waits for it only 5 s past its grace period.
