//! Where the admin API listens and who may talk to it.
//!
//! - The Unix socket (`[agent] admin_socket`): mode 0600 in a directory the agent creates 0700;
//!   each connection's peer credentials (`SO_PEERCRED`) must be root's or the agent's own uid.
//!   The mode already keeps others out; the check still holds if someone loosens the mode.
//! - The TCP listener (`[agent] admin`): every request needs `Authorization: Bearer <token>`
//!   with the token of `admin_token_file`, over TLS when `admin_tls` is set.

use std::{
    fs,
    io::ErrorKind,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use axum::{
    Json, Router,
    extract::{ConnectInfo, Request, State, connect_info::Connected},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    serve::IncomingStream,
};
use serde_json::json;
use subtle::ConstantTimeEq as _;
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, error, info, warn};

use crate::config::{AgentConfig, TlsFiles};

/// A TLS handshake that takes longer than this is dropped, so a stalled client holds nothing.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin API's listeners, bound at start so a wrong setting stops the agent there.
pub struct Listeners {
    socket: Option<(UnixListener, SocketFile)>,
    tcp: Option<Tcp>,
}

struct Tcp {
    listener: TcpListener,
    addr: SocketAddr,
    token: Arc<Token>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The bearer token. Debug never prints it.
struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Listeners {
    pub fn any(&self) -> bool {
        self.socket.is_some() || self.tcp.is_some()
    }

    /// Binds what `[agent]` asks for; every error names the setting and the reason.
    pub async fn bind(agent: &AgentConfig) -> anyhow::Result<Self> {
        let socket = if agent.admin_socket.as_os_str().is_empty() {
            None
        } else {
            Some(bind_socket(&agent.admin_socket).with_context(|| {
                format!(
                    "[agent] admin_socket {}: cannot serve the admin API there",
                    agent.admin_socket.display()
                )
            })?)
        };
        let tcp = match agent.admin {
            None => None,
            Some(addr) => {
                // Validation guarantees the file is named; checked again so this never panics.
                let path = agent
                    .admin_token_file
                    .as_deref()
                    .context("[agent] admin_token_file is required with [agent] admin")?;
                let token = Arc::new(read_token(path)?);
                let tls = agent.admin_tls.as_ref().map(tls_acceptor).transpose()?;
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("[agent] admin: binding {addr}"))?;
                Some(Tcp {
                    listener,
                    addr,
                    token,
                    tls,
                })
            }
        };
        Ok(Self { socket, tcp })
    }

    /// Serves `app` on every listener until the task is dropped.
    pub async fn serve(self, app: Router) {
        let Self { socket, tcp } = self;
        let socket = async {
            if let Some((listener, file)) = socket {
                // Held while serving: removed when the agent stops (or this task is aborted).
                let _file = file;
                info!(path = %_file.path.display(), "admin API listening on its Unix socket");
                // The agent's own uid: the socket was created by this process.
                let owner = _file.owner;
                let app = app
                    .clone()
                    .layer(middleware::from_fn_with_state(owner, require_local_peer))
                    .into_make_service_with_connect_info::<Peer>();
                if let Err(err) = axum::serve(listener, app).await {
                    error!("admin API socket stopped: {err}");
                }
            }
        };
        let tcp = async {
            if let Some(tcp) = tcp {
                let app = app
                    .clone()
                    .layer(middleware::from_fn_with_state(tcp.token, require_token));
                match tcp.tls {
                    None => {
                        info!(addr = %tcp.addr, "admin API listening on TCP (bearer token)");
                        if let Err(err) = axum::serve(tcp.listener, app).await {
                            error!("admin API TCP listener stopped: {err}");
                        }
                    }
                    Some(acceptor) => {
                        info!(addr = %tcp.addr, "admin API listening on TCP (TLS, bearer token)");
                        serve_tls(tcp.listener, acceptor, app).await;
                    }
                }
            }
        };
        tokio::join!(socket, tcp);
    }
}

/// The socket file this agent created; removed on drop if it is still that file.
struct SocketFile {
    path: PathBuf,
    ino: u64,
    owner: u32,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Creates the socket 0600 (its directory 0700 when missing). A socket file left by a dead
/// agent is replaced; one that a live process answers on is not.
fn bind_socket(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "{} exists and is not a socket; remove it or choose another path",
            path.display()
        ),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!(
                "another process (another mesh agent?) answers on it; stop that agent, or give \
                 this one another [agent] admin_socket"
            ),
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "removing the stale admin socket of an agent that is gone");
                fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
            }
            Err(err) => {
                return Err(err).with_context(|| format!("probing {}", path.display()));
            }
        },
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("inspecting {}", path.display())),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    // The socket exists with the umask's mode for a moment; the peer check covers that window.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    let meta = fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_owned(),
        ino: meta.ino(),
        owner: meta.uid(),
    };
    listener.set_nonblocking(true)?;
    Ok((UnixListener::from_std(listener)?, file))
}

/// Who is at the other end of a Unix socket connection (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug)]
struct Peer {
    /// `None` when the kernel would not say: treated as a stranger.
    uid: Option<u32>,
    pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => Peer {
                uid: Some(cred.uid()),
                pid: cred.pid(),
            },
            Err(err) => {
                warn!("admin API: SO_PEERCRED failed: {err}");
                Peer {
                    uid: None,
                    pid: None,
                }
            }
        }
    }
}

/// Lets root and the agent's own user through; 403 for anyone else.
async fn require_local_peer(
    State(owner): State<u32>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    if peer.uid.is_some_and(|uid| uid == 0 || uid == owner) {
        return next.run(request).await;
    }
    let uid = peer.uid.map_or("unknown".to_owned(), |u| u.to_string());
    let pid = peer.pid.map_or("unknown".to_owned(), |p| p.to_string());
    warn!(
        uid = %uid,
        pid = %pid,
        "admin API: refused {} {} from uid {uid} (pid {pid}): only root and uid {owner} may use the admin socket",
        request.method(),
        request.uri().path()
    );
    (
        StatusCode::FORBIDDEN,
        Json(json!({
            "error": format!("uid {uid} may not use the admin API (only root and uid {owner})")
        })),
    )
        .into_response()
}

/// Requires `Authorization: Bearer <token>`, compared in constant time.
async fn require_token(State(token): State<Arc<Token>>, request: Request, next: Next) -> Response {
    let offered = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    let ok = offered.is_some_and(|offered| bool::from(offered.ct_eq(&token.0)));
    if ok {
        return next.run(request).await;
    }
    debug!(
        path = request.uri().path(),
        "admin API: missing or wrong bearer token"
    );
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({ "error": "missing or wrong bearer token" })),
    )
        .into_response()
}

/// The token of `[agent] admin_token_file`: its content without surrounding whitespace.
fn read_token(path: &Path) -> anyhow::Result<Token> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("[agent] admin_token_file {}: cannot read", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("[agent] admin_token_file {}: is empty", path.display());
    }
    if token.len() < 16 {
        bail!(
            "[agent] admin_token_file {}: the token has {} characters; use at least 16 \
             (e.g. `openssl rand -hex 32`)",
            path.display(),
            token.len()
        );
    }
    if let Ok(meta) = fs::metadata(path)
        && meta.mode() & 0o077 != 0
    {
        warn!(
            "[agent] admin_token_file {} is readable by other users (mode {:o}); chmod 0600 it",
            path.display(),
            meta.mode() & 0o777
        );
    }
    Ok(Token(token.as_bytes().to_vec()))
}

fn tls_acceptor(files: &TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| anyhow::anyhow!("[agent] admin_tls.cert {}: {err}", files.cert.display()))?;
    if certs.is_empty() {
        bail!(
            "[agent] admin_tls.cert {}: no PEM certificate in it",
            files.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|err| anyhow::anyhow!("[agent] admin_tls.key {}: {err}", files.key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("[agent] admin_tls: TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "[agent] admin_tls: the key {} does not fit the certificate {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// axum's `serve` has no TLS: accept, handshake (bounded) and serve HTTP/1.1 per connection.
async fn serve_tls(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, app: Router) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and the like: back off instead of spinning.
                warn!("admin API: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        debug!(%remote, "admin API: TLS handshake failed: {err}");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "admin API: TLS handshake timed out");
                        return;
                    }
                };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                debug!(%remote, "admin API: connection ended: {err}");
            }
        });
    }
}
