//! Server farms: several nodes, each its own process, serving the uploads of one site.
//!
//! Every node is this test binary re-executed to run `farm_node` (see `common::node`),
//! configured by environment variables: listen address, upload root, session store, host id,
//! lease ttl. Two ways to build a farm (protocol reference, section 14):
//!
//! * **Shared store** (PostgreSQL or Redis): every node has its own connection to one store
//!   and all share one upload root (so one staging folder). Any node may serve any packet of
//!   any session; a per-session lease in the store keeps two nodes from working on one session
//!   at once. The tests send every packet of an upload to the next node in turn, race
//!   identical and overlapping packets on several nodes at the same instant, and kill a node
//!   that holds a session.
//! * **`BITS-Host-Id`** (no shared state): each node has its own root and file store, and the
//!   Create-Session Ack names the node that owns the session. A load balancer in this process
//!   spreads connections over the nodes; the client sends every later packet of the session to
//!   the host id, and falls back to the load balancer when the host id has been unreachable
//!   for longer than the fallback timeout. [`FarmClient`] is such a client.
//!
//! PostgreSQL and Redis come from `AXUM_BITS_TEST_POSTGRES_URL` and `AXUM_BITS_TEST_REDIS_URL`
//! (`.ci/services.sh` starts both). Without them the shared-store tests are skipped, except
//! under CI (`CI=true`), where they fail. Each test works on tables or keys of its own (a
//! random prefix) and removes them at the end. `RUST_LOG=axum_bits=debug` makes the nodes log
//! to stderr.

#![cfg(feature = "serve")]
// Without a shared store only the host-id tests run.
#![cfg_attr(not(any(feature = "postgres", feature = "redis")), allow(dead_code))]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use axum_bits::BitsLayer;
use axum_bits::session::{Phase, SessionRecord};
use bytes::Bytes;
use common::node::{self, Node, NodeCommand};
use common::{PROTOCOL, Reply, bits_post, data};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

// ---------------------------------------------------------------------------------------------
// The node.

/// The name of the node's test function, which the parent runs with `--exact`.
const NODE_TEST: &str = "farm_node";
/// The upload root; its presence makes `farm_node` a server.
const ROOT_ENV: &str = "AXUM_BITS_FARM_ROOT";
/// `ip:port` to listen on (port 0: any).
const ADDR_ENV: &str = "AXUM_BITS_FARM_ADDR";
/// `file` (the default `FileStore` in the root), `postgres` or `redis`.
const STORE_ENV: &str = "AXUM_BITS_FARM_STORE";
const STORE_URL_ENV: &str = "AXUM_BITS_FARM_STORE_URL";
/// Table prefix (PostgreSQL) or key prefix (Redis).
const STORE_PREFIX_ENV: &str = "AXUM_BITS_FARM_STORE_PREFIX";
const HOST_ID_ENV: &str = "AXUM_BITS_FARM_HOST_ID";
const FALLBACK_MS_ENV: &str = "AXUM_BITS_FARM_FALLBACK_MS";
const LEASE_TTL_MS_ENV: &str = "AXUM_BITS_FARM_LEASE_TTL_MS";
/// `ENDPOINT BUCKET PART_SIZE`: stage in this bucket (an `S3Staging` under the prefix `up`)
/// rather than in the root.
const S3_ENV: &str = "AXUM_BITS_FARM_S3";
/// Exit status of a node that cannot bind its address (the parent may retry another port).
const BIND_FAILED: i32 = 3;

/// A farm node. A no-op unless `AXUM_BITS_FARM_ROOT` is set, in which case it serves a
/// `BitsLayer` (and runs its sweeper) as the other variables say, until it is killed or its
/// parent goes away.
#[test]
fn farm_node() {
    let Some(root) = std::env::var_os(ROOT_ENV) else {
        return;
    };
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let millis =
        |name: &str| var(name).map(|v| Duration::from_millis(v.parse().expect("milliseconds")));
    let addr: SocketAddr = var(ADDR_ENV)
        .expect("AXUM_BITS_FARM_ADDR")
        .parse()
        .expect("an ip:port");
    let store = var(STORE_ENV).unwrap_or_else(|| "file".to_owned());
    let store_url = var(STORE_URL_ENV);
    let store_prefix = var(STORE_PREFIX_ENV);
    let host_id = var(HOST_ID_ENV);
    let fallback = millis(FALLBACK_MS_ENV);
    let lease_ttl = millis(LEASE_TTL_MS_ENV);
    let s3 = var(S3_ENV);
    node::run_child(async move {
        let mut builder = BitsLayer::builder(PathBuf::from(root));
        if let Some(host) = host_id {
            builder = builder.host_id(host);
        }
        if let Some(fallback) = fallback {
            builder = builder.host_id_fallback_timeout(fallback);
        }
        if let Some(ttl) = lease_ttl {
            builder = builder.lease_ttl(ttl);
        }
        let builder = with_store(builder, &store, store_url, store_prefix).await;
        let builder = with_staging(builder, s3);
        let layer = builder.build().expect("layer");
        tokio::spawn(layer.sweeper().run());
        let app = Router::new()
            .route("/", get(|| async { "farm node" }))
            .layer(layer);
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("farm node: cannot bind {addr}: {e}");
                std::process::exit(BIND_FAILED);
            }
        };
        node::announce(listener.local_addr().expect("local address"));
        axum_bits::serve(listener, app)
            .run(std::future::pending())
            .await
            .expect("serve");
    });
}

/// The node's session store.
async fn with_store(
    builder: axum_bits::BitsLayerBuilder,
    kind: &str,
    url: Option<String>,
    prefix: Option<String>,
) -> axum_bits::BitsLayerBuilder {
    // Unused when both shared stores are compiled out.
    let _ = (&url, &prefix);
    match kind {
        "file" => builder,
        #[cfg(feature = "postgres")]
        "postgres" => {
            let store = axum_bits::store::PostgresStore::connect(&url.expect("store url"))
                .await
                .expect("connect to PostgreSQL")
                .with_table_prefix(&prefix.expect("table prefix"))
                .expect("table prefix");
            store.migrate().await.expect("migrate");
            builder.store(store)
        }
        #[cfg(feature = "redis")]
        "redis" => {
            let store = axum_bits::store::RedisStore::connect(&url.expect("store url"))
                .await
                .expect("connect to Redis")
                .with_key_prefix(&prefix.expect("key prefix"))
                .expect("key prefix");
            store.migrate().await.expect("migrate");
            builder.store(store)
        }
        other => panic!("farm node: unknown or disabled store {other:?}"),
    }
}

/// The node's staging: its root, or with `AXUM_BITS_FARM_S3` a bucket.
fn with_staging(
    builder: axum_bits::BitsLayerBuilder,
    s3: Option<String>,
) -> axum_bits::BitsLayerBuilder {
    let Some(spec) = s3 else {
        return builder;
    };
    #[cfg(feature = "s3")]
    {
        let fields: Vec<&str> = spec.split(' ').collect();
        let [endpoint, bucket, part_size] = fields[..] else {
            panic!("{S3_ENV}: expected ENDPOINT BUCKET PART_SIZE, got {spec:?}");
        };
        let staging = axum_bits::staging::S3Staging::builder()
            .endpoint(endpoint)
            .bucket(bucket)
            .prefix("up")
            .region("us-east-1")
            .path_style(true)
            .credentials("test", "test")
            .allow_small_parts(true)
            .part_size(part_size.parse().expect("part size"))
            .memory_budget(64 << 20)
            .build()
            .expect("S3 staging");
        builder.staging(staging)
    }
    #[cfg(not(feature = "s3"))]
    panic!("farm node: {spec:?} needs the s3 feature")
}

/// Where a node keeps its session records.
#[derive(Debug, Clone)]
enum StoreSpec {
    /// The default `FileStore` in the node's root: the node's alone.
    File,
    /// A shared store: `kind` is `postgres` or `redis`.
    Shared {
        kind: &'static str,
        url: String,
        prefix: String,
    },
}

/// How to start one node.
#[derive(Debug, Clone)]
struct NodeSpec {
    addr: SocketAddr,
    root: PathBuf,
    store: StoreSpec,
    /// `BITS-Host-Id` and its fallback timeout.
    host_id: Option<(String, Duration)>,
    lease_ttl: Option<Duration>,
    /// `AXUM_BITS_FARM_S3`.
    s3: Option<String>,
}

impl NodeSpec {
    fn new(addr: SocketAddr, root: &Path, store: StoreSpec) -> Self {
        Self {
            addr,
            root: root.to_path_buf(),
            store,
            host_id: None,
            lease_ttl: None,
            s3: None,
        }
    }

    fn command(&self) -> NodeCommand {
        let mut command = NodeCommand::new(NODE_TEST)
            .env(ROOT_ENV, &self.root)
            .env(ADDR_ENV, self.addr.to_string());
        command = match &self.store {
            StoreSpec::File => command.env(STORE_ENV, "file"),
            StoreSpec::Shared { kind, url, prefix } => command
                .env(STORE_ENV, kind)
                .env(STORE_URL_ENV, url)
                .env(STORE_PREFIX_ENV, prefix),
        };
        if let Some((host, fallback)) = &self.host_id {
            command = command
                .env(HOST_ID_ENV, host)
                .env(FALLBACK_MS_ENV, fallback.as_millis().to_string());
        }
        if let Some(ttl) = self.lease_ttl {
            command = command.env(LEASE_TTL_MS_ENV, ttl.as_millis().to_string());
        }
        if let Some(s3) = &self.s3 {
            command = command.env(S3_ENV, s3);
        }
        command
    }

    /// Starts the node without blocking the runtime.
    async fn try_spawn(self) -> Result<Node, node::SpawnError> {
        tokio::task::spawn_blocking(move || self.command().try_spawn())
            .await
            .expect("spawn task")
    }

    async fn spawn(self) -> Node {
        let what = format!("{self:?}");
        self.try_spawn()
            .await
            .unwrap_or_else(|e| panic!("farm node {what}: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Packets.

/// One `BITS_POST` request: its headers and body.
#[derive(Debug, Clone)]
struct Packet {
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

impl Packet {
    fn ping() -> Self {
        Self {
            headers: vec![("BITS-Packet-Type", "Ping".to_owned())],
            body: Bytes::new(),
        }
    }

    fn create() -> Self {
        Self {
            headers: vec![
                ("BITS-Packet-Type", "Create-Session".to_owned()),
                ("BITS-Supported-Protocols", PROTOCOL.to_owned()),
            ],
            body: Bytes::new(),
        }
    }

    /// The fragment `[first, end)` of `file` (`bytes */0` for an empty file).
    fn fragment(sid: &str, file: &[u8], first: usize, end: usize) -> Self {
        let total = file.len();
        let range = if total == 0 {
            "bytes */0".to_owned()
        } else {
            format!("bytes {first}-{}/{total}", end - 1)
        };
        Self {
            headers: vec![
                ("BITS-Packet-Type", "Fragment".to_owned()),
                ("BITS-Session-Id", sid.to_owned()),
                ("Content-Range", range),
                // Always sent, as Windows does: an empty body has no range to check it with.
                ("Content-Length", (end - first).to_string()),
            ],
            body: Bytes::copy_from_slice(&file[first..end]),
        }
    }

    fn close(sid: &str) -> Self {
        Self {
            headers: vec![
                ("BITS-Packet-Type", "Close-Session".to_owned()),
                ("BITS-Session-Id", sid.to_owned()),
            ],
            body: Bytes::new(),
        }
    }
}

/// Sends packets over HTTP.
#[derive(Clone)]
struct Http(reqwest::Client);

impl Http {
    /// Keeps connections alive, per node.
    fn pooled() -> Self {
        Self(
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        )
    }

    /// A new connection for every request, so that a load balancer picks a node for each.
    fn unpooled() -> Self {
        Self(
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(2))
                .pool_max_idle_per_host(0)
                .build()
                .expect("client"),
        )
    }

    async fn send(&self, url: &str, packet: &Packet) -> Result<Reply, reqwest::Error> {
        let mut request = self.0.request(bits_post(), url);
        for (name, value) in &packet.headers {
            request = request.header(*name, value);
        }
        let response = request.body(packet.body.clone()).send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await?.to_vec();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// [`send`](Self::send), failing the test on a transport error.
    async fn post(&self, url: &str, packet: &Packet) -> Reply {
        self.send(url, packet)
            .await
            .unwrap_or_else(|e| panic!("{url}: {packet:?}: {e}"))
    }
}

fn is_session_lost(reply: &Reply) -> bool {
    reply.header("BITS-Error-Code") == Some("0x8020001F")
}

/// `path` of a destination under `root`.
fn dest(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Asserts that `root/path` holds exactly `want`.
fn assert_file(root: &Path, path: &str, want: &[u8]) {
    let got = std::fs::read(dest(root, path))
        .unwrap_or_else(|e| panic!("{path} in {}: {e}", root.display()));
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{path}: {} bytes, {} expected; first difference at byte {first}",
            got.len(),
            want.len()
        );
    }
}

/// The names in `root`, `.bits` aside.
fn root_entries(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root)
        .expect("read the root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".bits")
        .collect()
}

/// Asserts that `records` are exactly one closed, committed tombstone per file of `files`
/// (path, length).
fn assert_closed_tombstones(records: &[SessionRecord], files: &[(String, usize)]) {
    let mut paths: Vec<&str> = records
        .iter()
        .map(|r| r.destination.trim_start_matches('/'))
        .collect();
    paths.sort_unstable();
    let mut want: Vec<&str> = files
        .iter()
        .map(|(path, _)| path.trim_start_matches('/'))
        .collect();
    want.sort_unstable();
    assert_eq!(paths, want, "one record per file: {records:#?}");
    for (path, len) in files {
        let record = records
            .iter()
            .find(|r| r.destination.trim_start_matches('/') == path.trim_start_matches('/'))
            .expect("record");
        let len = *len as u64;
        assert!(
            record.phase == Phase::Closed
                && record.committed
                && record.received == len
                && record.total == Some(len),
            "{path}: not a closed tombstone of a {len}-byte file: {record:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Shared stores: PostgreSQL and Redis.

#[cfg(any(feature = "postgres", feature = "redis"))]
mod shared {
    use super::*;

    use axum_bits::session::SessionId;
    use axum_bits::store::SessionStore;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Backend {
        #[cfg(feature = "postgres")]
        Postgres,
        #[cfg(feature = "redis")]
        Redis,
    }

    impl Backend {
        fn kind(self) -> &'static str {
            match self {
                #[cfg(feature = "postgres")]
                Self::Postgres => "postgres",
                #[cfg(feature = "redis")]
                Self::Redis => "redis",
            }
        }

        fn url_var(self) -> &'static str {
            match self {
                #[cfg(feature = "postgres")]
                Self::Postgres => "AXUM_BITS_TEST_POSTGRES_URL",
                #[cfg(feature = "redis")]
                Self::Redis => "AXUM_BITS_TEST_REDIS_URL",
            }
        }
    }

    /// This test's view of the store: records and leases.
    enum Handle {
        #[cfg(feature = "postgres")]
        Postgres(axum_bits::store::PostgresStore),
        #[cfg(feature = "redis")]
        Redis(
            axum_bits::store::RedisStore,
            axum_bits::redis::aio::MultiplexedConnection,
        ),
    }

    /// The tables or keys of one test, in the test server. Removed when dropped (after the
    /// nodes, which the test declares later), whether the test passed or not.
    pub(crate) struct SharedStore {
        backend: Backend,
        url: String,
        prefix: String,
        handle: Handle,
    }

    impl SharedStore {
        /// A fresh prefix in the server named by the backend's variable; `None` (the test is
        /// skipped) if it is not set, outside CI.
        pub(crate) async fn new(backend: Backend) -> Option<Self> {
            let var = backend.url_var();
            let url = match std::env::var(var) {
                Ok(url) if !url.is_empty() => url,
                _ if std::env::var("CI").as_deref() == Ok("true") => {
                    panic!("{var} is not set: .ci/run must start the server (.ci/services.sh)")
                }
                _ => {
                    eprintln!("{var} is not set; this farm test is skipped");
                    return None;
                }
            };
            let id = uuid::Uuid::new_v4().simple().to_string();
            let handle;
            let prefix;
            match backend {
                #[cfg(feature = "postgres")]
                Backend::Postgres => {
                    prefix = format!("farm{}_", &id[..12]);
                    let store = axum_bits::store::PostgresStore::connect(&url)
                        .await
                        .expect("connect to PostgreSQL")
                        .with_table_prefix(&prefix)
                        .expect("table prefix");
                    store.migrate().await.expect("migrate");
                    handle = Handle::Postgres(store);
                }
                #[cfg(feature = "redis")]
                Backend::Redis => {
                    prefix = format!("axum-bits-farm-{}", &id[..12]);
                    let store = axum_bits::store::RedisStore::connect(&url)
                        .await
                        .expect("connect to Redis")
                        .with_key_prefix(&prefix)
                        .expect("key prefix");
                    store.migrate().await.expect("migrate");
                    let raw = axum_bits::redis::Client::open(url.as_str())
                        .expect("redis client")
                        .get_multiplexed_async_connection()
                        .await
                        .expect("redis connection");
                    handle = Handle::Redis(store, raw);
                }
            }
            Some(Self {
                backend,
                url,
                prefix,
                handle,
            })
        }

        pub(crate) fn spec(&self) -> StoreSpec {
            StoreSpec::Shared {
                kind: self.backend.kind(),
                url: self.url.clone(),
                prefix: self.prefix.clone(),
            }
        }

        /// Every record, tombstones included.
        pub(crate) async fn records(&self) -> Vec<SessionRecord> {
            match &self.handle {
                #[cfg(feature = "postgres")]
                Handle::Postgres(store) => store.list().await.expect("list"),
                #[cfg(feature = "redis")]
                Handle::Redis(store, _) => store.list().await.expect("list"),
            }
        }

        /// The holder of the session's lease, if one holds it now (the layouts are in the
        /// stores' docs).
        pub(crate) async fn lease_holder(&self, sid: &str) -> Option<String> {
            let id = SessionId::parse(sid).expect("a session id");
            match &self.handle {
                #[cfg(feature = "postgres")]
                Handle::Postgres(store) => axum_bits::sqlx::query_scalar::<_, String>(&format!(
                    "SELECT holder FROM {}leases WHERE id = $1 AND expires > clock_timestamp()",
                    self.prefix
                ))
                .bind(id.to_string())
                .fetch_optional(store.pool())
                .await
                .expect("lease query"),
                #[cfg(feature = "redis")]
                Handle::Redis(_, raw) => {
                    let key = format!(
                        "{{{}}}:l:{}",
                        self.prefix,
                        id.to_string().trim_matches(['{', '}'])
                    );
                    axum_bits::redis::cmd("GET")
                        .arg(key)
                        .query_async::<Option<String>>(&mut raw.clone())
                        .await
                        .expect("GET lease")
                }
            }
        }

        /// Waits until some node holds the session's lease.
        pub(crate) async fn wait_for_lease(&self, sid: &str) -> String {
            let started = Instant::now();
            loop {
                if let Some(holder) = self.lease_holder(sid).await {
                    return holder;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "no node took the lease of {sid}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn remove_all(backend: Backend, url: String, prefix: String) {
            match backend {
                #[cfg(feature = "postgres")]
                Backend::Postgres => {
                    let pool = axum_bits::sqlx::PgPool::connect(&url)
                        .await
                        .expect("connect");
                    axum_bits::sqlx::raw_sql(&format!(
                        "DROP TABLE IF EXISTS {prefix}sessions, {prefix}leases, {prefix}schema"
                    ))
                    .execute(&pool)
                    .await
                    .expect("drop the tables");
                    pool.close().await;
                }
                #[cfg(feature = "redis")]
                Backend::Redis => {
                    let mut conn = axum_bits::redis::Client::open(url.as_str())
                        .expect("client")
                        .get_multiplexed_async_connection()
                        .await
                        .expect("connect");
                    let mut cursor = 0u64;
                    loop {
                        let (next, keys): (u64, Vec<String>) = axum_bits::redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{{{prefix}}}:*"))
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut conn)
                            .await
                            .expect("SCAN");
                        if !keys.is_empty() {
                            let _: i64 = axum_bits::redis::cmd("DEL")
                                .arg(&keys)
                                .query_async(&mut conn)
                                .await
                                .expect("DEL");
                        }
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        }
    }

    impl Drop for SharedStore {
        fn drop(&mut self) {
            let (backend, url, prefix) = (self.backend, self.url.clone(), self.prefix.clone());
            // On a thread of its own: drop runs inside the test's runtime, which must not
            // block on another.
            let cleanup = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(Self::remove_all(backend, url, prefix));
            });
            if cleanup.join().is_err() {
                eprintln!("could not remove the farm test's {:?} data", self.backend);
            }
        }
    }

    /// Nodes on 127.0.0.1 that share one store and one upload root.
    pub(crate) struct Farm {
        root: tempfile::TempDir,
        nodes: Vec<Option<Node>>,
    }

    impl Farm {
        pub(crate) async fn start(
            store: &SharedStore,
            count: usize,
            lease_ttl: Option<Duration>,
        ) -> Self {
            let root = tempfile::tempdir().expect("tempdir");
            let spawns: Vec<_> = (0..count)
                .map(|_| {
                    let mut spec = NodeSpec::new(
                        SocketAddr::from(([127, 0, 0, 1], 0)),
                        root.path(),
                        store.spec(),
                    );
                    spec.lease_ttl = lease_ttl;
                    tokio::spawn(spec.spawn())
                })
                .collect();
            let mut nodes = Vec::new();
            for spawn in spawns {
                nodes.push(Some(spawn.await.expect("node start")));
            }
            Self { root, nodes }
        }

        pub(crate) fn root(&self) -> &Path {
            self.root.path()
        }

        fn node(&self, i: usize) -> &Node {
            self.nodes[i % self.nodes.len()]
                .as_ref()
                .unwrap_or_else(|| panic!("node {i} was killed"))
        }

        /// The URL of `path` on node `i` (modulo the farm's size).
        pub(crate) fn url(&self, i: usize, path: &str) -> String {
            self.node(i).url(path)
        }

        pub(crate) fn addr(&self, i: usize) -> SocketAddr {
            self.node(i).addr()
        }

        /// SIGKILLs node `i`.
        pub(crate) fn kill(&mut self, i: usize) {
            self.nodes[i].take().expect("a live node").kill();
        }

        /// After every upload: the root holds exactly the uploads, nothing is staged, and
        /// the store holds a closed, committed tombstone per file.
        pub(crate) fn assert_finished(&self, records: &[SessionRecord], files: &[(String, usize)]) {
            let names: BTreeSet<String> = files
                .iter()
                .map(|(p, _)| p.trim_start_matches('/').to_owned())
                .collect();
            assert_eq!(
                super::root_entries(self.root()),
                names,
                "no file but the uploads"
            );
            self.assert_nothing_staged();
            super::assert_closed_tombstones(records, files);
        }

        /// Asserts that nothing is staged: no part (or other file) under `.bits`.
        pub(crate) fn assert_nothing_staged(&self) {
            assert!(
                common::leftovers(self.root()).is_empty(),
                "left under .bits: {:?}",
                common::leftovers(self.root())
            );
        }
    }
}

#[cfg(any(feature = "postgres", feature = "redis"))]
use shared::{Backend, Farm, SharedStore};

// ---------------------------------------------------------------------------------------------
// 1. Round robin: every packet of an upload to the next node.

/// (size, fragment size) of the files of the round-robin test, uploaded at once.
const ROUND_ROBIN_FILES: &[(usize, usize)] = &[
    (0, 64 * KIB),
    (1, 64 * KIB),
    (300 * KIB + 7, 64 * KIB),
    (300 * KIB, 100 * KIB),
    (MIB + 1, 256 * KIB),
    (3 * MIB, MIB),
    (4 * MIB + 333, 512 * KIB),
    (2 * MIB - 1, 64 * KIB + 1),
];

/// Several clients upload at once, each sending Create-Session to one node, every Fragment to
/// the next and Close-Session to the one after: a load balancer without affinity. Every Ack
/// must be a success with the exact offset, and afterwards every file must be intact, nothing
/// staged, and every record a closed tombstone.
#[cfg(any(feature = "postgres", feature = "redis"))]
async fn round_robin(backend: Backend) {
    let Some(store) = SharedStore::new(backend).await else {
        return;
    };
    let started = Instant::now();
    let farm = Arc::new(Farm::start(&store, 3, None).await);
    let http = Http::pooled();
    let mut files = Vec::new();
    let mut clients = Vec::new();
    for (i, &(len, fragment)) in ROUND_ROBIN_FILES.iter().enumerate() {
        let path = format!("/rr-{i}-{len}.bin");
        let file = data(len, 1000 + i as u64);
        files.push((path.clone(), len));
        let (farm, http) = (farm.clone(), http.clone());
        clients.push(tokio::spawn(async move {
            // Each client starts on another node.
            let mut turn = i;
            let mut next = |path: &str| {
                turn += 1;
                farm.url(turn, path)
            };
            let create = http.post(&next(&path), &Packet::create()).await;
            create.assert_ok();
            let sid = create.session_id();
            let mut offset = 0;
            loop {
                let end = (offset + fragment).min(len);
                let url = next(&path);
                let ack = http
                    .post(&url, &Packet::fragment(&sid, &file, offset, end))
                    .await;
                ack.assert_ok();
                assert_eq!(ack.received(), Some(end as u64), "{path} at {url}: {ack:?}");
                assert_eq!(ack.header("BITS-Session-Id"), Some(sid.as_str()));
                offset = end;
                if offset == len {
                    break;
                }
            }
            http.post(&next(&path), &Packet::close(&sid))
                .await
                .assert_ok();
            (path, file)
        }));
    }
    for client in clients {
        let (path, file) = client.await.expect("client");
        assert_file(farm.root(), &path, &file);
    }
    farm.assert_finished(&store.records().await, &files);
    println!(
        "round robin over 3 {backend:?} nodes: {} files in {:.1} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_postgres() {
    round_robin(Backend::Postgres).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_redis() {
    round_robin(Backend::Redis).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Racing nodes: the same packet, or overlapping ones, on several nodes at the same instant.

/// (size, fragment size) of the files whose every fragment all nodes get at once.
const RACED_FILES: &[(usize, usize)] = &[
    (MIB + 13, 256 * KIB),
    (700 * KIB, 192 * KIB),
    (1, 64 * KIB),
    (0, 64 * KIB),
    (2 * MIB, MIB),
];

/// Sends `packets[i]` to `urls[i]`, all at the same instant.
async fn race(http: &Http, sends: Vec<(String, Packet)>) -> Vec<Reply> {
    let start = Arc::new(tokio::sync::Barrier::new(sends.len()));
    let tasks: Vec<_> = sends
        .into_iter()
        .map(|(url, packet)| {
            let (http, start) = (http.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                http.post(&url, &packet).await
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.expect("racer"));
    }
    replies
}

/// Checks one Ack of a raced Fragment `[first, end)`, `floor` being the offset acknowledged
/// before the race: a 200 must report at least `end`; a 416 must report a gap (below `first`)
/// or a duplicate (at least `end`); neither may report less than `floor`. Returns the offset.
fn check_raced_fragment(reply: &Reply, sid: &str, first: usize, end: usize, floor: u64) -> u64 {
    reply.assert_ack();
    assert_eq!(reply.header("BITS-Session-Id"), Some(sid), "{reply:?}");
    let received = reply
        .received()
        .unwrap_or_else(|| panic!("no offset: {reply:?}"));
    assert!(
        received >= floor,
        "[{first}, {end}): offset {received} below the acknowledged {floor}: {reply:?}"
    );
    match reply.status {
        200 => assert!(
            received >= end as u64,
            "[{first}, {end}): a 200 that does not cover the fragment: {reply:?}"
        ),
        416 => assert!(
            received < first as u64 || received >= end as u64,
            "[{first}, {end}): a 416 with an offset inside the fragment: {reply:?}"
        ),
        _ => panic!("[{first}, {end}): neither 200 nor 416: {reply:?}"),
    }
    received
}

#[cfg(unix)]
fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").ino()
}

/// For each fragment of a file, all three nodes get the identical packet at the same
/// instant: every answer must be a 200 covering the fragment (or a consistent 416), never a
/// 5xx, never an offset below what was acknowledged. Then Close-Session races on two nodes:
/// both 200, the file committed once (its inode does not change) and intact. Then two nodes
/// get overlapping but different ranges of one file at once; the client resumes from the
/// acknowledged offset and the file must come out intact.
#[cfg(any(feature = "postgres", feature = "redis"))]
async fn racing_nodes(backend: Backend) {
    let Some(store) = SharedStore::new(backend).await else {
        return;
    };
    let started = Instant::now();
    let farm = Farm::start(&store, 3, None).await;
    let http = Http::pooled();
    let mut files = Vec::new();
    let (mut oks, mut range_416s) = (0, 0);

    for (i, &(len, fragment)) in RACED_FILES.iter().enumerate() {
        let path = format!("/race-{i}-{len}.bin");
        let file = data(len, 2000 + i as u64);
        let create = http.post(&farm.url(i, &path), &Packet::create()).await;
        create.assert_ok();
        let sid = create.session_id();
        let mut acked = 0u64;
        loop {
            let first = acked as usize;
            let end = (first + fragment).min(len);
            let packet = Packet::fragment(&sid, &file, first, end);
            let sends = (0..3)
                .map(|n| (farm.url(n, &path), packet.clone()))
                .collect();
            let replies = race(&http, sends).await;
            let mut best = acked;
            for reply in &replies {
                best = best.max(check_raced_fragment(reply, &sid, first, end, acked));
                match reply.status {
                    200 => oks += 1,
                    _ => range_416s += 1,
                }
            }
            acked = best;
            if acked == len as u64 {
                break;
            }
        }
        // Committed at the last fragment (CommitPoint::LastFragment).
        let target = dest(farm.root(), &path);
        assert_file(farm.root(), &path, &file);
        #[cfg(unix)]
        let committed = inode(&target);
        let closes = race(
            &http,
            vec![
                (farm.url(i + 1, &path), Packet::close(&sid)),
                (farm.url(i + 2, &path), Packet::close(&sid)),
            ],
        )
        .await;
        for close in &closes {
            close.assert_ok();
        }
        assert_file(farm.root(), &path, &file);
        #[cfg(unix)]
        assert_eq!(inode(&target), committed, "{path} was committed again");
        files.push((path, len));
    }

    // Overlapping ranges: [0, 200k) to one node and [100k, 300k) to another, at once. Either
    // the first lands first (then the second overlaps it: 200 up to 300k), or the second
    // does (a gap: 416 at 0, then the first: 200 up to 200k).
    const LEN: usize = 400 * KIB;
    for round in 0..6 {
        let path = format!("/overlap-{round}.bin");
        let file = data(LEN, 3000 + round as u64);
        let create = http.post(&farm.url(round, &path), &Packet::create()).await;
        create.assert_ok();
        let sid = create.session_id();
        let ranges = [(0, 200 * KIB), (100 * KIB, 300 * KIB)];
        let sends = ranges
            .iter()
            .enumerate()
            .map(|(n, &(first, end))| {
                (
                    farm.url(round + n, &path),
                    Packet::fragment(&sid, &file, first, end),
                )
            })
            .collect();
        let replies = race(&http, sends).await;
        let mut acked = 0;
        for (reply, &(first, end)) in replies.iter().zip(&ranges) {
            acked = acked.max(check_raced_fragment(reply, &sid, first, end, 0));
            match reply.status {
                200 => oks += 1,
                _ => range_416s += 1,
            }
        }
        assert!(acked >= 200 * KIB as u64, "{replies:?}");
        // The client resumes from the acknowledged offset, on the next nodes in turn.
        let mut offset = acked as usize;
        let mut turn = round;
        while offset < LEN {
            turn += 1;
            let end = (offset + 64 * KIB).min(LEN);
            let ack = http
                .post(
                    &farm.url(turn, &path),
                    &Packet::fragment(&sid, &file, offset, end),
                )
                .await;
            ack.assert_ok();
            assert_eq!(ack.received(), Some(end as u64), "{ack:?}");
            offset = end;
        }
        http.post(&farm.url(turn + 1, &path), &Packet::close(&sid))
            .await
            .assert_ok();
        assert_file(farm.root(), &path, &file);
        files.push((path, LEN));
    }

    farm.assert_finished(&store.records().await, &files);
    println!(
        "racing {backend:?} nodes: {} files, {oks} raced 200s and {range_416s} 416s, in {:.1} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_nodes_postgres() {
    racing_nodes(Backend::Postgres).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_nodes_redis() {
    racing_nodes(Backend::Redis).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Leases: a dead holder's lapses, a live holder's does not.

/// The lease ttl of the lease tests' nodes.
const LEASE_TTL: Duration = Duration::from_secs(1);
/// How long the node that takes over a dead holder's session may take to answer: the lease
/// lapses within one ttl of the holder's death, and the waiter polls every 200 ms at most.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(4);

/// A raw `BITS_POST` Fragment whose body the test sends piece by piece.
async fn raw_fragment_head(
    addr: SocketAddr,
    path: &str,
    sid: &str,
    first: usize,
    len: usize,
    total: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&common::fragment_head(path, sid, first, len, total))
        .await
        .expect("write the head");
    stream
}

/// Reads one response from a raw connection.
async fn read_reply(stream: &mut tokio::net::TcpStream) -> Reply {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read a response");
            assert!(n > 0, "the connection closed before a response");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).expect("a UTF-8 head");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let mut headers = http::HeaderMap::new();
        for (name, value) in lines.filter_map(|line| line.split_once(':')) {
            headers.append(
                http::HeaderName::from_bytes(name.trim().as_bytes()).expect("a header name"),
                http::HeaderValue::from_str(value.trim()).expect("a header value"),
            );
        }
        let len: usize = headers
            .get("content-length")
            .map_or(0, |v| v.to_str().expect("ascii").parse().expect("a length"));
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read the body");
            assert!(n > 0, "the connection closed within the body");
            body.extend_from_slice(&chunk[..n]);
        }
        Reply {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("a response within 30 s")
}

/// Node A holds a session (a Fragment whose body stalls) and is SIGKILLed: node B, sent the
/// same Fragment, must wait for A's lease to lapse and then answer 200 with the right offset,
/// within two ttls and a margin; the upload then completes on B and C. Then a live holder: B
/// streams a Fragment body slowly but steadily for 3.4 s while C gets packets for the same
/// session. One sent at once must wait its two ttls and get 503 `ERROR_BUSY` while B still
/// streams (the lease is renewed, not taken over); one sent later must wait until B is done
/// and then get 200. The file must be intact.
#[cfg(any(feature = "postgres", feature = "redis"))]
async fn leases(backend: Backend) {
    use tokio::io::AsyncWriteExt;

    let Some(store) = SharedStore::new(backend).await else {
        return;
    };
    let started = Instant::now();
    let mut farm = Farm::start(&store, 3, Some(LEASE_TTL)).await;
    let http = Http::pooled();
    let (a, b, c) = (0, 1, 2);

    // A dead holder.
    const LEN: usize = MIB;
    const FRAG: usize = 256 * KIB;
    let path = "/lease-dead-holder.bin";
    let file = data(LEN, 4000);
    let create = http.post(&farm.url(a, path), &Packet::create()).await;
    create.assert_ok();
    let sid = create.session_id();
    let ack = http
        .post(&farm.url(a, path), &Packet::fragment(&sid, &file, 0, FRAG))
        .await;
    ack.assert_ok();
    assert_eq!(ack.received(), Some(FRAG as u64));
    let mut stalled = raw_fragment_head(farm.addr(a), path, &sid, FRAG, FRAG, LEN).await;
    stalled
        .write_all(&file[FRAG..FRAG + 100 * KIB])
        .await
        .expect("write part of the body");
    store.wait_for_lease(&sid).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store.lease_holder(&sid).await.is_some(),
        "A holds the session"
    );
    farm.kill(a);
    let killed = Instant::now();
    let ack = http
        .post(
            &farm.url(b, path),
            &Packet::fragment(&sid, &file, FRAG, 2 * FRAG),
        )
        .await;
    let took_over = killed.elapsed();
    ack.assert_ok();
    assert_eq!(ack.received(), Some(2 * FRAG as u64), "{ack:?}");
    assert!(
        took_over < TAKEOVER_LIMIT,
        "B answered {took_over:?} after A died (lease ttl {LEASE_TTL:?})"
    );
    // A's lease was renewed at most a third of a ttl before A died, so it could not lapse
    // sooner than two thirds of a ttl after (a quarter here, for a late renewal): B waited.
    assert!(
        took_over >= LEASE_TTL / 4,
        "B answered {took_over:?} after A died: it did not wait for A's lease"
    );
    drop(stalled);
    let mut offset = 2 * FRAG;
    let mut turn = b;
    while offset < LEN {
        let end = offset + FRAG;
        let ack = http
            .post(
                &farm.url(turn, path),
                &Packet::fragment(&sid, &file, offset, end),
            )
            .await;
        ack.assert_ok();
        assert_eq!(ack.received(), Some(end as u64), "{ack:?}");
        offset = end;
        turn = if turn == b { c } else { b };
    }
    http.post(&farm.url(c, path), &Packet::close(&sid))
        .await
        .assert_ok();
    assert_file(farm.root(), path, &file);

    // A live holder: B streams a body for 3.4 s, 16 KiB every 200 ms.
    const FRAMES: usize = 18;
    const FRAME: usize = 16 * KIB;
    const EVERY: Duration = Duration::from_millis(200);
    const HELD: usize = FRAMES * FRAME;
    const LEN2: usize = 512 * KIB;
    let path2 = "/lease-live-holder.bin";
    let file2 = data(LEN2, 4001);
    let create = http.post(&farm.url(b, path2), &Packet::create()).await;
    create.assert_ok();
    let sid2 = create.session_id();
    let mut holder = raw_fragment_head(farm.addr(b), path2, &sid2, 0, HELD, LEN2).await;
    let stream_started = Instant::now();
    let body = file2[..HELD].to_vec();
    let streaming = tokio::spawn(async move {
        for (n, frame) in body.chunks(FRAME).enumerate() {
            if n > 0 {
                tokio::time::sleep(EVERY).await;
            }
            holder.write_all(frame).await.expect("a frame");
        }
        let body_sent = Instant::now();
        let reply = read_reply(&mut holder).await;
        (reply, body_sent, Instant::now())
    });
    store.wait_for_lease(&sid2).await;
    // A client retrying the start of the fragment on C at once: C waits two ttls, while B
    // renews its lease, and gives up with 503 while B still streams.
    let busy_sent = Instant::now();
    let busy = http
        .post(
            &farm.url(c, path2),
            &Packet::fragment(&sid2, &file2, 0, 64 * KIB),
        )
        .await;
    let busy_done = Instant::now();
    busy.assert_error(503, "0x800700AA");
    let busy_wait = busy_done - busy_sent;
    assert!(
        busy_wait >= LEASE_TTL * 2 - Duration::from_millis(100),
        "C gave up after {busy_wait:?}, before two lease ttls"
    );
    // Later, the same: C waits until B is done, then answers 200 with B's offset.
    tokio::time::sleep_until((stream_started + Duration::from_millis(2400)).into()).await;
    let late = http
        .post(
            &farm.url(c, path2),
            &Packet::fragment(&sid2, &file2, 0, 64 * KIB),
        )
        .await;
    let late_done = Instant::now();
    let (held, body_sent, held_done) = streaming.await.expect("the holder");
    held.assert_ok();
    assert_eq!(
        held.received(),
        Some(HELD as u64),
        "the holder's Ack: {held:?}"
    );
    assert!(
        busy_done < body_sent,
        "C's 503 came {:?} after B's body was complete: B's lease was not respected",
        busy_done - body_sent
    );
    late.assert_ok();
    assert_eq!(late.received(), Some(HELD as u64), "{late:?}");
    assert!(
        late_done >= body_sent,
        "C answered before B had its whole body: the live holder was taken over"
    );
    let ack = http
        .post(
            &farm.url(c, path2),
            &Packet::fragment(&sid2, &file2, HELD, LEN2),
        )
        .await;
    ack.assert_ok();
    assert_eq!(ack.received(), Some(LEN2 as u64));
    http.post(&farm.url(b, path2), &Packet::close(&sid2))
        .await
        .assert_ok();
    assert_file(farm.root(), path2, &file2);

    farm.assert_nothing_staged();
    assert_closed_tombstones(
        &store.records().await,
        &[(path.to_owned(), LEN), (path2.to_owned(), LEN2)],
    );
    println!(
        "leases on {backend:?}: takeover {:.2} s after the kill; a live holder's waiter gave \
         up after {:.2} s, a later one got the session {:.2} s after the holder's Ack; {:.1} s \
         in all",
        took_over.as_secs_f64(),
        busy_wait.as_secs_f64(),
        late_done.saturating_duration_since(held_done).as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_postgres() {
    leases(Backend::Postgres).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_redis() {
    leases(Backend::Redis).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Affinity with BITS-Host-Id: nodes that share nothing.

/// The nodes' addresses, and their host ids: `BITS-Host-Id` names a host only, and the client
/// keeps the port of its original URL (protocol §14), so every node listens on the load
/// balancer's port, each on an address of its own.
const HOSTS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];
const FALLBACK: Duration = Duration::from_secs(2);

/// A TCP load balancer on 127.0.0.1: sends each new connection to the next node in turn, and
/// to the one after if that one refuses the connection (a dead node), as a load balancer with
/// health checks would.
struct LoadBalancer {
    /// The node index each connection went to, in the order they were made.
    routed: Arc<Mutex<Vec<usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LoadBalancer {
    fn start(listener: tokio::net::TcpListener, nodes: Vec<SocketAddr>) -> Self {
        let routed = Arc::new(Mutex::new(Vec::new()));
        let log = routed.clone();
        let task = tokio::spawn(async move {
            // Dropped with the task, which aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            let mut turn = 0;
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let (first, nodes, log) = (turn, nodes.clone(), log.clone());
                turn += 1;
                connections.spawn(async move {
                    for i in 0..nodes.len() {
                        let node = (first + i) % nodes.len();
                        if let Ok(mut server) = tokio::net::TcpStream::connect(nodes[node]).await {
                            log.lock().expect("log").push(node);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                    // No node answers: the client's connection is closed.
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self { routed, task }
    }

    /// The node index of every connection so far.
    fn routed(&self) -> Vec<usize> {
        self.routed.lock().expect("log").clone()
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two nodes, each with its own root and file store, behind a load balancer.
struct HostIdFarm {
    port: u16,
    roots: [tempfile::TempDir; 2],
    nodes: Mutex<[Option<Node>; 2]>,
    lb: LoadBalancer,
}

impl HostIdFarm {
    async fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..10 {
            // The load balancer's port is free on 127.0.0.1; the nodes need it on their own
            // addresses too, and try another port if it is taken there.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the load balancer");
            let port = listener.local_addr().expect("address").port();
            let roots = [
                tempfile::tempdir().expect("tempdir"),
                tempfile::tempdir().expect("tempdir"),
            ];
            let mut nodes = Vec::new();
            for (host, root) in HOSTS.iter().zip(&roots) {
                let addr = SocketAddr::new(host.parse().expect("an ip"), port);
                let mut spec = NodeSpec::new(addr, root.path(), StoreSpec::File);
                spec.host_id = Some(((*host).to_owned(), FALLBACK));
                match spec.try_spawn().await {
                    Ok(node) => nodes.push(node),
                    Err(e) => {
                        failures.push(format!("{addr}: {e}"));
                        break;
                    }
                }
            }
            let Ok([first, second]) = <[Node; 2]>::try_from(nodes) else {
                continue;
            };
            let lb = LoadBalancer::start(listener, vec![first.addr(), second.addr()]);
            return Self {
                port,
                roots,
                nodes: Mutex::new([Some(first), Some(second)]),
                lb,
            };
        }
        panic!("no port for the host-id farm: {failures:?}");
    }

    /// The URL of the load balancer: what the client's job was given.
    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn node_of(host: &str) -> usize {
        HOSTS
            .iter()
            .position(|h| *h == host)
            .unwrap_or_else(|| panic!("unknown host id {host}"))
    }

    fn root(&self, node: usize) -> &Path {
        self.roots[node].path()
    }

    /// SIGKILLs the node whose host id is `host`.
    fn kill(&self, host: &str) {
        let node = self.nodes.lock().expect("nodes")[Self::node_of(host)]
            .take()
            .expect("a live node");
        node.kill();
    }
}

/// Where the packets of a session go (protocol §14).
#[derive(Debug)]
struct Route {
    /// The `BITS-Host-Id` of the session's Create-Session Ack, while the client follows it;
    /// `None`: the original URL.
    host: Option<String>,
    /// The `BITS-Host-Id-Fallback-Timeout`; `None`: never fall back.
    fallback: Option<Duration>,
    /// Since when the host id has been unreachable; reset by any answer.
    unreachable_since: Option<Instant>,
}

/// What one upload took.
#[derive(Debug, Default)]
struct UploadReport {
    /// Every session the upload created: its id and the host id its Create-Session Ack
    /// named (if the client follows host ids).
    sessions: Vec<(String, Option<String>)>,
    /// The fallback timeout the last Create-Session Ack announced.
    fallback: Option<Duration>,
    /// How long the host id had been unreachable each time the client fell back.
    fallbacks: Vec<Duration>,
    /// The Acks that told the client its session was gone (`0x8020001F`).
    lost: Vec<Reply>,
}

/// A BITS upload client that behaves as Windows does in a farm (protocol §§ 5.2, 13.1, 14):
///
/// * Create-Session always goes to the job's URL (the load balancer).
/// * If the Ack names a `BITS-Host-Id`, every later packet of the session goes to that host,
///   with the scheme, port and path of the job's URL, starting with a Ping.
/// * A packet that gets no answer (cannot connect) is sent again after a pause. Once the host
///   id has been unreachable for longer than `BITS-Host-Id-Fallback-Timeout`, the client
///   goes back to the job's URL for good; without that header it never does.
/// * Fragments follow `BITS-Received-Content-Range` on 200 and 416 alike.
/// * `0x8020001F` (the session is unknown where the packet landed) on any packet but Close:
///   drop the session and start over with Create-Session, from byte 0. On Close, the file
///   was committed with its last fragment: stop.
struct FarmClient {
    http: Http,
    /// Host and port of the job's URL.
    origin: (String, u16),
    follow_host_id: bool,
    /// The pause before a packet that got no answer is sent again (Windows waits minutes).
    retry_pause: Duration,
    /// How long one packet may go unanswered before the test fails.
    give_up_after: Duration,
}

impl FarmClient {
    fn new(farm: &HostIdFarm, follow_host_id: bool) -> Self {
        Self {
            http: Http::unpooled(),
            origin: ("127.0.0.1".to_owned(), farm.port),
            follow_host_id,
            retry_pause: Duration::from_millis(100),
            give_up_after: Duration::from_secs(15),
        }
    }

    fn url(&self, route: &Route, path: &str) -> String {
        let host = route.host.as_deref().unwrap_or(&self.origin.0);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        format!("http://{host}:{}{path}", self.origin.1)
    }

    /// Uploads `data` to `path` in fragments of `fragment` bytes. `progress` hears of every
    /// acknowledged offset, with the host id the session lives on.
    async fn upload(
        &self,
        path: &str,
        data: &[u8],
        fragment: usize,
        mut progress: impl FnMut(Option<&str>, u64),
    ) -> UploadReport {
        let total = data.len();
        let mut report = UploadReport::default();
        'session: loop {
            assert!(
                report.sessions.len() < 4,
                "{path}: too many sessions: {report:?}"
            );
            let mut route = Route {
                host: None,
                fallback: None,
                unreachable_since: None,
            };
            let create = self
                .exchange(&mut route, path, &Packet::create(), &mut report)
                .await;
            create.assert_ok();
            let sid = create.session_id();
            if self.follow_host_id {
                route.host = create.header("BITS-Host-Id").map(str::to_owned);
                route.fallback = create
                    .header("BITS-Host-Id-Fallback-Timeout")
                    .map(|s| Duration::from_secs(s.parse().expect("seconds")));
                report.fallback = route.fallback;
            }
            report.sessions.push((sid.clone(), route.host.clone()));
            if route.host.is_some() {
                self.exchange(&mut route, path, &Packet::ping(), &mut report)
                    .await
                    .assert_ok();
            }
            let mut offset = 0;
            loop {
                let end = (offset + fragment).min(total);
                let packet = Packet::fragment(&sid, data, offset, end);
                let ack = self.exchange(&mut route, path, &packet, &mut report).await;
                if is_session_lost(&ack) {
                    report.lost.push(ack);
                    continue 'session;
                }
                assert!(ack.status == 200 || ack.status == 416, "{path}: {ack:?}");
                ack.assert_ack();
                offset = usize::try_from(ack.received().expect("an offset")).expect("usize");
                progress(route.host.as_deref(), offset as u64);
                if offset == total {
                    break;
                }
            }
            let close = self
                .exchange(&mut route, path, &Packet::close(&sid), &mut report)
                .await;
            if is_session_lost(&close) {
                report.lost.push(close);
            } else {
                close.assert_ok();
            }
            return report;
        }
    }

    /// Sends one packet of a session where the session lives, until some node answers.
    async fn exchange(
        &self,
        route: &mut Route,
        path: &str,
        packet: &Packet,
        report: &mut UploadReport,
    ) -> Reply {
        let started = Instant::now();
        loop {
            let url = self.url(route, path);
            let error = match self.http.send(&url, packet).await {
                Ok(reply) => {
                    route.unreachable_since = None;
                    return reply;
                }
                Err(error) => error,
            };
            assert!(
                started.elapsed() < self.give_up_after,
                "{url}: no answer for {:?}: {error}",
                started.elapsed()
            );
            if let (Some(_), Some(fallback)) = (&route.host, route.fallback) {
                let since = *route.unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= fallback {
                    report.fallbacks.push(since.elapsed());
                    route.host = None;
                    route.unreachable_since = None;
                    continue;
                }
            }
            tokio::time::sleep(self.retry_pause).await;
        }
    }
}

/// Files of the affinity test: (size, fragment size).
const AFFINITY_FILES: &[(usize, usize)] = &[
    (0, 64 * KIB),
    (1, 64 * KIB),
    (200 * KIB + 3, 64 * KIB),
    (MIB, 256 * KIB),
    (700 * KIB, 100 * KIB),
    (2 * MIB + 1, MIB),
];

/// The session records of a node's file store, read from their files.
fn file_records(root: &Path) -> Vec<SessionRecord> {
    common::leftovers(root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_slice(&std::fs::read(&p).expect("a record")).expect("a record"))
        .collect()
}

/// Clients that follow `BITS-Host-Id` upload several files at once through the load
/// balancer: each file lands, complete, in the root of the node that created its session,
/// and only there; both nodes got sessions.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_id_affinity() {
    let started = Instant::now();
    let farm = Arc::new(HostIdFarm::start().await);
    let client = Arc::new(FarmClient::new(&farm, true));
    let uploads: Vec<_> = AFFINITY_FILES
        .iter()
        .enumerate()
        .map(|(i, &(len, fragment))| {
            let client = client.clone();
            tokio::spawn(async move {
                let path = format!("/affinity-{i}-{len}.bin");
                let file = data(len, 5000 + i as u64);
                let report = client.upload(&path, &file, fragment, |_, _| {}).await;
                (path, file, report)
            })
        })
        .collect();
    let mut on_node: [Vec<(String, usize)>; 2] = [Vec::new(), Vec::new()];
    for upload in uploads {
        let (path, file, report) = upload.await.expect("upload");
        let [(_, Some(host))] = report.sessions.as_slice() else {
            panic!("{path}: one session on a host id expected: {report:?}");
        };
        assert_eq!(report.fallback, Some(FALLBACK), "{report:?}");
        assert!(
            report.lost.is_empty() && report.fallbacks.is_empty(),
            "{report:?}"
        );
        let node = HostIdFarm::node_of(host);
        assert_file(farm.root(node), &path, &file);
        assert!(
            !dest(farm.root(1 - node), &path).exists(),
            "{path} is on the node that did not create its session"
        );
        on_node[node].push((path, file.len()));
    }
    for (node, files) in on_node.iter().enumerate() {
        assert!(
            !files.is_empty(),
            "the load balancer sent no session to node {node}: {:?}",
            farm.lb.routed()
        );
        assert!(common::parts(farm.root(node)).is_empty());
        assert_closed_tombstones(&file_records(farm.root(node)), files);
    }
    println!(
        "host-id affinity: {} + {} files in {:.1} s",
        on_node[0].len(),
        on_node[1].len(),
        started.elapsed().as_secs_f64()
    );
}

/// The negative control: a client that ignores `BITS-Host-Id` and sends everything through
/// the load balancer reaches the other node every second packet, which answers 500
/// `0x8020001F` (it does not know the session), while the node that created the session
/// accepts the same packets.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignoring_host_id_loses_the_session() {
    let farm = HostIdFarm::start().await;
    let http = Http::unpooled();
    let url = format!("{}/ignored.bin", farm.origin());
    let file = data(256 * KIB, 6000);
    let create = http.post(&url, &Packet::create()).await;
    create.assert_ok();
    let sid = create.session_id();
    let owner = HostIdFarm::node_of(create.header("BITS-Host-Id").expect("a host id"));
    let mut offset = 0;
    for n in 0..4 {
        let end = offset + 64 * KIB;
        let ack = http
            .post(&url, &Packet::fragment(&sid, &file, offset, end))
            .await;
        let node = *farm.lb.routed().last().expect("routed");
        if node == owner {
            ack.assert_ok();
            assert_eq!(ack.received(), Some(end as u64), "{ack:?}");
            offset = end;
        } else {
            ack.assert_error(500, "0x8020001F");
        }
        // The load balancer alternates: Create-Session went to the owner, so the odd
        // fragments (n = 0, 2) reach the other node.
        assert_eq!(node == owner, n % 2 == 1, "{:?}", farm.lb.routed());
    }
    assert_eq!(offset, 128 * KIB);
    assert!(!dest(farm.root(1 - owner), "/ignored.bin").exists());
}

/// Fail-over: mid-upload the node holding the session dies. The client cannot connect to the
/// host id; once the fallback timeout has passed it goes back to the load balancer, gets
/// `0x8020001F` from the surviving node, starts over with Create-Session (getting the
/// survivor's host id) and completes there.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_id_fallback_after_a_node_dies() {
    const LEN: usize = MIB + 5;
    let started = Instant::now();
    let farm = HostIdFarm::start().await;
    let client = FarmClient::new(&farm, true);
    let path = "/fallback.bin";
    let file = data(LEN, 7000);
    let mut killed = None;
    let report = client
        .upload(path, &file, 64 * KIB, |host, offset| {
            if killed.is_none() && offset >= 256 * KIB as u64 {
                let host = host.expect("on a host id");
                farm.kill(host);
                killed = Some(HostIdFarm::node_of(host));
            }
        })
        .await;
    let dead = killed.expect("a node was killed");
    let survivor = 1 - dead;
    let [(_, Some(first)), (_, Some(second))] = report.sessions.as_slice() else {
        panic!("two sessions, each on a host id, expected: {report:?}");
    };
    assert_eq!(HostIdFarm::node_of(first), dead, "{report:?}");
    assert_eq!(HostIdFarm::node_of(second), survivor, "{report:?}");
    let [lost] = report.lost.as_slice() else {
        panic!("one lost session expected: {report:?}");
    };
    lost.assert_error(500, "0x8020001F");
    let [unreachable] = report.fallbacks.as_slice() else {
        panic!("one fallback expected: {report:?}");
    };
    assert!(
        *unreachable >= FALLBACK && *unreachable < FALLBACK + Duration::from_secs(1),
        "fell back after {unreachable:?}"
    );
    assert_file(farm.root(survivor), path, &file);
    assert!(common::parts(farm.root(survivor)).is_empty());
    assert_closed_tombstones(
        &file_records(farm.root(survivor)),
        &[(path.to_owned(), LEN)],
    );
    // The dead node's session stays behind, staged, until its session timeout (§14).
    assert!(!dest(farm.root(dead), path).exists());
    assert_eq!(common::parts(farm.root(dead)).len(), 1);
    println!(
        "host-id fallback: fell back {:.2} s after the node died; {:.1} s in all",
        unreachable.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. No shared filesystem: one shared store, one bucket, a root of its own on every node.

/// Two nodes with separate local folders, one shared store and one bucket (`S3Staging` on
/// moto, 64 KiB parts). Every packet goes to the other node than the one before; node A is
/// killed in the middle of a fragment that crossed part boundaries, and a new node with a new
/// empty folder takes its place. The file comes out of the bucket byte-identical, nothing is
/// staged in the bucket or in any folder, and no multipart upload is left open.
#[cfg(all(feature = "s3", any(feature = "postgres", feature = "redis")))]
async fn no_shared_filesystem(backend: Backend) {
    use object_store::ObjectStoreExt;
    use tokio::io::AsyncWriteExt;

    let Some(store) = SharedStore::new(backend).await else {
        return;
    };
    let endpoint = match std::env::var("AXUM_BITS_TEST_S3_SMALL_URL") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("AXUM_BITS_TEST_S3_SMALL_URL is not set: .ci/run must start moto")
        }
        _ => return eprintln!("AXUM_BITS_TEST_S3_SMALL_URL is not set; skipping"),
    };
    let started = Instant::now();
    let sid = axum_bits::session::SessionId::new().to_string();
    let bucket = format!("farm-{}", sid.trim_matches(['{', '}']).to_lowercase());
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("create the bucket");
    assert!(created.status().is_success(), "{created:?}");
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_virtual_hosted_style_request(false)
        .build()
        .expect("S3 client");

    let roots: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("root")).collect();
    let spawn = |root: &Path| {
        let mut spec = NodeSpec::new(SocketAddr::from(([127, 0, 0, 1], 0)), root, store.spec());
        spec.lease_ttl = Some(LEASE_TTL);
        spec.s3 = Some(format!("{endpoint} {bucket} {}", 64 * KIB));
        spec.spawn()
    };
    let mut a = Some(spawn(roots[0].path()).await);
    let b = spawn(roots[1].path()).await;
    let http = Http::pooled();

    const LEN: usize = 2 * MIB + 333;
    const FRAG: usize = 100 * KIB + 7;
    let path = "/farm/no-shared-fs.bin";
    let file = data(LEN, 5000);
    let create = http
        .post(&a.as_ref().expect("A").url(path), &Packet::create())
        .await;
    create.assert_ok();
    let sid = create.session_id();
    let mut offset = 0;
    let mut on_b = true;
    // A third of the file, alternating.
    while offset < LEN / 3 {
        let end = (offset + FRAG).min(LEN);
        let node = if on_b { &b } else { a.as_ref().expect("A") };
        let ack = http
            .post(&node.url(path), &Packet::fragment(&sid, &file, offset, end))
            .await;
        ack.assert_ok();
        assert_eq!(ack.received(), Some(end as u64), "{ack:?}");
        offset = end;
        on_b = !on_b;
    }
    // A gets a fragment of 300 KiB, receives 250 KiB of it (whole parts reach the bucket),
    // and dies.
    let a_addr = a.as_ref().expect("A").addr();
    let mut stalled = raw_fragment_head(a_addr, path, &sid, offset, 300 * KIB, LEN).await;
    stalled
        .write_all(&file[offset..offset + 250 * KIB])
        .await
        .expect("part of the body");
    store.wait_for_lease(&sid).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.take().expect("A").kill();
    drop(stalled);
    // A new node with a folder of its own takes A's place; B answers first, from where the
    // record says.
    let c = spawn(roots[2].path()).await;
    let ack = http
        .post(
            &b.url(path),
            &Packet::fragment(&sid, &file, offset, offset + FRAG),
        )
        .await;
    ack.assert_ok();
    assert_eq!(ack.received(), Some((offset + FRAG) as u64), "{ack:?}");
    offset += FRAG;
    on_b = false;
    while offset < LEN {
        let end = (offset + FRAG).min(LEN);
        let node = if on_b { &b } else { &c };
        let ack = http
            .post(&node.url(path), &Packet::fragment(&sid, &file, offset, end))
            .await;
        ack.assert_ok();
        assert_eq!(ack.received(), Some(end as u64), "{ack:?}");
        offset = end;
        on_b = !on_b;
    }
    let last = if on_b { &b } else { &c };
    http.post(&last.url(path), &Packet::close(&sid))
        .await
        .assert_ok();

    let got = s3
        .get(&object_store::path::Path::from("up/farm/no-shared-fs.bin"))
        .await
        .expect("the object")
        .bytes()
        .await
        .expect("its bytes");
    assert!(got == file, "the object differs from the file");
    let keys: Vec<String> = {
        use futures_util::TryStreamExt;
        use object_store::ObjectStore;
        let listed: Vec<_> = s3.list(None).try_collect().await.expect("list");
        listed.into_iter().map(|m| m.location.to_string()).collect()
    };
    assert_eq!(
        keys,
        ["up/farm/no-shared-fs.bin"],
        "nothing staged in the bucket"
    );
    let uploads = reqwest::Client::new()
        .get(format!("{endpoint}/{bucket}?uploads"))
        .send()
        .await
        .expect("list uploads")
        .text()
        .await
        .expect("body");
    assert_eq!(uploads.matches("<UploadId>").count(), 0, "{uploads}");
    for root in &roots {
        assert!(
            common::leftovers(root.path()).is_empty(),
            "left in a node's folder: {:?}",
            common::leftovers(root.path())
        );
        assert!(
            !root.path().join("farm").exists(),
            "no file in a node's folder"
        );
    }
    assert_closed_tombstones(&store.records().await, &[(path.to_owned(), LEN)]);
    println!(
        "no shared filesystem on {backend:?}: {} MiB through 3 nodes, one killed, in {:.1} s",
        LEN / MIB,
        started.elapsed().as_secs_f64()
    );
    drop((b, c));
}

#[cfg(all(feature = "s3", feature = "postgres"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_shared_filesystem_postgres() {
    no_shared_filesystem(Backend::Postgres).await;
}

#[cfg(all(feature = "s3", feature = "redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_shared_filesystem_redis() {
    no_shared_filesystem(Backend::Redis).await;
}
