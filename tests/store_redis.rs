//! `RedisStore` against a real Redis server: the conformance suite, two nodes sharing one
//! server, key prefixes, corrupt data, migrations, an unreachable server and lease expiry.
//!
//! The server's URL comes from `AXUM_BITS_TEST_REDIS_URL` (`.ci/services.sh` starts one). Each
//! test works under a key prefix of its own and deletes its keys when it ends.

#![cfg(all(feature = "redis", feature = "conformance"))]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum_bits::session::{DeferredState, Owner, Phase, SessionId, SessionRecord};
use axum_bits::store::conformance::{self, fresh_record, race};
use axum_bits::store::{RedisStore, SessionStore, StoreError};

/// The test server's URL, or `None` (skip) when it is not configured outside CI.
fn redis_url() -> Option<String> {
    match std::env::var("AXUM_BITS_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "AXUM_BITS_TEST_REDIS_URL is not set: .ci/run must start Redis (.ci/services.sh)"
        ),
        _ => {
            eprintln!("AXUM_BITS_TEST_REDIS_URL is not set; skipping this Redis test");
            None
        }
    }
}

/// A key prefix of one test; deletes every key under it when dropped, even after a failure.
struct Prefix {
    url: String,
    name: String,
}

impl Prefix {
    fn new(url: &str) -> Self {
        let id = SessionId::new().to_string();
        Self {
            url: url.to_owned(),
            name: format!("axum-bits-test-{}", id.trim_matches(['{', '}'])),
        }
    }

    /// A store under this prefix, on a connection of its own (as another node would have).
    async fn store(&self) -> RedisStore {
        let store = RedisStore::connect(&self.url)
            .await
            .expect("connect")
            .with_key_prefix(&self.name)
            .expect("key prefix");
        store.migrate().await.expect("migrate");
        store
    }

    /// A plain connection for looking at (and tampering with) the keys.
    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection")
    }

    fn key(&self, rest: &str) -> String {
        format!("{{{}}}:{rest}", self.name)
    }

    /// Every key under this prefix.
    async fn keys(&self) -> HashSet<String> {
        let mut conn = self.raw().await;
        let mut cursor = 0u64;
        let mut keys = HashSet::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("SCAN");
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }

    fn pattern(&self) -> String {
        format!("{{{}}}:*", self.name)
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(5)) else {
            return;
        };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.pattern())
                .arg("COUNT")
                .arg(1000)
                .query::<(u64, Vec<String>)>(&mut conn)
            else {
                return;
            };
            if !keys.is_empty() {
                let _ = redis::cmd("DEL").arg(&keys).query::<i64>(&mut conn);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

fn holding(destination: &str) -> SessionRecord {
    let mut record = fresh_record("node.bin");
    record.destination = destination.to_owned();
    record
}

async fn load(store: &RedisStore, id: SessionId) -> SessionRecord {
    match store.load(id).await {
        Ok(Some(record)) => record,
        other => panic!("load of a stored record: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let Some(url) = redis_url() else { return };
    let prefix = Prefix::new(&url);
    let store = prefix.store().await;
    assert!(store.is_shared(), "a Redis store is shared");
    conformance::run(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_are_exclusive_between_nodes() {
    let Some(url) = redis_url() else { return };
    let prefix = Prefix::new(&url);
    let nodes = [prefix.store().await, prefix.store().await];
    let id = SessionId::new();
    let long = Duration::from_secs(60);

    assert!(nodes[0].acquire_lease(id, "a", long).await.unwrap());
    assert!(
        !nodes[1].acquire_lease(id, "b", long).await.unwrap(),
        "another node cannot take a held lease"
    );
    nodes[1].release_lease(id, "b").await.unwrap();
    assert!(
        !nodes[1].acquire_lease(id, "b", long).await.unwrap(),
        "another node's release does not end the lease"
    );
    nodes[0].release_lease(id, "a").await.unwrap();
    assert!(
        nodes[1].acquire_lease(id, "b", long).await.unwrap(),
        "a released lease can be taken from the other node"
    );
    nodes[1].release_lease(id, "b").await.unwrap();
}

/// Creates, compare-and-sets and leases racing over two nodes (connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn races_across_nodes() {
    let Some(url) = redis_url() else { return };
    let prefix = Prefix::new(&url);
    let nodes = [
        Arc::new(prefix.store().await),
        Arc::new(prefix.store().await),
    ];
    conformance::races_across(&nodes).await;
}

#[tokio::test]
async fn key_prefixes_isolate_stores() {
    let Some(url) = redis_url() else { return };
    let (first, second) = (Prefix::new(&url), Prefix::new(&url));
    let (a, b) = (first.store().await, second.store().await);
    let owner = Owner::new("alice");

    let mut record = fresh_record("isolated.bin");
    record.owner = Some(owner.clone());
    a.create(&record).await.unwrap();
    assert!(matches!(b.load(record.id).await, Ok(None)));
    assert!(b.list().await.unwrap().is_empty());
    assert_eq!(b.count_open().await.unwrap(), 0);
    assert_eq!(b.count_open_for(&owner).await.unwrap(), 0);
    assert!(b.list_idle(u64::MAX).await.unwrap().is_empty());
    assert!(
        matches!(b.update(0, &record).await, Err(StoreError::NotFound)),
        "another prefix does not see the record"
    );
    b.create(&record)
        .await
        .expect("the same id and destination are free under another prefix");
    assert!(
        a.acquire_lease(record.id, "a", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        b.acquire_lease(record.id, "b", Duration::from_secs(60))
            .await
            .unwrap(),
        "leases are per prefix"
    );
    assert!(b.remove(record.id).await.unwrap());
    assert_eq!(load(&a, record.id).await, record);
    assert_eq!(a.count_open_for(&owner).await.unwrap(), 1);
    assert!(
        second
            .keys()
            .await
            .iter()
            .all(|k| k.starts_with(&second.key("")))
    );
    assert!(
        first.keys().await.contains(&first.key("open")),
        "keys carry their store's prefix as hash tag"
    );
}

#[tokio::test]
async fn key_prefix_is_validated() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url).await.unwrap();
    for bad in ["", "a{b", "a}b", "{x}", &"x".repeat(65)] {
        assert!(
            matches!(
                store.clone().with_key_prefix(bad),
                Err(StoreError::Backend(_))
            ),
            "prefix {bad:?} must be refused"
        );
    }
    assert!(store.clone().with_key_prefix(&"x".repeat(64)).is_ok());
    assert!(store.with_key_prefix("tenant:1/bits").is_ok());
}

#[tokio::test]
async fn corrupt_record_is_a_backend_error() {
    let Some(url) = redis_url() else { return };
    let prefix = Prefix::new(&url);
    let store = prefix.store().await;
    let mut conn = prefix.raw().await;
    let record = fresh_record("corrupt.bin");
    let healthy = fresh_record("healthy.bin");
    store.create(&record).await.unwrap();
    store.create(&healthy).await.unwrap();
    let key = prefix.key(&format!(
        "s:{}",
        record.id.to_string().trim_matches(['{', '}'])
    ));

    let _: i64 = redis::cmd("HSET")
        .arg(&key)
        .arg("json")
        .arg("{\"id\": not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(store.load(record.id).await, Err(StoreError::Backend(_))),
        "a record that is not JSON fails to load"
    );
    let listed: Vec<SessionId> = store.list().await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(
        listed,
        [healthy.id],
        "list skips the corrupt record and keeps the rest"
    );

    // Valid JSON, but another session's record.
    let _: i64 = redis::cmd("HSET")
        .arg(&key)
        .arg("json")
        .arg(serde_json::to_string(&healthy).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        store.load(record.id).await,
        Err(StoreError::Backend(_))
    ));

    // Missing index fields.
    let _: i64 = redis::cmd("HDEL")
        .arg(&key)
        .arg("rev")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut next = record.clone();
    next.revision = 1;
    assert!(
        matches!(store.update(0, &next).await, Err(StoreError::Backend(_))),
        "a record without its revision field cannot be updated"
    );
    assert!(matches!(
        store.remove(record.id).await,
        Err(StoreError::Backend(_))
    ));

    // Not a hash at all.
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        store.load(record.id).await,
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        store.update(0, &next).await,
        Err(StoreError::Backend(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_is_idempotent_and_concurrent() {
    let Some(url) = redis_url() else { return };
    let prefix = Prefix::new(&url);
    let store = Arc::new(prefix.store().await);
    store.migrate().await.expect("second migrate");
    store.migrate().await.expect("third migrate");
    let other = Arc::new(prefix.store().await);
    let results = race(8, |i| {
        let store = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        async move { store.migrate().await }
    })
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let mut conn = prefix.raw().await;
    let version: String = redis::cmd("GET")
        .arg(prefix.key("schema"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(version, "1");

    // Scripts come back by themselves after the server's script cache is flushed.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let record = fresh_record("after-flush.bin");
    store
        .create(&record)
        .await
        .expect("create after SCRIPT FLUSH");

    let _: () = redis::cmd("SET")
        .arg(prefix.key("schema"))
        .arg("999")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(store.migrate().await, Err(StoreError::Backend(_))),
        "migrate refuses data of another layout version"
    );
}

#[tokio::test]
async fn unreachable_server_fails_in_bounded_time() {
    let start = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        RedisStore::connect("redis://127.0.0.1:1/"),
    )
    .await
    .expect("connect to an unreachable server must not hang");
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
    eprintln!("unreachable server failed after {:?}", start.elapsed());

    assert!(matches!(
        RedisStore::connect("not a url").await,
        Err(StoreError::Backend(_))
    ));
}

#[tokio::test]
async fn lease_expires_by_the_servers_clock() {
    let Some(url) = redis_url() else { return };
    let prefix = Prefix::new(&url);
    let (a, b) = (prefix.store().await, prefix.store().await);
    let id = SessionId::new();
    assert!(
        a.acquire_lease(id, "a", Duration::from_millis(400))
            .await
            .unwrap()
    );

    // The expiry is the server's: the lease key carries it.
    let mut conn = prefix.raw().await;
    let lease_key = prefix.key(&format!("l:{}", id.to_string().trim_matches(['{', '}'])));
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&lease_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=400).contains(&pttl),
        "the lease key expires on the server within its ttl, PTTL {pttl}"
    );
    assert!(
        !b.acquire_lease(id, "b", Duration::from_secs(60))
            .await
            .unwrap()
    );

    tokio::time::sleep(Duration::from_millis(800)).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&lease_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the server dropped the expired lease");
    assert!(
        b.acquire_lease(id, "b", Duration::from_secs(60))
            .await
            .unwrap(),
        "a lease its holder stopped renewing can be taken over"
    );
    assert!(
        !a.acquire_lease(id, "a", Duration::from_secs(60))
            .await
            .unwrap(),
        "the old holder cannot renew a lease it lost"
    );

    // A zero ttl still makes a (1 ms) lease rather than an error.
    let other = SessionId::new();
    assert!(a.acquire_lease(other, "a", Duration::ZERO).await.unwrap());
}

#[tokio::test]
async fn indexes_follow_every_change_and_leave_nothing_behind() {
    let Some(url) = redis_url() else { return };
    let prefix = Prefix::new(&url);
    let store = prefix.store().await;
    let (alice, bob) = (Owner::new("alice"), Owner::new("bob"));

    // Destination and owner changed by an update (never done by the layer, but allowed).
    let mut record = fresh_record("moving.bin");
    record.owner = Some(alice.clone());
    store.create(&record).await.unwrap();
    let old_destination = record.destination.clone();
    let mut moved = record.clone();
    moved.revision = 1;
    moved.destination = fresh_record("moved.bin").destination;
    moved.owner = Some(bob.clone());
    store.update(0, &moved).await.unwrap();
    assert_eq!(store.count_open_for(&alice).await.unwrap(), 0);
    assert_eq!(store.count_open_for(&bob).await.unwrap(), 1);
    let successor = holding(&old_destination);
    store
        .create(&successor)
        .await
        .expect("the old destination was released");
    assert!(matches!(
        store.create(&holding(&moved.destination)).await,
        Err(StoreError::DestinationBusy { holder }) if holder == moved.id
    ));

    // An update may not make a record claim a destination another session holds.
    let mut grabbing = fresh_record("grabbing.bin");
    grabbing.claims_destination = false;
    grabbing.destination = old_destination.clone();
    store.create(&grabbing).await.unwrap();
    let mut claims = grabbing.clone();
    claims.revision = 1;
    claims.claims_destination = true;
    assert!(matches!(
        store.update(0, &claims).await,
        Err(StoreError::DestinationBusy { holder }) if holder == successor.id
    ));
    assert_eq!(load(&store, grabbing.id).await, grabbing, "nothing changed");

    // Owner dropped, then the session closed with a pending deferred commit.
    let mut anonymous = moved.clone();
    anonymous.revision = 2;
    anonymous.owner = None;
    store.update(1, &anonymous).await.unwrap();
    assert_eq!(store.count_open_for(&bob).await.unwrap(), 0);
    let mut deferred = anonymous.clone();
    deferred.revision = 3;
    deferred.phase = Phase::Closed;
    // `DeferredState` is non-exhaustive: made the way a stored record would hold it.
    let pending: DeferredState = serde_json::from_value(serde_json::json!({
        "status": "pending",
        "attempts": 1,
        "next_attempt_ms": 0,
        "last_error": null,
    }))
    .unwrap();
    deferred.deferred = Some(pending);
    assert!(deferred.is_deferred() && deferred.holds_destination());
    store.update(2, &deferred).await.unwrap();
    assert_eq!(
        store.count_open().await.unwrap(),
        2,
        "successor and grabbing"
    );
    assert!(matches!(
        store.create(&holding(&deferred.destination)).await,
        Err(StoreError::DestinationBusy { .. })
    ));

    let mut owned = fresh_record("owned.bin");
    owned.owner = Some(alice.clone());
    store.create(&owned).await.unwrap();
    assert!(
        store
            .acquire_lease(owned.id, "n", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(store.remove(owned.id).await.unwrap());
    assert!(
        !store
            .acquire_lease(owned.id, "m", Duration::from_secs(60))
            .await
            .unwrap(),
        "remove leaves the lease alone"
    );
    store.release_lease(owned.id, "n").await.unwrap();

    for id in [deferred.id, successor.id, grabbing.id] {
        assert!(store.remove(id).await.unwrap());
    }
    assert_eq!(store.count_open().await.unwrap(), 0);
    assert_eq!(store.count_open_for(&alice).await.unwrap(), 0);
    assert_eq!(
        prefix.keys().await,
        HashSet::from([prefix.key("schema")]),
        "no record, index entry or lease is left behind"
    );
}
