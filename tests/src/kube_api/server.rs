//! HTTP: the accept loop (hyper 1, HTTP/1.1) and the request router, which maps Kubernetes
//! paths to discovery documents and to store operations.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Query;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::resources::{self, RESOURCES, ResourceId, by_path};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{ListQuery, PatchType, Target};
use super::table::{self, IncludeObject};
use super::watch::{WatchRequest, WatchStart, WatchStream};
use super::{RequestRecord, Shared};

/// A watch without `timeoutSeconds` ends after this long (the real server picks one at random
/// in [30 min, 60 min]).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
const MAX_BODY: usize = 16 << 20;

/// Accepts connections until `stop` fires, then drops every open connection (watches
/// included) at once, as a crashed API server would, and closes the listener.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, peer, request).await) }
                    });
                    // Errors are clients going away mid-request; nothing to do about them.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    drop(listener);
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let (response, watch) = match route(&shared, request).await {
        Ok(answer) => answer,
        Err(error) => (json_response(error_code(&error), &error.to_status()), false),
    };
    let status = response.status().as_u16();
    shared.record(RequestRecord {
        method: method.to_string(),
        path,
        query,
        status,
        watch,
        peer,
    });
    response
}

fn error_code(error: &ApiError) -> StatusCode {
    StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut bytes = serde_json::to_vec(body).expect("JSON values serialize");
    bytes.push(b'\n');
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = code;
    set_common_headers(&mut response);
    response
}

fn set_common_headers(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
}

type Answer = Result<(Response<Body>, bool), ApiError>;

fn ok(body: &Value) -> Answer {
    Ok((json_response(StatusCode::OK, body), false))
}

fn get_only(method: &Method, body: impl FnOnce() -> Option<Value>) -> Answer {
    if method != Method::GET {
        return Err(ApiError::method_not_allowed(method.as_str()));
    }
    match body() {
        Some(body) => ok(&body),
        None => Err(ApiError::path_not_found()),
    }
}

async fn route(shared: &Arc<Shared>, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = request.method().clone();
    match segments.as_slice() {
        [] => get_only(&method, || {
            Some(serde_json::json!({"paths": ["/api", "/api/v1", "/apis",
                "/apis/discovery.k8s.io", "/apis/discovery.k8s.io/v1", "/healthz", "/livez",
                "/readyz", "/version"]}))
        }),
        ["api"] => get_only(&method, || {
            Some(resources::api_versions(&shared.server_address()))
        }),
        ["apis"] => get_only(&method, || Some(resources::api_group_list())),
        ["version"] => get_only(&method, || Some(resources::version())),
        ["healthz" | "livez" | "readyz"] => {
            let mut response = Response::new(Body::from("ok"));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok((response, false))
        }
        ["api", "v1"] => get_only(&method, || resources::api_resource_list("", "v1")),
        ["apis", group] => get_only(&method, || resources::api_group_doc(group)),
        ["apis", group, version] => {
            get_only(&method, || resources::api_resource_list(group, version))
        }
        ["api", "v1", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            resource_route(shared, request, "", "v1", &rest).await
        }
        ["apis", group, version, rest @ ..] => {
            let (group, version) = (group.to_string(), version.to_string());
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            resource_route(shared, request, &group, &version, &rest).await
        }
        // `/openapi/v2`, `/openapi/v3`, and anything else: kubectl copes with a 404.
        _ => Err(ApiError::path_not_found()),
    }
}

/// What a resource path names.
enum Target2 {
    Collection,
    Item(String, Target),
}

async fn resource_route(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    group: &str,
    version: &str,
    rest: &[String],
) -> Answer {
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && by_path(group, version, &rest[2]).is_some_and(|r| RESOURCES[r].namespaced);
    let (namespace, rest) = if namespaced_path {
        (Some(rest[1].clone()), &rest[2..])
    } else {
        (None, rest)
    };
    let resource = by_path(group, version, &rest[0]).ok_or_else(ApiError::path_not_found)?;
    let r = &RESOURCES[resource];
    let what = match rest {
        [_] => Target2::Collection,
        [_, name] => Target2::Item(name.clone(), Target::Main),
        [_, name, sub] if sub == "status" && r.has_status => {
            Target2::Item(name.clone(), Target::Status)
        }
        _ => return Err(ApiError::path_not_found()),
    };
    if matches!(what, Target2::Item(..)) && r.namespaced && namespace.is_none() {
        return Err(ApiError::path_not_found());
    }
    let params = Params::parse(&request)?;
    let method = request.method().clone();
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let ns = namespace.clone().unwrap_or_default();
    match (what, method) {
        (Target2::Collection, Method::GET) => {
            if params.bool("watch")? {
                watch(shared, resource, namespace, &params, &accept)
            } else {
                let query = params.list_query(resource)?;
                let list = shared
                    .store()
                    .list(resource, namespace.as_deref(), &query)?;
                ok(&table::maybe_table(
                    resource,
                    list,
                    &accept,
                    params.include(),
                ))
            }
        }
        (Target2::Collection, Method::POST) => {
            if r.namespaced && namespace.is_none() {
                return Err(ApiError::method_not_allowed("POST"));
            }
            let body = read_json(request, &content_type).await?;
            let created = shared.store().create(resource, &ns, body)?;
            Ok((json_response(StatusCode::CREATED, &created), false))
        }
        (Target2::Item(name, _), Method::GET) => {
            let object = shared.store().get(resource, &ns, &name)?;
            ok(&table::maybe_table(
                resource,
                object,
                &accept,
                params.include(),
            ))
        }
        (Target2::Item(name, target), Method::PUT) => {
            let body = read_json(request, &content_type).await?;
            ok(&shared.store().update(resource, &ns, &name, body, target)?)
        }
        (Target2::Item(name, target), Method::PATCH) => {
            let media = content_type.split(';').next().unwrap_or_default().trim();
            let patch_type = match media {
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::StrategicMerge,
                "application/json-patch+json" => PatchType::Json,
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let body = read_body_json(request).await?;
            ok(&shared
                .store()
                .patch(resource, &ns, &name, patch_type, &body, target)?)
        }
        (Target2::Item(name, Target::Main), Method::DELETE) => {
            let body = read_body(request).await?;
            let options: Value = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&body)
                    .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
            };
            let preconditions = options["preconditions"].clone();
            ok(&shared
                .store()
                .delete(resource, &ns, &name, &preconditions)?)
        }
        (_, method) => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

fn watch(
    shared: &Arc<Shared>,
    resource: ResourceId,
    namespace: Option<String>,
    params: &Params,
    accept: &str,
) -> Answer {
    let rv = params.get("resourceVersion").unwrap_or_default();
    let send_initial = match params.get("sendInitialEvents") {
        Some(_) => Some(params.bool("sendInitialEvents")?),
        None => None,
    };
    let bookmarks = params.bool("allowWatchBookmarks")?;
    let rv_match = params.get("resourceVersionMatch").unwrap_or_default();
    match (send_initial, rv_match) {
        (Some(_), "NotOlderThan") => {}
        (Some(_), _) => {
            return Err(ApiError::invalid_param(
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting \
                 resourceVersionMatch to NotOlderThan",
            ));
        }
        (None, "") => {}
        (None, _) => {
            return Err(ApiError::invalid_param(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch \
                 unless sendInitialEvents is provided",
            ));
        }
    }
    if send_initial == Some(true) && !bookmarks {
        return Err(ApiError::invalid_param(
            "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting \
             allowWatchBookmarks to true",
        ));
    }
    let start = match (send_initial, rv) {
        (Some(true), _) => WatchStart::InitialEvents,
        (Some(false), "" | "0") => WatchStart::Current,
        (None, "" | "0") => WatchStart::CurrentWithState,
        (_, rv) => WatchStart::After(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
        ),
    };
    // Unset or 0: the server's default, as the real one treats them.
    let timeout = match params.get("timeoutSeconds").filter(|t| !t.is_empty()) {
        Some(t) => match t.parse::<u64>() {
            Ok(0) => DEFAULT_WATCH_TIMEOUT,
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                return Err(ApiError::bad_request(format!(
                    "invalid timeoutSeconds {t:?}"
                )));
            }
        },
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let labels = params.labels()?;
    let fields = params.fields(resource)?;
    let stream = WatchStream::new(
        shared.clone(),
        WatchRequest {
            resource,
            namespace,
            labels,
            fields,
            start,
            bookmarks,
            timeout,
            table: table::wants_table(accept).then(|| params.include()),
        },
    );
    let chunks = futures_util::stream::unfold(stream, |mut stream| async move {
        stream
            .next_chunk()
            .await
            .map(|chunk| (Ok::<Bytes, Infallible>(chunk), stream))
    });
    let mut response = Response::new(Body::from_stream(chunks));
    set_common_headers(&mut response);
    Ok((response, true))
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(Body::new(request.into_body()), MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))
}

async fn read_body_json(request: Request<Incoming>) -> Result<Value, ApiError> {
    let body = read_body(request).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))
}

async fn read_json(request: Request<Incoming>, content_type: &str) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if !matches!(media, "application/json" | "" | "*/*") {
        return Err(ApiError::unsupported_media_type(media));
    }
    read_body_json(request).await
}

/// Query parameters (the last one wins when one is repeated).
struct Params(HashMap<String, String>);

impl Params {
    fn parse(request: &Request<Incoming>) -> Result<Params, ApiError> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(request.uri())
            .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
        Ok(Params(pairs.into_iter().collect()))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Go's `strconv.ParseBool`, as the real server parses boolean parameters.
    fn bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(false),
            Some("1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(true),
            Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid boolean value {other:?} for {name}"
            ))),
        }
    }

    fn include(&self) -> IncludeObject {
        IncludeObject::parse(self.get("includeObject"))
    }

    fn labels(&self) -> Result<LabelSelector, ApiError> {
        LabelSelector::parse(self.get("labelSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)
    }

    fn fields(&self, resource: ResourceId) -> Result<FieldSelector, ApiError> {
        FieldSelector::parse(
            self.get("fieldSelector").unwrap_or_default(),
            &RESOURCES[resource].selectable_fields(),
        )
        .map_err(ApiError::bad_request)
    }

    fn list_query(&self, resource: ResourceId) -> Result<ListQuery, ApiError> {
        let limit = match self.get("limit") {
            None | Some("") => None,
            Some(l) => Some(
                l.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
            ),
        };
        Ok(ListQuery {
            labels: self.labels()?,
            fields: self.fields(resource)?,
            limit: limit.filter(|l| *l > 0).map(|l| l as usize),
            continue_token: self.get("continue").map(str::to_owned),
            resource_version: self.get("resourceVersion").map(str::to_owned),
            resource_version_match: self
                .get("resourceVersionMatch")
                .filter(|m| !m.is_empty())
                .map(str::to_owned),
        })
    }
}
