//! Redis for the registry-source tests: a minimal blocking RESP2 client over a std `TcpStream`,
//! and a private `redis-server` a test can kill and restart.
//!
//! The shared server of a test run is at `$MESH_TEST_REDIS` (`cargo xtask test` starts one on
//! 127.0.0.1:6390). Tests use their own key in it and delete it afterwards ([`KeyGuard`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Every step of a command (connect, write, read) is bounded by this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

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
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RedisClient {
    pub fn connect(addr: SocketAddr) -> std::io::Result<RedisClient> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let writer = stream.try_clone()?;
        Ok(RedisClient {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one command; an error reply is returned as `Reply::Error`.
    pub fn command(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        self.writer.write_all(&encode(args))?;
        read_reply(&mut self.reader)
    }

    /// Sends one command and panics on an I/O error or an error reply.
    #[track_caller]
    pub fn cmd(&mut self, args: &[&str]) -> Reply {
        match self.command(args) {
            Ok(Reply::Error(e)) => panic!("redis {args:?}: {e}"),
            Ok(reply) => reply,
            Err(e) => panic!("redis {args:?}: {e}"),
        }
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
        matches!(self.command(&["PING"]), Ok(Reply::Simple(s)) if s == "PONG")
    }
}

/// `*N\r\n$len\r\narg\r\n...`
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn read_line(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    // Bounded: one header line of a reply.
    reader.by_ref().take(64 * 1024).read_line(&mut line)?;
    line.strip_suffix("\r\n")
        .map(str::to_owned)
        .ok_or_else(|| invalid(format!("truncated reply line {line:?}")))
}

fn read_len(text: &str) -> std::io::Result<Option<usize>> {
    let n: i64 = text
        .parse()
        .map_err(|e| invalid(format!("length {text:?}: {e}")))?;
    match n {
        -1 => Ok(None),
        n if (0..=512 * 1024 * 1024).contains(&n) => Ok(Some(n as usize)),
        n => Err(invalid(format!("length {n} out of range"))),
    }
}

/// Reads one reply.
pub fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Reply> {
    let line = read_line(reader)?;
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" => Ok(Reply::Simple(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => rest
            .parse()
            .map(Reply::Integer)
            .map_err(|e| invalid(format!("integer {rest:?}: {e}"))),
        "$" => match read_len(rest)? {
            None => Ok(Reply::Bulk(None)),
            Some(len) => {
                let mut data = vec![0; len + 2];
                reader.read_exact(&mut data)?;
                if !data.ends_with(b"\r\n") {
                    return Err(invalid("bulk string without CRLF".to_owned()));
                }
                data.truncate(len);
                Ok(Reply::Bulk(Some(data)))
            }
        },
        "*" => match read_len(rest)? {
            None => Ok(Reply::Array(None)),
            Some(len) => (0..len)
                .map(|_| read_reply(reader))
                .collect::<std::io::Result<Vec<_>>>()
                .map(|items| Reply::Array(Some(items))),
        },
        _ => Err(invalid(format!("unknown reply {line:?}"))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_arrays_of_bulk_strings() {
        assert_eq!(
            encode(&["HSET", "k", "f", "{\"a\":1}"]),
            b"*4\r\n$4\r\nHSET\r\n$1\r\nk\r\n$1\r\nf\r\n$7\r\n{\"a\":1}\r\n"
        );
    }

    #[test]
    fn reads_every_reply_kind() {
        let raw: &[u8] =
            b"+OK\r\n-ERR wrong\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\nf\r\n:1\r\n*-1\r\n";
        let mut reader = BufReader::new(raw);
        assert_eq!(read_reply(&mut reader).unwrap(), Reply::Simple("OK".into()));
        assert_eq!(
            read_reply(&mut reader).unwrap(),
            Reply::Error("ERR wrong".into())
        );
        assert_eq!(read_reply(&mut reader).unwrap(), Reply::Integer(42));
        assert_eq!(
            read_reply(&mut reader).unwrap(),
            Reply::Bulk(Some(b"abc".to_vec()))
        );
        assert_eq!(read_reply(&mut reader).unwrap(), Reply::Bulk(None));
        assert_eq!(
            read_reply(&mut reader).unwrap(),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"f".to_vec())),
                Reply::Integer(1)
            ]))
        );
        assert_eq!(read_reply(&mut reader).unwrap(), Reply::Array(None));
        assert!(read_reply(&mut reader).is_err(), "EOF");
    }

    #[test]
    fn rejects_garbage() {
        assert!(read_reply(&mut BufReader::new(&b"?x\r\n"[..])).is_err());
        assert!(read_reply(&mut BufReader::new(&b"$5\r\nab\r\n"[..])).is_err());
        assert!(read_reply(&mut BufReader::new(&b"+OK"[..])).is_err());
    }
}
