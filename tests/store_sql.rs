//! The SQL stores: the conformance suite against each, plus what the suite cannot see: records
//! surviving a reopen, several stores (processes, nodes) sharing one database, migrations, and
//! failures that must be errors rather than panics or hangs.
//!
//! PostgreSQL tests need a server: `AXUM_BITS_TEST_POSTGRES_URL` (`.ci/services.sh` starts one
//! and exports it). Without it they are skipped, except under CI, where they fail. Each test
//! uses tables of its own (a random prefix) and drops them at the end.

#![cfg(all(feature = "conformance", any(feature = "sqlite", feature = "postgres")))]

use axum_bits::store::{SessionStore, StoreError, conformance};

/// What one store writes the other reads, and a lease one holds the other cannot take.
async fn records_and_leases_across<S: SessionStore>(a: &S, b: &S) {
    let record = conformance::fresh_record("shared.bin");
    a.create(&record).await.unwrap();
    assert_eq!(b.load(record.id).await.unwrap().as_ref(), Some(&record));
    let mut next = record.clone();
    next.revision = 1;
    next.received = 10;
    b.update(0, &next).await.unwrap();
    assert!(
        matches!(a.update(0, &next).await, Err(StoreError::Conflict)),
        "compare-and-set holds across stores"
    );
    assert_eq!(a.load(record.id).await.unwrap(), Some(next));

    let ttl = std::time::Duration::from_secs(60);
    assert!(a.acquire_lease(record.id, "node-a", ttl).await.unwrap());
    assert!(
        !b.acquire_lease(record.id, "node-b", ttl).await.unwrap(),
        "a lease held through one store is refused through the other"
    );
    assert!(a.acquire_lease(record.id, "node-a", ttl).await.unwrap());
    b.release_lease(record.id, "node-a").await.unwrap();
    assert!(
        b.acquire_lease(record.id, "node-b", ttl).await.unwrap(),
        "a lease released through one store can be taken through the other"
    );
    assert!(!a.acquire_lease(record.id, "node-a", ttl).await.unwrap());

    assert!(b.remove(record.id).await.unwrap());
    assert_eq!(a.load(record.id).await.unwrap(), None);
    assert!(
        a.acquire_lease(record.id, "node-a", ttl).await.unwrap(),
        "removing a record drops its lease"
    );
    a.release_lease(record.id, "node-a").await.unwrap();
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use axum_bits::session::Phase;
    use axum_bits::store::{SessionStore, SqliteStore, StoreError, conformance};

    async fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(dir.path().join("sessions.db"))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        conformance::run(Arc::new(open(&dir).await)).await;
        eprintln!("sqlite conformance: {:?}", started.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_in_memory_pool_conformance() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        let store = SqliteStore::from_pool(pool);
        store.migrate().await.unwrap();
        conformance::run(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn sqlite_records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut record = conformance::fresh_record("kept.bin");
        store.create(&record).await.unwrap();
        let mut next = record.clone();
        next.revision = 1;
        next.received = 4096;
        store.update(0, &next).await.unwrap();
        record = next;
        let mut closed = conformance::fresh_record("closed.bin");
        closed.phase = Phase::Closed;
        store.create(&closed).await.unwrap();
        store.close().await.unwrap();
        assert!(
            store.load(record.id).await.is_err(),
            "a closed store refuses work"
        );
        drop(store);

        let store = open(&dir).await;
        assert_eq!(store.load(record.id).await.unwrap().as_ref(), Some(&record));
        assert_eq!(store.list().await.unwrap().len(), 2);
        assert_eq!(store.count_open().await.unwrap(), 1);
        // The reopened store still refuses a second claim on the destination.
        let mut rival = conformance::fresh_record("kept.bin");
        rival.destination = record.destination.clone();
        assert!(matches!(
            store.create(&rival).await,
            Err(StoreError::DestinationBusy { holder }) if holder == record.id
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_two_stores_on_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(&dir).await;
        let b = open(&dir).await;
        super::records_and_leases_across(&a, &b).await;
        conformance::races_across(&[Arc::new(a), Arc::new(b)]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_migrate_is_idempotent_and_concurrent() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let record = conformance::fresh_record("migrated.bin");
        store.create(&record).await.unwrap();
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        assert!(store.load(record.id).await.unwrap().is_some());
        let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM bits_schema")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert_eq!(versions, [1]);

        // Several processes opening one new file at once: the first opener switches the file
        // to WAL, and the others must wait for it rather than fail. The losing interleaving is
        // rare, hence the rounds (without the retry in `open`, a handful of rounds fail).
        for round in 0..50 {
            let fresh = dir.path().join(format!("fresh-{round}.db"));
            let opens: Vec<_> = (0..8)
                .map(|_| tokio::spawn(SqliteStore::open(fresh.clone())))
                .collect();
            for open in opens {
                let store = open.await.unwrap().unwrap();
                assert_eq!(store.count_open().await.unwrap(), 0);
            }
        }
    }

    #[tokio::test]
    async fn sqlite_table_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        for bad in [
            "",
            "1abc",
            "bits-",
            "a b",
            "x;DROP TABLE y;",
            &"a".repeat(33),
        ] {
            match store.clone().with_table_prefix(bad) {
                Err(StoreError::Backend(e)) => {
                    assert!(e.to_string().contains("table prefix"), "{bad:?}: {e}")
                }
                other => panic!("prefix {bad:?} must be refused, got {other:?}"),
            }
        }
        let other = store.clone().with_table_prefix("other_").unwrap();
        other.migrate().await.unwrap();
        let record = conformance::fresh_record("prefixed.bin");
        other.create(&record).await.unwrap();
        assert_eq!(store.load(record.id).await.unwrap(), None);
        assert!(other.load(record.id).await.unwrap().is_some());
        // The same destination is free in the other tables.
        store.create(&record).await.unwrap();
    }

    #[tokio::test]
    async fn sqlite_corrupt_record_is_a_backend_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let damaged = conformance::fresh_record("damaged.bin");
        let intact = conformance::fresh_record("intact.bin");
        store.create(&damaged).await.unwrap();
        store.create(&intact).await.unwrap();
        sqlx::query("UPDATE bits_sessions SET record = '{\"id\": 1' WHERE id = $1")
            .bind(damaged.id.to_string())
            .execute(store.pool())
            .await
            .unwrap();
        assert!(matches!(
            store.load(damaged.id).await,
            Err(StoreError::Backend(_))
        ));
        // Listing skips it, so that one bad row cannot stop the sweeper for the rest.
        let listed = store.list().await.unwrap();
        assert_eq!(listed, std::slice::from_ref(&intact));
        let idle = store.list_idle(u64::MAX).await.unwrap();
        assert_eq!(idle, [intact]);
    }

    #[tokio::test]
    async fn sqlite_lease_expiry_uses_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let id = conformance::fresh_record("lease.bin").id;
        assert!(
            store
                .acquire_lease(id, "a", Duration::from_millis(0))
                .await
                .unwrap()
        );
        assert!(
            store
                .acquire_lease(id, "b", Duration::from_secs(60))
                .await
                .unwrap(),
            "a zero-length lease is expired at once"
        );
        assert!(!store.acquire_lease(id, "a", Duration::MAX).await.unwrap());
        store.release_lease(id, "b").await.unwrap();
        assert!(
            store.acquire_lease(id, "a", Duration::MAX).await.unwrap(),
            "a huge ttl saturates instead of failing"
        );
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use axum_bits::session::SessionRecord;
    use axum_bits::store::{Leased, PostgresStore, SessionStore, StoreError, conformance};
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const URL_VAR: &str = "AXUM_BITS_TEST_POSTGRES_URL";

    /// The test server's URL; `None` (test skipped) outside CI if it is not set.
    fn url() -> Option<String> {
        match std::env::var(URL_VAR) {
            Ok(url) => Some(url),
            Err(_) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
                panic!("{URL_VAR} is not set: .ci/run must start PostgreSQL (.ci/services.sh)")
            }
            Err(_) => {
                eprintln!("{URL_VAR} is not set; PostgreSQL test skipped");
                None
            }
        }
    }

    /// A store on tables of its own, with a pool of its own (as another node would have).
    async fn store(url: &str, prefix: &str) -> PostgresStore {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .unwrap();
        PostgresStore::from_pool(pool)
            .with_table_prefix(prefix)
            .unwrap()
    }

    /// Runs `test` with the server's URL and a fresh table prefix, then drops the prefix's
    /// tables, whether the test passed or not.
    async fn with_tables<F, Fut>(test: F)
    where
        F: FnOnce(String, String) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(url) = url() else { return };
        let prefix = format!("t{}_", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let outcome = tokio::spawn(test(url.clone(), prefix.clone())).await;
        drop_tables(&url, &prefix).await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    async fn drop_tables(url: &str, prefix: &str) {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::raw_sql(&format!(
            "DROP TABLE IF EXISTS {prefix}sessions, {prefix}leases, {prefix}schema"
        ))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_conformance() {
        with_tables(|url, prefix| async move {
            let store = store(&url, &prefix).await;
            store.migrate().await.unwrap();
            let started = Instant::now();
            conformance::run(Arc::new(store)).await;
            eprintln!("postgres conformance: {:?}", started.elapsed());
        })
        .await;
    }

    /// What the clients of a [`counting_proxy`] sent, over all its connections.
    #[derive(Default)]
    struct Seen {
        /// Syncs that closed a batch with an Execute: statements run.
        statements: AtomicU64,
        /// Syncs with nothing before them: pings.
        pings: AtomicU64,
    }

    impl Seen {
        fn counts(&self) -> (u64, u64) {
            (
                self.statements.load(Ordering::SeqCst),
                self.pings.load(Ordering::SeqCst),
            )
        }

        /// Waits until the counts stop moving (the pool pings a connection given back in a
        /// task of its own), then returns them.
        async fn settled(&self) -> (u64, u64) {
            let mut last = self.counts();
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = self.counts();
                if now == last {
                    return now;
                }
                last = now;
            }
            panic!("the proxy's counts never settled: {last:?}");
        }
    }

    /// The frontend messages of one connection, as they arrive: the startup message (a
    /// length, no type byte), then each a type byte and a length.
    #[derive(Default)]
    struct Frontend {
        pending: Vec<u8>,
        started: bool,
        /// The types of the messages since the last Sync.
        batch: Vec<u8>,
    }

    impl Frontend {
        fn feed(&mut self, bytes: &[u8], counts: &Seen) {
            self.pending.extend_from_slice(bytes);
            loop {
                let head = usize::from(self.started);
                let Some(len) = self.pending.get(head..head + 4) else {
                    return;
                };
                let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
                if self.pending.len() < head + len {
                    return;
                }
                if self.started {
                    self.count(self.pending[0], counts);
                }
                self.started = true;
                self.pending.drain(..head + len);
            }
        }

        fn count(&mut self, kind: u8, counts: &Seen) {
            if kind != b'S' {
                self.batch.push(kind);
                return;
            }
            if self.batch.is_empty() {
                counts.pings.fetch_add(1, Ordering::SeqCst);
            } else if self.batch.contains(&b'E') {
                counts.statements.fetch_add(1, Ordering::SeqCst);
            }
            self.batch.clear();
        }
    }

    /// A TCP proxy in front of `upstream` that reads the frontend messages of each of its
    /// connections (the startup message, then type byte and length) and counts statements
    /// and pings (a Sync alone). The connection must not ask for TLS.
    async fn counting_proxy(upstream: String) -> (SocketAddr, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut client_reads, mut client_writes) = client.into_split();
                let (mut server_reads, mut server_writes) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_reads, &mut client_writes).await;
                });
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut frontend = Frontend::default();
                    let mut chunk = vec![0; 64 << 10];
                    while let Ok(n @ 1..) = client_reads.read(&mut chunk).await {
                        if server_writes.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        frontend.feed(&chunk[..n], &counts);
                    }
                });
            }
        });
        (addr, seen)
    }

    /// A Fragment's store calls on `record`: take the lease and load, then update and release.
    async fn fragment_calls(store: &PostgresStore, record: SessionRecord) -> SessionRecord {
        let ttl = Duration::from_secs(30);
        let Leased::Granted(Some(current)) = store
            .lease_and_load(record.id, "node-a", ttl)
            .await
            .unwrap()
        else {
            panic!("lease_and_load refused its own session");
        };
        assert_eq!(current, record);
        let mut next = current.clone();
        next.revision += 1;
        next.received += 64 << 10;
        store
            .update_and_release(current.revision, &next, "node-a")
            .await
            .unwrap();
        next
    }

    /// A store from `PostgresStore::pool_options` behind a [`counting_proxy`], on tables
    /// with `prefix`, and a session it has run 20 Fragments' calls on, so that the statements
    /// are prepared on the connections the pool hands out.
    async fn counted_store(url: &str, prefix: &str) -> (PostgresStore, Arc<Seen>, SessionRecord) {
        let options: PgConnectOptions = url.parse().unwrap();
        let upstream = format!("{}:{}", options.get_host(), options.get_port());
        let (proxy, seen) = counting_proxy(upstream).await;
        let options = options
            .host("127.0.0.1")
            .port(proxy.port())
            .ssl_mode(PgSslMode::Disable);
        let pool = PostgresStore::pool_options()
            .connect_with(options)
            .await
            .unwrap();
        let store = PostgresStore::from_pool(pool)
            .with_table_prefix(prefix)
            .unwrap();
        store.migrate().await.unwrap();
        let mut record = conformance::fresh_record("counted.bin");
        store.create(&record).await.unwrap();
        for _ in 0..20 {
            record = fragment_calls(&store, record).await;
        }
        let (statements, _) = seen.settled().await;
        assert!(statements >= 40, "the proxy saw {statements} statements");
        (store, seen, record)
    }

    /// On the wire, a Fragment's two store calls are two statements and no ping before
    /// either: sqlx pings a pooled connection before each use unless told not to, which
    /// would make each call two round trips; `PostgresStore::pool_options` pings only a
    /// connection idle for 10 s. The pool's ping of a connection given back runs after the
    /// call has returned: one per call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_fragment_calls_are_two_statements_without_a_ping_before_them() {
        with_tables(|url, prefix| async move {
            let (store, seen, mut record) = counted_store(&url, &prefix).await;
            let (statements, pings) = seen.settled().await;

            const FRAGMENTS: u64 = 50;
            for _ in 0..FRAGMENTS {
                record = fragment_calls(&store, record).await;
            }
            let (after, pinged) = seen.settled().await;
            assert_eq!(
                after - statements,
                2 * FRAGMENTS,
                "two statements per Fragment"
            );
            assert_eq!(
                pinged - pings,
                2 * FRAGMENTS,
                "one ping per call, when the pool takes its connection back, none before"
            );
            assert_eq!(store.load(record.id).await.unwrap(), Some(record));
        })
        .await;
    }

    /// A connection idle for 10 s or more is pinged before it is used again (a firewall or
    /// a NAT may have dropped it without a word, which no error would reveal in time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_connection_idle_for_10_s_is_pinged_before_use() {
        with_tables(|url, prefix| async move {
            let (store, seen, record) = counted_store(&url, &prefix).await;
            let (statements, pings) = seen.settled().await;
            tokio::time::sleep(Duration::from_millis(10_500)).await;
            let record = fragment_calls(&store, record).await;
            let (after, pinged) = seen.settled().await;
            assert_eq!(after - statements, 2, "two statements");
            // Two when the pool takes the connections back, and one at least before the first
            // call (the second may take the connection the first gave back a moment ago).
            assert!(pinged - pings >= 3, "{} pings", pinged - pings);
            assert_eq!(store.load(record.id).await.unwrap(), Some(record));
        })
        .await;
    }

    /// Without a ping before each use, a connection the server cut off (a restart, a
    /// fail-over, `pg_terminate_backend`) fails the statement that next takes it; the store
    /// tries again on another connection, so no call fails: a failed call would be a
    /// transient error to the client, which then waits out its retry delay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_connections_cut_by_the_server_fail_no_call() {
        with_tables(|url, prefix| async move {
            let options: PgConnectOptions = url.parse().unwrap();
            let pool = PostgresStore::pool_options()
                .connect_with(options.application_name(&prefix))
                .await
                .unwrap();
            let store = PostgresStore::from_pool(pool.clone())
                .with_table_prefix(&prefix)
                .unwrap();
            store.migrate().await.unwrap();
            let mut record = conformance::fresh_record("cut.bin");
            store.create(&record).await.unwrap();
            let admin = sqlx::PgPool::connect(&url).await.unwrap();
            for round in 0..3 {
                // Several connections in the pool, all idle, all cut.
                drop(hold_connections(&pool, 4).await);
                tokio::time::sleep(Duration::from_millis(200)).await;
                let pooled = pool.size();
                assert!(pooled >= 4, "{pooled} connections");
                let cut: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1",
                )
                .bind(&prefix)
                .fetch_all(&admin)
                .await
                .unwrap();
                assert_eq!(cut.len() as u32, pooled, "every pooled connection cut");
                tokio::time::sleep(Duration::from_millis(100)).await;

                // Round 0 reads first, the others write first.
                if round == 0 {
                    let loaded =
                        tokio::time::timeout(Duration::from_secs(15), store.load(record.id))
                            .await
                            .expect("a call on a cut connection must not hang");
                    assert_eq!(loaded.unwrap(), Some(record.clone()), "round {round}");
                }
                for _ in 0..5 {
                    record = fragment_calls(&store, record).await;
                }
                assert_eq!(store.load(record.id).await.unwrap(), Some(record.clone()));
            }
            admin.close().await;
        })
        .await;
    }

    /// Takes `n` connections from `pool` at once (so that it opens that many).
    async fn hold_connections(
        pool: &sqlx::PgPool,
        n: usize,
    ) -> Vec<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(pool.acquire().await.unwrap());
        }
        held
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_two_nodes() {
        with_tables(|url, prefix| async move {
            let a = store(&url, &prefix).await;
            let b = store(&url, &prefix).await;
            a.migrate().await.unwrap();
            super::records_and_leases_across(&a, &b).await;
            conformance::races_across(&[Arc::new(a), Arc::new(b)]).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_concurrent_migrations() {
        with_tables(|url, prefix| async move {
            let mut nodes = Vec::new();
            for _ in 0..8 {
                nodes.push(store(&url, &prefix).await);
            }
            let start = Arc::new(tokio::sync::Barrier::new(nodes.len()));
            let migrations: Vec<_> = nodes
                .iter()
                .cloned()
                .map(|node| {
                    let start = start.clone();
                    tokio::spawn(async move {
                        start.wait().await;
                        node.migrate().await
                    })
                })
                .collect();
            for migration in migrations {
                migration.await.unwrap().unwrap();
            }
            let record = conformance::fresh_record("migrated.bin");
            nodes[0].create(&record).await.unwrap();
            nodes[7].migrate().await.unwrap();
            assert_eq!(nodes[7].load(record.id).await.unwrap(), Some(record));
            let versions: Vec<i64> = sqlx::query_scalar(&format!(
                "SELECT version FROM {prefix}schema ORDER BY version"
            ))
            .fetch_all(nodes[0].pool())
            .await
            .unwrap();
            // 2 added the function that takes a lease and loads a record in one call.
            assert_eq!(versions, [1, 2]);
        })
        .await;
    }

    #[tokio::test]
    async fn postgres_corrupt_record_is_a_backend_error() {
        with_tables(|url, prefix| async move {
            let store = store(&url, &prefix).await;
            store.migrate().await.unwrap();
            let damaged = conformance::fresh_record("damaged.bin");
            let intact = conformance::fresh_record("intact.bin");
            store.create(&damaged).await.unwrap();
            store.create(&intact).await.unwrap();
            sqlx::query(&format!(
                "UPDATE {prefix}sessions SET record = 'null' WHERE id = $1"
            ))
            .bind(damaged.id.to_string())
            .execute(store.pool())
            .await
            .unwrap();
            assert!(matches!(
                store.load(damaged.id).await,
                Err(StoreError::Backend(_))
            ));
            assert_eq!(store.list().await.unwrap(), [intact]);
        })
        .await;
    }

    /// `connect` migrates the default tables; they are dropped afterwards only if this test
    /// created them.
    #[tokio::test]
    async fn postgres_connect() {
        let Some(url) = url() else { return };
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let existed: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('bits_sessions')::text")
                .fetch_one(&pool)
                .await
                .unwrap();
        let store = PostgresStore::connect(&url).await.unwrap();
        let record = conformance::fresh_record("connected.bin");
        store.create(&record).await.unwrap();
        assert_eq!(store.load(record.id).await.unwrap(), Some(record.clone()));
        store.remove(record.id).await.unwrap();
        store.close().await.unwrap();
        assert!(
            store.load(record.id).await.is_err(),
            "a closed store refuses work"
        );
        if existed.is_none() {
            drop_tables(&url, "bits_").await;
        }
    }

    #[tokio::test]
    async fn postgres_unreachable_server_is_a_backend_error() {
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            PostgresStore::connect("postgres://bits@127.0.0.1:1/bits"),
        )
        .await
        .expect("connect to an unreachable server must give up, not hang");
        assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
        eprintln!("unreachable server refused after {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn postgres_bad_prefix_is_refused() {
        // A lazy pool never connects, so this needs no server.
        let pool = PgPoolOptions::new()
            .connect_lazy("postgres://bits@127.0.0.1:1/bits")
            .unwrap();
        let store = PostgresStore::from_pool(pool);
        for bad in ["", "9x_", "a.b_", "x\"; DROP TABLE y; --", &"a".repeat(33)] {
            assert!(
                matches!(
                    store.clone().with_table_prefix(bad),
                    Err(StoreError::Backend(_))
                ),
                "prefix {bad:?} must be refused"
            );
        }
        assert!(store.with_table_prefix("Bits_2").is_ok());
    }
}
