//! Fragments per second with 64 KiB fragments for each session store, on one node and on two
//! nodes that share the store and the upload root.
//!
//! ```text
//! . .ci/services.sh   # PostgreSQL and Redis on 127.0.0.1 (exports their URLs)
//! cargo bench --bench farm --features sqlite,postgres,redis -- [--seconds 10] [--sessions 8] [--quick]
//! ```
//!
//! Every node is a `BitsLayer` with a store client of its own (its own connection pool),
//! served by `axum_bits::serve` on its own 127.0.0.1 port, in this process. `--sessions`
//! uploads run at once, each sending its packets round-robin over the nodes (Create-Session to
//! one, the next Fragment to the next, and so on), one request at a time, as a client behind a
//! load balancer without affinity would. Each upload is 1,024 fragments of 64 KiB (64 MiB);
//! when one finishes, its worker starts the next, until the time is up. Stores that one process
//! owns (memory, file) run on one node only. PostgreSQL and Redis come from
//! `AXUM_BITS_TEST_POSTGRES_URL` and `AXUM_BITS_TEST_REDIS_URL`; a store whose feature is off
//! or whose URL is unset is skipped with a note.
//!
//! A second table runs the store calls of a Fragment alone, without HTTP or the layer: on a
//! shared store `lease_and_load` then `update_and_release`, on the others `load` then
//! `update`, one session, one call at a time. It is the ceiling of one upload on that store,
//! and the difference to the first table's one-upload row is what the layer and HTTP cost.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum_bits::session::SessionRecord;
use axum_bits::store::{FileStore, Leased, MemoryStore, SessionStore};
use axum_bits::{BitsLayer, SessionId};
use bytes::Bytes;

const FRAGMENT: usize = 64 << 10;
const FRAGMENTS_PER_UPLOAD: u64 = 1024;
const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Options {
    seconds: f64,
    sessions: usize,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut options = Options {
        seconds: 10.0,
        sessions: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => {
                options.seconds = 1.0;
                options.sessions = 2;
            }
            "--seconds" => options.seconds = parse(args.next(), "--seconds")?,
            "--sessions" => options.sessions = parse(args.next(), "--sessions")?,
            // cargo bench passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    println!(
        "64 KiB fragments, {} uploads at once, {:.0} s per row, packets round-robin over the nodes",
        options.sessions, options.seconds
    );
    println!(
        "{:<10} {:>5} {:>12} {:>9} {:>9} {:>9}",
        "store", "nodes", "fragments/s", "MB/s", "p50 ms", "p99 ms"
    );
    for kind in ["memory", "file", "sqlite", "postgres", "redis"] {
        let shared = !matches!(kind, "memory" | "file");
        for nodes in [1, 2] {
            if nodes > 1 && !shared {
                continue;
            }
            match measure(kind, nodes, &options).await {
                Ok(Some(row)) => println!(
                    "{:<10} {:>5} {:>12.0} {:>9.1} {:>9.2} {:>9.2}",
                    kind,
                    nodes,
                    row.fragments_per_s,
                    row.fragments_per_s * FRAGMENT as f64 / 1e6,
                    row.p50_ms,
                    row.p99_ms
                ),
                // Skipped (the note is printed once).
                Ok(None) => break,
                Err(e) => {
                    println!("{kind:<10} {nodes:>5} failed: {e}");
                    return Err(e);
                }
            }
        }
    }
    println!();
    println!(
        "a Fragment's store calls alone, one session, one call at a time, {:.0} s per row",
        options.seconds
    );
    println!(
        "{:<10} {:>12} {:>14}",
        "store", "fragments/s", "µs/fragment"
    );
    for kind in ["memory", "file", "sqlite", "postgres", "redis"] {
        let dir = tempfile::tempdir()?;
        let calls = Use::Calls {
            seconds: options.seconds,
        };
        match with_store(calls, kind, dir.path(), &prefix()).await {
            Ok(Some(Used::Calls(per_s))) => {
                println!("{kind:<10} {per_s:>12.0} {:>14.1}", 1e6 / per_s);
            }
            Ok(_) => {}
            Err(e) => {
                println!("{kind:<10} failed: {e}");
                return Err(e);
            }
        }
    }
    Ok(())
}

fn parse<T: std::str::FromStr>(value: Option<String>, flag: &str) -> Result<T, Error> {
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{flag} needs a number").into())
}

struct Row {
    fragments_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A fresh name for tables and keys, so runs do not see each other.
fn prefix() -> String {
    let id = axum_bits::SessionId::new().to_string();
    format!("bench{}_", &id[1..9].to_lowercase())
}

async fn measure(kind: &str, nodes: usize, options: &Options) -> Result<Option<Row>, Error> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    let prefix = prefix();
    let mut urls = Vec::new();
    for _ in 0..nodes {
        let builder = BitsLayer::builder(&root).max_sessions(10_000);
        let Some(Used::Layer(builder)) =
            with_store(Use::Layer(Box::new(builder)), kind, &root, &prefix).await?
        else {
            return Ok(None);
        };
        let layer = builder.build()?;
        let app = Router::new().layer(layer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}", listener.local_addr()?));
        tokio::spawn(axum_bits::serve(listener, app).run(std::future::pending()));
    }
    let urls = Arc::new(urls);
    let payload = Bytes::from(
        (0..FRAGMENT)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(options.seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..options.sessions {
        let (urls, payload, done) = (urls.clone(), payload.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            upload_until(worker, &urls, &payload, &done, deadline).await
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(Some(Row {
        fragments_per_s: done.load(Ordering::Relaxed) as f64 / elapsed,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    }))
}

/// What [`with_store`] does with the store it opens.
enum Use {
    /// Gives it to the layer being built.
    Layer(Box<axum_bits::BitsLayerBuilder>),
    /// Runs a Fragment's store calls on it for so many seconds.
    Calls { seconds: f64 },
}

/// What [`with_store`] made of its [`Use`].
enum Used {
    Layer(Box<axum_bits::BitsLayerBuilder>),
    /// Fragments' store calls per second.
    Calls(f64),
}

impl Use {
    async fn with(self, store: impl SessionStore) -> Result<Used, Error> {
        match self {
            Self::Layer(builder) => Ok(Used::Layer(Box::new(builder.store(store)))),
            Self::Calls { seconds } => Ok(Used::Calls(fragment_calls(&store, seconds).await?)),
        }
    }
}

/// A Fragment's store calls, one after another on one session, for `seconds`: per second.
async fn fragment_calls(store: &impl SessionStore, seconds: f64) -> Result<f64, Error> {
    const HOLDER: &str = "bench-node";
    const TTL: Duration = Duration::from_secs(30);
    let id = SessionId::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut record = SessionRecord::new(id, "calls.bin".into(), "/calls.bin".into(), None, now_ms);
    record.total = Some(FRAGMENT as u64 * FRAGMENTS_PER_UPLOAD);
    store.create(&record).await?;
    let shared = store.is_shared();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut done = 0u64;
    while Instant::now() < deadline {
        let current = if shared {
            match store.lease_and_load(id, HOLDER, TTL).await? {
                Leased::Granted(Some(current)) => current,
                Leased::Granted(None) => return Err("the record is gone".into()),
                Leased::Busy => return Err("the lease is held".into()),
            }
        } else {
            store.load(id).await?.ok_or("the record is gone")?
        };
        let mut next = current.clone();
        next.revision += 1;
        next.received =
            (next.received + FRAGMENT as u64) % (FRAGMENT as u64 * FRAGMENTS_PER_UPLOAD);
        if shared {
            store
                .update_and_release(current.revision, &next, HOLDER)
                .await?;
        } else {
            store.update(current.revision, &next).await?;
        }
        done += 1;
    }
    let per_s = done as f64 / started.elapsed().as_secs_f64();
    store.remove(id).await?;
    Ok(per_s)
}

async fn with_store(
    what: Use,
    kind: &str,
    root: &Path,
    prefix: &str,
) -> Result<Option<Used>, Error> {
    // Unused when every shared store is compiled out.
    let _ = prefix;
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let skip = |why: &str| {
        println!("{kind:<10} skipped: {why}");
        Ok(None)
    };
    match kind {
        "memory" => Ok(Some(what.with(MemoryStore::new()).await?)),
        "file" => Ok(Some(
            what.with(FileStore::open(root.join(".bits/sessions"))?)
                .await?,
        )),
        "sqlite" => {
            #[cfg(feature = "sqlite")]
            {
                std::fs::create_dir_all(root.join(".bits"))?;
                let store = axum_bits::store::SqliteStore::open(root.join(".bits/sessions.db"))
                    .await?
                    .with_table_prefix(prefix)?;
                store.migrate().await?;
                Ok(Some(what.with(store).await?))
            }
            #[cfg(not(feature = "sqlite"))]
            skip("built without the sqlite feature")
        }
        "postgres" => {
            let Some(url) = env("AXUM_BITS_TEST_POSTGRES_URL") else {
                return skip("AXUM_BITS_TEST_POSTGRES_URL is not set");
            };
            #[cfg(feature = "postgres")]
            {
                let store = axum_bits::store::PostgresStore::connect(&url)
                    .await?
                    .with_table_prefix(prefix)?;
                store.migrate().await?;
                Ok(Some(what.with(store).await?))
            }
            #[cfg(not(feature = "postgres"))]
            {
                let _ = url;
                skip("built without the postgres feature")
            }
        }
        "redis" => {
            let Some(url) = env("AXUM_BITS_TEST_REDIS_URL") else {
                return skip("AXUM_BITS_TEST_REDIS_URL is not set");
            };
            #[cfg(feature = "redis")]
            {
                let store = axum_bits::store::RedisStore::connect(&url)
                    .await?
                    .with_key_prefix(prefix.trim_end_matches('_'))?;
                store.migrate().await?;
                Ok(Some(what.with(store).await?))
            }
            #[cfg(not(feature = "redis"))]
            {
                let _ = url;
                skip("built without the redis feature")
            }
        }
        _ => Err(format!("unknown store {kind}").into()),
    }
}

/// Uploads files one after another until the deadline; returns every Fragment's Ack latency.
async fn upload_until(
    worker: usize,
    urls: &[String],
    payload: &Bytes,
    done: &AtomicU64,
    deadline: Instant,
) -> Result<Vec<Duration>, Error> {
    let client = reqwest::Client::new();
    let bits_post = reqwest::Method::from_bytes(b"BITS_POST")?;
    let total = FRAGMENT as u64 * FRAGMENTS_PER_UPLOAD;
    let mut latencies = Vec::new();
    let mut turn = worker;
    let mut file = 0;
    while Instant::now() < deadline {
        let mut next = || {
            turn += 1;
            &urls[turn % urls.len()]
        };
        let path = format!("/w{worker}-{file}.bin");
        file += 1;
        let created = client
            .request(bits_post.clone(), format!("{}{path}", next()))
            .header("BITS-Packet-Type", "Create-Session")
            .header("BITS-Supported-Protocols", PROTOCOL)
            .send()
            .await?;
        let session = ok(created, "Create-Session")?
            .headers()
            .get("BITS-Session-Id")
            .ok_or("no session id")?
            .clone();
        for n in 0..FRAGMENTS_PER_UPLOAD {
            if Instant::now() >= deadline {
                break;
            }
            let start = n * FRAGMENT as u64;
            let sent = Instant::now();
            let reply = client
                .request(bits_post.clone(), format!("{}{path}", next()))
                .header("BITS-Packet-Type", "Fragment")
                .header("BITS-Session-Id", session.clone())
                .header(
                    "Content-Range",
                    format!("bytes {start}-{}/{total}", start + FRAGMENT as u64 - 1),
                )
                .body(payload.clone())
                .send()
                .await?;
            ok(reply, "Fragment")?;
            latencies.push(sent.elapsed());
            done.fetch_add(1, Ordering::Relaxed);
        }
        let kind = if Instant::now() >= deadline {
            "Cancel-Session"
        } else {
            "Close-Session"
        };
        let reply = client
            .request(bits_post.clone(), format!("{}{path}", next()))
            .header("BITS-Packet-Type", kind)
            .header("BITS-Session-Id", session)
            .send()
            .await?;
        ok(reply, kind)?;
    }
    Ok(latencies)
}

fn ok(reply: reqwest::Response, what: &str) -> Result<reqwest::Response, Error> {
    if reply.status().is_success() {
        return Ok(reply);
    }
    let code = reply
        .headers()
        .get("BITS-Error-Code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    Err(format!("{what}: {} (BITS-Error-Code {code})", reply.status()).into())
}
