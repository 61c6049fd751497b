//! Servers in child processes: the test binary re-executes itself to run one named `#[test]`
//! function, which acts as a server when an environment variable tells it to (and does
//! nothing otherwise, so that it passes in the ordinary test run).
//!
//! The parent side is [`Node`] (started with [`NodeCommand`]): it waits for the child's
//! `LISTENING <addr>` line on stdout, SIGKILLs and reaps the child when dropped, and its
//! [`kill`](Node::kill) fails the test if the child had already died by itself
//! ([`stop`](Node::stop) does not look). The child side is [`run_child`] and [`announce`]:
//! the child exits when its parent dies (its stdin closes), so no server outlives a test run.
//!
//! ```ignore
//! const ROOT_ENV: &str = "MY_CHILD_ROOT";
//!
//! #[test]
//! fn my_child_server() {
//!     let Some(root) = std::env::var_os(ROOT_ENV) else { return };
//!     node::run_child(async move {
//!         let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//!         node::announce(listener.local_addr().unwrap());
//!         // ... serve until killed
//!     });
//! }
//!
//! let server = NodeCommand::new("my_child_server").env(ROOT_ENV, root).spawn();
//! let url = server.url("/file.bin");
//! server.kill();
//! ```

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a child may take to report that it listens, unless
/// [`NodeCommand::startup_limit`] says otherwise.
pub const STARTUP_LIMIT: Duration = Duration::from_secs(30);

/// The line a child prints once it accepts connections, followed by its address.
pub const LISTENING: &str = "LISTENING ";

/// How to start a child server: which test function of this binary it runs, and its
/// environment (added to the parent's, which it inherits).
#[derive(Debug, Clone)]
pub struct NodeCommand {
    test: String,
    env: Vec<(OsString, OsString)>,
    startup_limit: Duration,
}

/// Why a child server did not start.
#[derive(Debug)]
pub enum SpawnError {
    /// The test binary could not be executed.
    Spawn(std::io::Error),
    /// The child ended before it reported an address (a panic, e.g. a port it could not
    /// bind; its stderr is the test's).
    Exited(Option<ExitStatus>),
    /// No address within the startup limit (the child is killed).
    Timeout(Duration),
    /// The `LISTENING` line did not hold an address.
    BadAddress(String),
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spawn(e) => write!(f, "cannot execute the test binary: {e}"),
            Self::Exited(Some(status)) => {
                write!(
                    f,
                    "the child exited before it listened ({status}): see its stderr"
                )
            }
            Self::Exited(None) => write!(f, "the child closed its stdout before it listened"),
            Self::Timeout(limit) => write!(f, "the child did not listen within {limit:?}"),
            Self::BadAddress(line) => write!(f, "the child reported no address: {line:?}"),
        }
    }
}

impl std::error::Error for SpawnError {}

impl NodeCommand {
    /// A child that runs the `#[test]` function named `test` (an exact name) of this binary.
    pub fn new(test: &str) -> Self {
        Self {
            test: test.to_owned(),
            env: Vec::new(),
            startup_limit: STARTUP_LIMIT,
        }
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets environment variables for the child.
    pub fn envs<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (name, value) in vars {
            self = self.env(name, value);
        }
        self
    }

    /// How long the child may take to print its `LISTENING` line.
    pub fn startup_limit(mut self, limit: Duration) -> Self {
        self.startup_limit = limit;
        self
    }

    /// Starts the child and waits until it listens; panics if it does not.
    pub fn spawn(&self) -> Node {
        self.try_spawn()
            .unwrap_or_else(|e| panic!("child server {:?}: {e}", self.test))
    }

    /// Starts the child and waits until it listens. A child that did not start is killed
    /// and reaped before this returns.
    pub fn try_spawn(&self) -> Result<Node, SpawnError> {
        let exe = std::env::current_exe().map_err(SpawnError::Spawn)?;
        let mut child = Command::new(exe)
            .args([&self.test, "--exact", "--nocapture", "--test-threads=1"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(SpawnError::Spawn)?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        // Built before the wait, so that a failed start still kills and reaps the child.
        let mut node = Node {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            test: self.test.clone(),
            _stdin: stdin,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read every line, so that the child never blocks on a full pipe; report the
            // first address. libtest may print "test <name> ... " on the same line first.
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((_, addr)) = line.split_once(LISTENING) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(
                            addr.trim()
                                .parse::<SocketAddr>()
                                .map_err(|_| SpawnError::BadAddress(line.clone())),
                        );
                    }
                }
            }
        });
        match rx.recv_timeout(self.startup_limit) {
            Ok(Ok(addr)) => {
                node.addr = addr;
                Ok(node)
            }
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(SpawnError::Timeout(self.startup_limit)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Stdout closed: the child is gone or going; give it a moment to be reaped.
                let mut status = None;
                for _ in 0..100 {
                    status = node.child.try_wait().ok().flatten();
                    if status.is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(SpawnError::Exited(status))
            }
        }
    }
}

/// A server in a child process. SIGKILLed and reaped when dropped, so that no exit path of a
/// test, panics included, leaves a server behind.
pub struct Node {
    child: Child,
    addr: SocketAddr,
    test: String,
    /// Closed when the node is dropped (or the parent dies): the child then exits.
    _stdin: ChildStdin,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("test", &self.test)
            .field("pid", &self.child.id())
            .field("addr", &self.addr)
            .finish()
    }
}

impl Node {
    /// The address the child reported.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's exit status if it has exited (without reaping a live child).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("child status")
    }

    /// SIGKILL (on unix `Child::kill` sends SIGKILL) and reap. A child that had already
    /// exited crashed by itself: that fails the test.
    pub fn kill(mut self) {
        if let Some(status) = self.child.try_wait().expect("child status") {
            panic!(
                "child server {:?} at {} exited by itself ({status}): see its stderr",
                self.test, self.addr
            );
        }
        self.stop();
    }

    /// SIGKILL and reap, without [`kill`](Self::kill)'s check that the child was still
    /// running.
    pub fn stop(mut self) {
        self.child.kill().expect("kill the child");
        self.child.wait().expect("reap the child");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The child's side.

/// Runs `server` as a child server: exits the process when the parent's end of stdin closes
/// (the parent died or dropped its [`Node`]), logs to stderr if `RUST_LOG` is set, and runs
/// `server` on a two-thread tokio runtime. `server` must [`announce`] its address.
pub fn run_child<F: Future<Output = ()>>(server: F) {
    exit_with_parent();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(server);
}

/// Exits the process once stdin reaches its end: the parent test process died without
/// killing us, or dropped its [`Node`].
pub fn exit_with_parent() {
    std::thread::spawn(|| {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
}

/// Tells the parent that the child listens at `addr` (the `LISTENING <addr>` line).
pub fn announce(addr: SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{LISTENING}{addr}").expect("stdout");
    stdout.flush().expect("flush stdout");
}
