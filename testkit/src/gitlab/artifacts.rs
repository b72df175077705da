//! The job-token artifact endpoints, answering as Workhorse and Rails do:
//! `POST /api/v4/jobs/:id/artifacts` (one multipart `file` part, the
//! format, type and expiry in the query, 413 over the size limit, 403 for
//! a wrong token or a job that is not running) and
//! `GET /api/v4/jobs/:id/artifacts` (the job's `archive`, 404 without
//! one; with `direct_download=true` a 302 to an object-store URL on
//! another origin, served by `GET /objects/...`, which records whether a
//! job token was sent to it).
//!
//! Not responsible for browsing metadata (Workhorse's; not generated) or
//! for checking archive contents.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use tokio::time::Instant;

use super::api::{fault_response, header_str, job_token, message};
use super::{random_hex, ArtifactRecord, ObjectRequest, Route, State};

/// `artifact_type` values Rails accepts (`Ci::JobArtifact.file_types`).
const FILE_TYPES: &[&str] = &[
    "archive",
    "metadata",
    "trace",
    "junit",
    "sast",
    "dependency_scanning",
    "container_scanning",
    "dast",
    "codequality",
    "license_scanning",
    "performance",
    "metrics",
    "metrics_referee",
    "network_referee",
    "lsif",
    "dotenv",
    "cobertura",
    "terraform",
    "accessibility",
    "cluster_applications",
    "secret_detection",
    "requirements",
    "coverage_fuzzing",
    "browser_performance",
    "load_performance",
    "api_fuzzing",
    "cluster_image_scanning",
    "cyclonedx",
    "requirements_v2",
    "annotations",
    "repository_xray",
    "jacoco",
    "scip",
    "sarif",
];

/// `artifact_format` values Rails accepts.
const FILE_FORMATS: &[&str] = &["raw", "zip", "gzip"];

pub(super) async fn upload(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<i64>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Response {
    if let Some(fault) = state.take_fault(Route::UploadArtifacts(id)) {
        return fault_response(fault);
    }
    let token = job_token(&headers, query.get("token").map(String::as_str));
    {
        let inner = state.lock();
        let allowed = inner.jobs.get(&id).is_some_and(|job| {
            token.as_deref() == Some(job.record.token.expose()) && job.record.state.is_executing()
        });
        if !allowed {
            return message(403, "403 Forbidden");
        }
    }
    let artifact_type = query
        .get("artifact_type")
        .cloned()
        .unwrap_or_else(|| "archive".to_owned());
    let artifact_format = query
        .get("artifact_format")
        .cloned()
        .unwrap_or_else(|| "zip".to_owned());
    if !FILE_TYPES.contains(&artifact_type.as_str()) {
        return message(
            400,
            "400 Bad request - artifact_type does not have a valid value",
        );
    }
    if !FILE_FORMATS.contains(&artifact_format.as_str()) {
        return message(
            400,
            "400 Bad request - artifact_format does not have a valid value",
        );
    }
    let mut file: Option<(String, Bytes)> = None;
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return message(400, &format!("400 Bad request - {e}")),
        };
        // Workhorse: only `file` may carry a file, and only one.
        if field.file_name().is_some() && field.name() != Some("file") {
            return message(400, "400 Bad request - invalid form field");
        }
        if field.name() != Some("file") {
            continue;
        }
        if file.is_some() {
            return message(400, "artifacts request contains more than one file");
        }
        let name = field.file_name().unwrap_or_default().to_owned();
        match field.bytes().await {
            Ok(body) => file = Some((name, body)),
            Err(e) => return message(400, &format!("400 Bad request - {e}")),
        }
    }
    let Some((filename, body)) = file else {
        return message(400, "400 Bad request - file is missing");
    };
    let mut inner = state.lock();
    if body.len() as u64 > inner.max_artifacts_size {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "413 Request Entity Too Large",
        )
            .into_response();
    }
    let Some(job) = inner.jobs.get_mut(&id) else {
        return message(403, "403 Forbidden");
    };
    job.record.artifacts.push(ArtifactRecord {
        at: Instant::now(),
        artifact_type,
        artifact_format,
        expire_in: query.get("expire_in").cloned(),
        filename,
        body: body.to_vec(),
    });
    drop(inner);
    state.bump();
    (StatusCode::CREATED, axum::Json(serde_json::json!({}))).into_response()
}

pub(super) async fn download(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<i64>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(fault) = state.take_fault(Route::DownloadArtifacts(id)) {
        return fault_response(fault);
    }
    let token = job_token(&headers, query.get("token").map(String::as_str));
    let direct = query.get("direct_download").map(String::as_str) == Some("true");
    let mut inner = state.lock();
    // Newest Rails: the token of the job that depends on this one (a
    // running job), or this job's own.
    let allowed = token.as_deref().is_some_and(|token| {
        inner.jobs.values().any(|job| {
            job.record.token.expose() == token
                && (job.record.id == id || job.record.state.is_executing())
        })
    });
    let Some(job) = inner.jobs.get(&id) else {
        return message(404, "404 Not Found");
    };
    if !allowed {
        return message(403, "403 Forbidden");
    }
    let Some(archive) = job.record.archive() else {
        return message(404, "404 Not Found");
    };
    if direct && inner.object_storage {
        let key = format!("{id}-{}", random_hex(8));
        let body = archive.body.clone();
        inner.objects.insert(key.clone(), body);
        // Another origin, as object storage is: `localhost` instead of
        // `127.0.0.1`, same server.
        let store = state.base_url.replace("://127.0.0.1:", "://localhost:");
        return Redirect::to(&format!(
            "{store}/objects/artifacts/{key}?X-Amz-Signature={}",
            random_hex(16)
        ))
        .into_response();
    }
    let body = archive.body.clone();
    (StatusCode::OK, body).into_response()
}

/// The object store behind a direct download.
pub(super) async fn object(
    Extract(state): Extract<Arc<State>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut inner = state.lock();
    inner.object_requests.push(ObjectRequest {
        key: key.clone(),
        job_token_sent: header_str(&headers, "job-token").is_some(),
    });
    match inner.objects.get(&key) {
        Some(body) => (StatusCode::OK, body.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "NoSuchKey").into_response(),
    }
}

impl super::JobRecord {
    /// The `archive` artifact uploaded last, which dependents download.
    pub fn archive(&self) -> Option<&ArtifactRecord> {
        self.artifacts
            .iter()
            .rev()
            .find(|a| a.artifact_type == "archive")
    }
}
