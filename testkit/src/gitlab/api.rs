//! The runner API endpoints of the stand-in, answering as Rails (and
//! Workhorse's long poll) do: `POST /runners/verify`, `POST /jobs/request`,
//! `PUT /jobs/:id`, `PATCH /jobs/:id/trace`.
//!
//! Not responsible for git (see `git`) or the control API (see the parent).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::Router;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::artifacts;
use super::payload::{self, FAILURE_REASONS};
use super::{
    git, Fault, Inner, JobState, Manager, PatchRecord, RequestRecord, Route, State, UpdateRecord,
    VerifyRecord,
};

/// Workhorse refuses larger job-request bodies with 413.
const MAX_JOB_REQUEST_BODY: usize = 32 * 1024;

pub(super) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/api/v4/runners/verify", post(verify))
        .route("/api/v4/jobs/request", post(request_job))
        .route("/api/v4/jobs/{id}", put(update_job))
        .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
        .route(
            "/api/v4/jobs/{id}/artifacts",
            post(artifacts::upload)
                .get(artifacts::download)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/objects/artifacts/{key}", get(artifacts::object))
        .fallback(git::serve)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            weather,
        ))
        .with_state(state)
}

/// A slow or down GitLab: every request waits the latency set, and while
/// GitLab is down it is answered 502 without being handled.
async fn weather(
    Extract(state): Extract<Arc<State>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let weather = state.weather();
    if !weather.latency.is_zero() {
        tokio::time::sleep(weather.latency).await;
    }
    if state.weather().down {
        return message(502, "502 Bad Gateway");
    }
    next.run(request).await
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A Grape-style error: `{"message": "..."}`.
pub(super) fn message(status: u16, text: &str) -> Response {
    (status_code(status), axum::Json(json!({ "message": text }))).into_response()
}

pub(super) fn fault_response(fault: Fault) -> Response {
    let mut response = message(fault.status, "injected fault");
    if let Some(secs) = fault.retry_after {
        response
            .headers_mut()
            .insert("Retry-After", HeaderValue::from(secs));
    }
    response
}

fn header(response: &mut Response, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

fn parse_body(body: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
}

fn str_field(body: &Value, key: &str) -> Option<String> {
    body.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn runner_token_ok(state: &State, body: &Value) -> bool {
    body.get("token")
        .and_then(Value::as_str)
        .is_some_and(|t| state.config.runner_tokens.iter().any(|ok| ok == t))
}

/// Whether `info.features.cancel_gracefully` is set.
fn cancel_gracefully(body: &Value) -> Option<bool> {
    body.get("info")?
        .get("features")?
        .get("cancel_gracefully")?
        .as_bool()
}

pub(super) fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn verify(Extract(state): Extract<Arc<State>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(body) = parse_body(&body) else {
        return message(400, "400 Bad request - token is missing");
    };
    let system_id = str_field(&body, "system_id");
    let fault = state.take_fault(Route::Verify);
    let status = match fault {
        Some(fault) => fault.status,
        None if !runner_token_ok(&state, &body) => 403,
        None => 200,
    };
    {
        let mut inner = state.lock();
        inner.verifies.push(VerifyRecord {
            at: Instant::now(),
            system_id: system_id.clone(),
            info: body.get("info").cloned().unwrap_or(Value::Null),
            user_agent: header_str(&headers, "user-agent"),
            request_id: header_str(&headers, "x-request-id"),
            status,
        });
        if status == 200 {
            if let Some(id) = &system_id {
                let manager = inner.managers.entry(id.clone()).or_default();
                manager.cancel_gracefully = cancel_gracefully(&body).unwrap_or(false);
            }
        }
    }
    match (fault, status) {
        (Some(fault), _) => fault_response(fault),
        (None, 403) => message(403, "403 Forbidden"),
        _ => (
            StatusCode::OK,
            axum::Json(json!({
                "id": 1,
                "token": body.get("token").cloned().unwrap_or(Value::Null),
                "token_expires_at": null,
            })),
        )
            .into_response(),
    }
}

/// Assigns the oldest pending job to the requesting runner manager.
fn assign(
    inner: &mut Inner,
    base_url: &str,
    runner_token: &str,
    system_id: Option<&str>,
    gracefully: Option<bool>,
) -> Option<Value> {
    let supports_canceling = gracefully.unwrap_or_else(|| {
        system_id
            .and_then(|id| inner.managers.get(id))
            .is_some_and(|m: &Manager| m.cancel_gracefully)
    });
    // The oldest pending job whose needs have finished, as GitLab makes a
    // job pending only once the jobs it needs are done.
    let Inner { queue, jobs, .. } = inner;
    queue.retain(|id| {
        jobs.get(id)
            .is_some_and(|job| job.record.state == JobState::Pending)
    });
    let ready = queue.iter().position(|id| {
        jobs.get(id).is_some_and(|job| {
            job.spec
                .runner_token
                .as_deref()
                .is_none_or(|wanted| wanted == runner_token)
                && job.needs.iter().all(|need| {
                    jobs.get(need)
                        .is_none_or(|needed| needed.record.state.is_final())
                })
        })
    })?;
    let id = queue.remove(ready)?;
    let dependencies = payload::dependencies(jobs.get(&id)?, jobs);
    let job = jobs.get_mut(&id)?;
    job.record.state = JobState::Running;
    job.record.system_id = system_id.map(str::to_owned);
    job.record.runner_token = Some(runner_token.to_owned());
    job.record.supports_canceling = supports_canceling;
    job.record.handed_out = Some(Instant::now());
    let payload = payload::build(job, base_url, dependencies);
    job.record.payload = payload.clone();
    Some(payload)
}

async fn request_job(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if body.len() > MAX_JOB_REQUEST_BODY {
        return message(413, "413 Request Entity Too Large");
    }
    let Some(body) = parse_body(&body) else {
        return message(400, "400 Bad request - token is missing");
    };
    let system_id = str_field(&body, "system_id");
    let last_update = str_field(&body, "last_update");
    let index = {
        let mut inner = state.lock();
        inner.requests.push(RequestRecord {
            at: Instant::now(),
            system_id: system_id.clone(),
            last_update: last_update.clone(),
            user_agent: header_str(&headers, "user-agent"),
            request_id: header_str(&headers, "x-request-id"),
            status: 0,
        });
        let seen = inner.requests.len();
        state.requests_seen.send_replace(seen);
        seen - 1
    };
    let finish = |status: u16| {
        state.lock().requests[index].status = status;
    };
    if let Some(fault) = state.take_fault(Route::RequestJob) {
        finish(fault.status);
        return fault_response(fault);
    }
    if !runner_token_ok(&state, &body) {
        finish(403);
        return message(403, "403 Forbidden");
    }
    let runner_token = body
        .get("token")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let gracefully = cancel_gracefully(&body);
    if let (Some(id), Some(on)) = (&system_id, gracefully) {
        state
            .lock()
            .managers
            .entry(id.clone())
            .or_default()
            .cancel_gracefully = on;
    }

    let mut changes = state.changed.subscribe();
    let deadline = Instant::now() + state.config.long_poll;
    loop {
        let (assigned, queue_value) = {
            let mut inner = state.lock();
            let assigned = assign(
                &mut inner,
                &state.base_url,
                runner_token,
                system_id.as_deref(),
                gracefully,
            );
            (assigned, inner.queue_value.clone())
        };
        if let Some(payload) = assigned {
            state.bump();
            finish(201);
            return (StatusCode::CREATED, axum::Json(payload)).into_response();
        }
        // Like Workhorse, hold only a runner that has seen the current queue
        // version; an outdated one gets the new version at once.
        let hold = last_update.as_deref() == Some(queue_value.as_str());
        let waited = if hold && Instant::now() < deadline {
            matches!(
                tokio::time::timeout_at(deadline, changes.changed()).await,
                Ok(Ok(()))
            )
        } else {
            false
        };
        if !waited {
            finish(204);
            let mut response = StatusCode::NO_CONTENT.into_response();
            header(&mut response, "X-GitLab-Last-Update", &queue_value);
            return response;
        }
    }
}

/// The job token of a job call: header `JOB-TOKEN` or param `token`.
pub(super) fn job_token(headers: &HeaderMap, param: Option<&str>) -> Option<String> {
    header_str(headers, "job-token").or_else(|| param.map(str::to_owned))
}

fn job_response(status: u16, body: Response, job_state: JobState, interval: u64) -> Response {
    let mut response = body;
    *response.status_mut() = status_code(status);
    header(&mut response, "Job-Status", job_state.as_str());
    header(
        &mut response,
        "X-GitLab-Trace-Update-Interval",
        &interval.to_string(),
    );
    response
}

fn forbidden_job(job_state: JobState, interval: u64) -> Response {
    job_response(
        403,
        message(403, "403 Forbidden - Job is not processing on runner"),
        job_state,
        interval,
    )
}

async fn update_job(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return message(404, "404 Not Found");
    };
    let Some(body) = parse_body(&body) else {
        return message(400, "400 Bad request - token is missing");
    };
    let interval = state.config.trace_update_interval;
    let token = job_token(&headers, body.get("token").and_then(Value::as_str));
    let response = {
        let mut inner = state.lock();
        let fault = inner
            .faults
            .get_mut(&Route::UpdateJob(id))
            .and_then(|q| q.pop_front());
        // Rails finds the job by its token: a wrong token or id is a 403.
        let Some(job) = inner.jobs.get_mut(&id) else {
            return message(403, "403 Forbidden");
        };
        if token.as_deref() != Some(job.record.token.expose()) {
            return message(403, "403 Forbidden");
        }
        let output = body.get("output");
        let mut record_body = body.clone();
        record_body["token"] = Value::String("***".into());
        let mut record = UpdateRecord {
            at: Instant::now(),
            state: str_field(&body, "state").unwrap_or_default(),
            failure_reason: str_field(&body, "failure_reason"),
            exit_code: body.get("exit_code").and_then(Value::as_i64),
            checksum: output
                .and_then(|o| o.get("checksum"))
                .and_then(Value::as_str)
                .or_else(|| body.get("checksum").and_then(Value::as_str))
                .map(str::to_owned),
            bytesize: output
                .and_then(|o| o.get("bytesize"))
                .and_then(Value::as_u64),
            status: 0,
            body: record_body,
        };
        let current = job.record.state;
        let injected = fault.is_some();
        let (status, response) = if let Some(fault) = fault {
            (fault.status, fault_response(fault))
        } else if !current.is_executing() {
            (403, forbidden_job(current, interval))
        } else {
            match record.state.as_str() {
                "running" => (200, json_status(200)),
                "success" | "failed" => {
                    let reason_ok = record
                        .failure_reason
                        .as_deref()
                        .is_none_or(|r| FAILURE_REASONS.contains(&r));
                    if !reason_ok {
                        // Grape validates the param against the enum.
                        (
                            400,
                            message(
                                400,
                                "400 Bad request - failure_reason does not have a valid value",
                            ),
                        )
                    } else if job.reject_trace > 0 && record.checksum.is_some() {
                        // Trace validation failed: the runner sends it all again.
                        job.reject_trace -= 1;
                        job.record.trace.clear();
                        (412, json_status(412))
                    } else if job.not_accepted > 0 && record.checksum.is_some() {
                        job.not_accepted -= 1;
                        (202, json_status(202))
                    } else {
                        let new_state = match (current, record.state.as_str()) {
                            (JobState::Canceling, _) => JobState::Canceled,
                            (_, "success") => JobState::Success,
                            _ => JobState::Failed,
                        };
                        job.record.state = new_state;
                        let checksum = format!("crc32:{:08x}", crc32fast::hash(&job.record.trace));
                        job.record.checksum_ok = record.checksum.as_ref().map(|c| *c == checksum);
                        job.record.bytesize_ok =
                            record.bytesize.map(|b| b == job.record.trace.len() as u64);
                        record.status = 200;
                        job.record.final_update = Some(record.clone());
                        (200, json_status(200))
                    }
                }
                _ => (
                    400,
                    message(400, "400 Bad request - state does not have a valid value"),
                ),
            }
        };
        record.status = status;
        job.record.updates.push(record);
        // An injected fault stands for a proxy or a crashed Rails: no headers.
        if injected {
            response
        } else {
            job_response(status, response, job.record.state, interval)
        }
    };
    state.bump();
    response
}

/// Rails answers job updates with the status code as the body.
fn json_status(status: u16) -> Response {
    (status_code(status), axum::Json(json!(status))).into_response()
}

async fn patch_trace(
    Extract(state): Extract<Arc<State>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return message(404, "404 Not Found");
    };
    let interval = state.config.trace_update_interval;
    let token = job_token(&headers, params.get("token").map(String::as_str));
    let start = headers
        .get("Content-Range")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split('-').next().unwrap_or("").trim().parse::<u64>());
    let response = {
        let mut inner = state.lock();
        let fault = inner
            .faults
            .get_mut(&Route::PatchTrace(id))
            .and_then(|q| q.pop_front());
        // A lost answer: the PATCH is applied, its answer replaced.
        let (lost, fault) = match fault {
            Some(f) if f.applied => (Some(f), None),
            f => (None, f),
        };
        let Some(job) = inner.jobs.get_mut(&id) else {
            return message(403, "403 Forbidden");
        };
        if token.as_deref() != Some(job.record.token.expose()) {
            return message(403, "403 Forbidden");
        }
        let size = job.record.trace.len() as u64;
        let current = job.record.state;
        let injected = fault.is_some();
        let (status, mut response) = if let Some(fault) = fault {
            (fault.status, fault_response(fault))
        } else if !current.is_executing() {
            (403, forbidden_job(current, interval))
        } else {
            match start {
                None => (
                    400,
                    message(400, "400 Bad request - Content-Range is missing"),
                ),
                Some(Err(_)) => (
                    400,
                    message(400, "400 Bad request - Content-Range is invalid"),
                ),
                Some(Ok(start)) if job.force_416 > 0 || start != size => {
                    job.force_416 = job.force_416.saturating_sub(1);
                    (416, message(416, "416 Range Not Satisfiable"))
                }
                Some(Ok(_)) => {
                    job.record.trace.extend_from_slice(&body);
                    (202, StatusCode::ACCEPTED.into_response())
                }
            }
        };
        if matches!(status, 202 | 416) {
            let stored = job.record.trace.len();
            header(&mut response, "Range", &format!("0-{stored}"));
        }
        job.record.patches.push(PatchRecord {
            at: Instant::now(),
            start: start.and_then(Result::ok),
            len: body.len(),
            status,
        });
        if let Some(lost) = lost {
            fault_response(lost)
        } else if injected {
            response
        } else {
            job_response(status, response, job.record.state, interval)
        }
    };
    state.bump();
    response
}
