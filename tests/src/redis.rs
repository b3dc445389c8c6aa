//! Redis for the registry-source tests: a blocking client (the `redis` crate, as the agent
//! uses), and a private `redis-server` a test can kill and restart.
//!
//! The shared server of a test run is at `$MESH_TEST_REDIS` (`cargo xtask test` starts one on
//! 127.0.0.1:6390). Tests use their own key in it and delete it afterwards ([`KeyGuard`]).

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use redis::{RedisResult, Value};

/// Every step of a command (connect, write, read) is bounded by this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The address of the test run's Redis: `$MESH_TEST_REDIS`. Panics with how to get one.
pub fn test_redis_addr() -> SocketAddr {
    let value = std::env::var("MESH_TEST_REDIS").unwrap_or_default();
    assert!(
        !value.is_empty(),
        "MESH_TEST_REDIS is not set: run the tests with `cargo xtask test` (it starts \
         redis-server on 127.0.0.1:6390), or start one yourself (`redis-server --port 6390 \
         --save '' --appendonly no --daemonize yes`) and set MESH_TEST_REDIS=127.0.0.1:6390"
    );
    let addr: SocketAddr = value
        .parse()
        .unwrap_or_else(|e| panic!("MESH_TEST_REDIS={value:?} is not IP:PORT: {e}"));
    assert!(
        addr.ip().is_loopback(),
        "MESH_TEST_REDIS must be a loopback address, not {addr}"
    );
    addr
}

/// One connection to Redis.
pub struct RedisClient {
    connection: redis::Connection,
}

impl RedisClient {
    pub fn connect(addr: SocketAddr) -> RedisResult<RedisClient> {
        let client = redis::Client::open(format!("redis://{addr}/"))?;
        let connection = client.get_connection_with_timeout(IO_TIMEOUT)?;
        connection.set_read_timeout(Some(IO_TIMEOUT))?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(RedisClient { connection })
    }

    /// Sends one command (`args[0]` is its name); an error reply is an `Err`.
    pub fn command(&mut self, args: &[&str]) -> RedisResult<Value> {
        let (name, rest) = args.split_first().expect("a command has a name");
        let mut cmd = redis::cmd(name);
        for arg in rest {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.connection)
    }

    /// Sends one command and panics on an I/O error or an error reply.
    #[track_caller]
    pub fn cmd(&mut self, args: &[&str]) -> Value {
        self.command(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// `HSET key field value` then `PUBLISH <key>:changed field`.
    #[track_caller]
    pub fn hset_and_publish(&mut self, key: &str, field: &str, value: &str) {
        self.cmd(&["HSET", key, field, value]);
        self.publish_change(key, field);
    }

    /// `HDEL key field` then `PUBLISH <key>:changed field`.
    #[track_caller]
    pub fn hdel_and_publish(&mut self, key: &str, field: &str) {
        self.cmd(&["HDEL", key, field]);
        self.publish_change(key, field);
    }

    /// `PUBLISH <key>:changed payload`.
    #[track_caller]
    pub fn publish_change(&mut self, key: &str, payload: &str) {
        self.cmd(&["PUBLISH", &format!("{key}:changed"), payload]);
    }

    /// Whether the server answers `PING` with `PONG`.
    pub fn ping(&mut self) -> bool {
        redis::cmd("PING")
            .query::<String>(&mut self.connection)
            .is_ok_and(|pong| pong == "PONG")
    }
}

/// A Redis key of the shared test server that is deleted when dropped.
pub struct KeyGuard {
    pub addr: SocketAddr,
    pub key: String,
}

impl KeyGuard {
    /// A fresh key `mesh-test:<tag>:<pid>:<n>` on `addr` (deleted first, in case).
    pub fn new(addr: SocketAddr, tag: &str) -> KeyGuard {
        let key = format!(
            "mesh-test:{tag}:{}:{}",
            std::process::id(),
            crate::next_unique()
        );
        RedisClient::connect(addr)
            .unwrap_or_else(|e| panic!("cannot connect to Redis at {addr}: {e}"))
            .cmd(&["DEL", &key]);
        KeyGuard { addr, key }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        match RedisClient::connect(self.addr).and_then(|mut c| c.command(&["DEL", &self.key])) {
            Ok(_) => {}
            Err(e) => eprintln!("harness: could not delete Redis key {}: {e}", self.key),
        }
    }
}

/// A `redis-server` child of the test on `127.0.0.1:<port>`, without automatic persistence;
/// its data directory is `dir` (an explicit `SAVE` writes `dir/dump.rdb`, which a restart
/// loads). Drop kills it (SIGKILL: it is our own child).
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
}

impl RedisServer {
    /// Starts it and waits (5 s) until it answers PING. Panics if the port is taken.
    pub fn start(port: u16, dir: &Path) -> RedisServer {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "{addr} is already in use: a leftover redis-server? stop it first"
        );
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let log = dir.join("redis.log");
        let mut server = RedisServer {
            child: None,
            port,
            dir: dir.to_path_buf(),
            log,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--dbfilename", "dump.rdb"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing. If the test process
        // dies without running Drop, the server is killed instead of running on.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
        self.child = Some(child);
        let ready = crate::wait_until(Duration::from_secs(5), || {
            RedisClient::connect(self.addr()).is_ok_and(|mut c| c.ping())
        });
        assert!(
            ready,
            "redis-server on {} did not answer PING within 5 s; log:\n{}",
            self.addr(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr())
    }

    pub fn client(&self) -> RedisClient {
        RedisClient::connect(self.addr())
            .unwrap_or_else(|e| panic!("cannot connect to redis-server at {}: {e}", self.addr()))
    }

    /// SIGKILLs it (no shutdown save) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (it loads `dump.rdb` if there is one).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
