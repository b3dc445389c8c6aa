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
        RedisClient::connect_url(&format!("redis://{addr}/"))
    }

    /// Connects to `url` (`redis://[user:password@]host:port/`, no TLS).
    pub fn connect_url(url: &str) -> RedisResult<RedisClient> {
        let client = redis::Client::open(url)?;
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
    /// `redis.conf` lines of [`RedisServer::start_with`] (ACL users, TLS...), in `dir`.
    conf: Option<PathBuf>,
    /// The `default` user's password (`requirepass`), which [`RedisServer::client`] sends.
    password: Option<String>,
}

impl RedisServer {
    /// Starts it and waits (5 s) until it answers PING. Panics if the port is taken.
    pub fn start(port: u16, dir: &Path) -> RedisServer {
        RedisServer::start_with(port, dir, "", None)
    }

    /// [`RedisServer::start`] with `conf` as its redis.conf (written to `dir/redis.conf`; the
    /// port, bind address and persistence settings are given on the command line after it), and
    /// `password` as the `default` user's password, which the harness's own client sends
    /// (the conf must set it: `requirepass <password>`).
    pub fn start_with(port: u16, dir: &Path, conf: &str, password: Option<&str>) -> RedisServer {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "{addr} is already in use: a leftover redis-server? stop it first"
        );
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let log = dir.join("redis.log");
        let conf = (!conf.is_empty()).then(|| {
            let path = dir.join("redis.conf");
            std::fs::write(&path, conf)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            path
        });
        let mut server = RedisServer {
            child: None,
            port,
            dir: dir.to_path_buf(),
            log,
            conf,
            password: password.map(str::to_owned),
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
        // The config file must be the first argument.
        if let Some(conf) = &self.conf {
            cmd.arg(conf);
        }
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
            RedisClient::connect_url(&self.admin_url()).is_ok_and(|mut c| c.ping())
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

    /// The URL of the `default` user, with its password if it has one.
    fn admin_url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@{}/", self.addr()),
            None => self.url(),
        }
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client logged in as the `default` user.
    pub fn client(&self) -> RedisClient {
        RedisClient::connect_url(&self.admin_url())
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

/// A certificate authority for TLS tests, made with `openssl` in a test's directory: it signs
/// server and client certificates for 127.0.0.1.
pub struct TestCa {
    pub cert: PathBuf,
    pub key: PathBuf,
    dir: PathBuf,
}

/// `openssl` with `args`, bounded; panics with its output unless it succeeds.
fn openssl(args: &[&std::ffi::OsStr]) {
    let out =
        crate::process::run_bounded(Command::new("openssl").args(args), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
    assert!(out.status.success(), "openssl {args:?}: {}", out.describe());
}

impl TestCa {
    /// A self-signed CA (P-256) named `name`, its files `dir/<name>.crt` and `.key`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let subject = format!("/CN={name}");
        openssl(&[
            "req".as_ref(),
            "-x509".as_ref(),
            "-newkey".as_ref(),
            "ec".as_ref(),
            "-pkeyopt".as_ref(),
            "ec_paramgen_curve:prime256v1".as_ref(),
            "-nodes".as_ref(),
            "-days".as_ref(),
            "1".as_ref(),
            "-subj".as_ref(),
            subject.as_ref(),
            "-addext".as_ref(),
            "basicConstraints=critical,CA:TRUE".as_ref(),
            "-addext".as_ref(),
            "keyUsage=critical,keyCertSign,cRLSign".as_ref(),
            "-keyout".as_ref(),
            key.as_os_str(),
            "-out".as_ref(),
            cert.as_os_str(),
        ]);
        TestCa {
            cert,
            key,
            dir: dir.to_path_buf(),
        }
    }

    /// A certificate signed by this CA for IP 127.0.0.1, for a server (`serverAuth`) or a
    /// client (`clientAuth`): `(cert, key)` in the CA's directory, named `name`.
    pub fn issue(&self, name: &str, client: bool) -> (PathBuf, PathBuf) {
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        let usage = if client { "clientAuth" } else { "serverAuth" };
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", ext.display()));
        let subject = format!("/CN={name}");
        openssl(&[
            "req".as_ref(),
            "-new".as_ref(),
            "-newkey".as_ref(),
            "ec".as_ref(),
            "-pkeyopt".as_ref(),
            "ec_paramgen_curve:prime256v1".as_ref(),
            "-nodes".as_ref(),
            "-subj".as_ref(),
            subject.as_ref(),
            "-keyout".as_ref(),
            key.as_os_str(),
            "-out".as_ref(),
            csr.as_os_str(),
        ]);
        openssl(&[
            "x509".as_ref(),
            "-req".as_ref(),
            "-in".as_ref(),
            csr.as_os_str(),
            "-CA".as_ref(),
            self.cert.as_os_str(),
            "-CAkey".as_ref(),
            self.key.as_os_str(),
            "-set_serial".as_ref(),
            "2".as_ref(),
            "-days".as_ref(),
            "1".as_ref(),
            "-extfile".as_ref(),
            ext.as_os_str(),
            "-out".as_ref(),
            cert.as_os_str(),
        ]);
        (cert, key)
    }
}
