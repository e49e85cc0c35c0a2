//! The API between replicas of a cluster, served on the writer's replica port (mutual TLS with
//! the relay's own certificate: [`super::replica_port`]): `/cluster/v1/sync` (a replica's report,
//! answered with the revocations and the replicas serving), `/cluster/v1/redeem` (a join token
//! presented at another replica), and the operators' writes (tokens, revocations) the other
//! replicas forward after checking the operator's admin token themselves.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{body::Incoming, Request, StatusCode};

use crate::{
    cluster::{Cluster, RedeemAnswer, RedeemRequest, SyncAnswer, SyncRequest},
    ops::{auth::authorize_with, Ops},
};

/// The largest body a replica sends another.
const MAX_BODY: usize = 64 * 1024;

/// Whether `path` with `method` is an operator's write that only the writer makes.
pub(crate) fn is_write(method: &hyper::Method, path: &str) -> bool {
    path == "/tokens"
        || path.starts_with("/tokens/")
        || (method == hyper::Method::POST && path.starts_with("/agents/") && path.ends_with("/revoke"))
}

/// Another replica: passes an authorized write to the writer (over the replica port); a
/// revocation then holds here at once (the next sync is not waited for).
pub(crate) async fn forward(req: &Request<Incoming>, ops: &Ops, cluster: &Cluster) -> (StatusCode, String) {
    if let Err(refusal) = authorize_with(req, ops.admin_token.as_ref(), ops.read_token.as_ref()) {
        return refusal;
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let (status, body) = cluster.forward(req.method().clone(), path).await;
    if status == 200 && path.contains("/revoke") {
        cluster.sync_now.notify_one();
    }
    (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), body)
}

async fn body_of<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, (StatusCode, String)> {
    let bytes: Bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("cannot read the body: {e}\n")))?
        .to_bytes();
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| (StatusCode::BAD_REQUEST, "the body is not UTF-8\n".into()))?;
    toml::from_str(text).map_err(|e| (StatusCode::BAD_REQUEST, format!("the body is not valid: {e}\n")))
}

/// The writer's side of a call from another replica (proven by the replica port's TLS): the
/// cluster and the call's body, or why not.
async fn writer_call<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    ops: &Ops,
) -> Result<(&Cluster, T), (StatusCode, String)> {
    let cluster = match &ops.cluster {
        Some(cluster) if cluster.is_writer() => cluster,
        Some(cluster) => {
            return Err((
                StatusCode::CONFLICT,
                format!("this replica is not the writer: {} is\n", cluster.config.writer),
            ))
        }
        None => return Err((StatusCode::NOT_FOUND, "this relay has no [cluster]\n".into())),
    };
    Ok((cluster, body_of(req).await?))
}

/// An answer as TOML.
fn answer<T: serde::Serialize>(answer: &T) -> (StatusCode, String) {
    match toml::to_string(answer) {
        Ok(body) => (StatusCode::OK, body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the answer: {e}\n")),
    }
}

/// `POST /cluster/v1/sync`: a replica's report; the answer holds the revocations and the
/// replicas serving.
pub(crate) async fn sync(req: Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    let (cluster, mut request): (_, SyncRequest) = match writer_call(req, ops).await {
        Ok(call) => call,
        Err(refusal) => return refusal,
    };
    let local: Vec<String> = ops.agents.subscribe().borrow().keys().cloned().collect();
    let replica = request.replica.clone();
    match ops.trust.revocations.absorb(std::mem::take(&mut request.revocations)) {
        Ok(absorbed) if absorbed.added > 0 => tracing::warn!(
            %replica,
            added = absorbed.added,
            "revocations restored from another replica's report (this writer had lost them)"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(%replica, error = %e, "revocations restored from another replica but not saved")
        }
    }
    let (serving, agents) = cluster.report(request, &local);
    let certificates = crate::cluster::certificates::of_writer(&ops.config.get());
    answer(&SyncAnswer { serving, revocations: ops.trust.revocations.snapshot(), agents, certificates })
}

/// `POST /cluster/v1/redeem`: checks a join token presented at another replica and marks it used
/// here, where every token is kept: of two replicas presenting it, exactly one gets the agent.
pub(crate) async fn redeem(req: Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    let (_, request): (_, RedeemRequest) = match writer_call(req, ops).await {
        Ok(call) => call,
        Err(refusal) => return refusal,
    };
    let Some(enrollment) = &ops.trust.enrollment else {
        return (StatusCode::FORBIDDEN, "enrollment is off on the writer: set relay.ca_key\n".into());
    };
    let secret: Option<[u8; 32]> =
        sallyport_runtime::hex::decode(&request.secret).and_then(|bytes| bytes.try_into().ok());
    let verdict = match secret {
        Some(secret) => enrollment.tokens.redeem(request.id, &secret, sallyport_runtime::clock::unix_now()),
        None => Err(crate::trust::enroll::RedeemError::Invalid),
    };
    answer(&match verdict {
        Ok(agent) => RedeemAnswer { agent: Some(agent), refused: None },
        Err(refused) => RedeemAnswer { agent: None, refused: Some(refused) },
    })
}
