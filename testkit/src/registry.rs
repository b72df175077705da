//! [`RegistryStandIn`]: a local container registry that speaks the parts of
//! the Docker Registry HTTP API V2 an engine's pull uses (`/v2/`, manifests
//! by tag and by digest, blobs), behind HTTP Basic authentication, serving
//! images copied from the local engine. No registry is reachable from this
//! machine; the engine treats `127.0.0.0/8` as an insecure registry and
//! pulls from this one over plain HTTP.
//!
//! Not responsible for pushes, token authentication, OCI indexes or
//! anything a pull does not ask for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use bollard::Docker;
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";
const MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_TYPE: &str = "application/vnd.docker.container.image.v1+json";
const LAYER_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar";
const GZIP_LAYER_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const UNAUTHORIZED_BODY: &str =
    r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
const UNKNOWN_BODY: &str = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#;

/// Why an image could not be copied into the stand-in.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot export image {image:?} from the Docker engine: {source}")]
    Export {
        image: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("the export of image {image:?} is not what `docker save` writes: {reason}")]
    Format { image: String, reason: String },
}

/// One manifest request the stand-in answered or refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRequest {
    /// The repository path, such as `group/app`.
    pub repository: String,
    /// The user whose credentials came with it; `None` when none did or
    /// they were wrong.
    pub user: Option<String>,
    /// Whether the manifest was served.
    pub served: bool,
}

/// A running registry stand-in; stops when dropped.
#[derive(Debug)]
pub struct RegistryStandIn {
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

#[derive(Debug, Default)]
struct Shared {
    /// user → password.
    users: HashMap<String, String>,
    content: Mutex<Content>,
    manifests: Mutex<Vec<ManifestRequest>>,
}

#[derive(Debug, Default)]
struct Content {
    /// `repository:tag` and `repository@digest` → manifest bytes.
    manifests: HashMap<String, Vec<u8>>,
    blobs: Blobs,
}

impl RegistryStandIn {
    /// Starts a registry on a free loopback port that serves only to
    /// `users` (name, password).
    ///
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn start(users: &[(&str, &str)]) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(LOOPBACK_ANY_PORT).await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            users: users
                .iter()
                .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
                .collect(),
            ..Shared::default()
        });
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        crate::serve(listener, app, &stop, "registry stand-in");
        Ok(Self {
            address,
            shared,
            stop,
        })
    }

    /// The registry's host and port, as image references name it.
    pub fn host(&self) -> String {
        self.address.to_string()
    }

    /// Copies local image `local` into the registry as
    /// `<host>/<repository>:<tag>` and returns that reference.
    ///
    /// # Errors
    /// [`RegistryError`] when the engine cannot export the image or the
    /// export is not in `docker save`'s format.
    pub async fn copy_from(
        &self,
        docker: &Docker,
        local: &str,
        repository: &str,
        tag: &str,
    ) -> Result<String, RegistryError> {
        let tarball: Vec<u8> = docker
            .export_image(local)
            .map_ok(|chunk| chunk.to_vec())
            .try_concat()
            .await
            .map_err(|source| RegistryError::Export {
                image: local.to_owned(),
                source,
            })?;
        let (manifest, blobs) =
            manifest_from_save(&tarball).map_err(|reason| RegistryError::Format {
                image: local.to_owned(),
                reason,
            })?;
        let digest = digest_of(&manifest);
        let mut content = self
            .shared
            .content
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        content.blobs.extend(blobs);
        content
            .manifests
            .insert(format!("{repository}@{digest}"), manifest.clone());
        content
            .manifests
            .insert(format!("{repository}:{tag}"), manifest);
        Ok(format!("{}/{repository}:{tag}", self.host()))
    }

    /// Every manifest request so far, in order.
    pub fn manifest_requests(&self) -> Vec<ManifestRequest> {
        self.shared
            .manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for RegistryStandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn digest_of(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Blobs by digest.
type Blobs = HashMap<String, Vec<u8>>;

/// Builds a schema 2 manifest and its blobs from a `docker save` tarball
/// (its `manifest.json` names the config and layer files).
fn manifest_from_save(tarball: &[u8]) -> Result<(Vec<u8>, Blobs), String> {
    let mut files = HashMap::new();
    let mut archive = tar::Archive::new(tarball);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(|e| e.to_string())?;
        files.insert(path, bytes);
    }
    let index: serde_json::Value = serde_json::from_slice(
        files
            .get("manifest.json")
            .ok_or("it has no manifest.json")?,
    )
    .map_err(|e| format!("manifest.json: {e}"))?;
    let image = index.get(0).ok_or("manifest.json lists no image")?;
    let file = |name: Option<&serde_json::Value>| -> Result<&Vec<u8>, String> {
        let name = name
            .and_then(serde_json::Value::as_str)
            .ok_or("manifest.json names no file")?;
        files
            .get(name)
            .ok_or_else(|| format!("{name} is named but missing"))
    };
    let config = file(image.get("Config"))?;
    let mut blobs = HashMap::from([(digest_of(config), config.clone())]);
    let mut layers = Vec::new();
    for layer in image
        .get("Layers")
        .and_then(serde_json::Value::as_array)
        .ok_or("manifest.json lists no layers")?
    {
        let bytes = file(Some(layer))?;
        let digest = digest_of(bytes);
        let media_type = if bytes.starts_with(&[0x1f, 0x8b]) {
            GZIP_LAYER_TYPE
        } else {
            LAYER_TYPE
        };
        layers.push(serde_json::json!({
            "mediaType": media_type, "size": bytes.len(), "digest": digest,
        }));
        blobs.insert(digest, bytes.clone());
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "size": config.len(), "digest": digest_of(config)},
        "layers": layers,
    });
    Ok((manifest.to_string().into_bytes(), blobs))
}

/// The user whose Basic credentials in `headers` are right, if any.
fn authenticated(shared: &Shared, headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    (shared.users.get(user).map(String::as_str) == Some(password)).then(|| user.to_owned())
}

async fn handle(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    let user = authenticated(&shared, &headers);
    let path = uri.path();
    let Some(rest) = path.strip_prefix("/v2/") else {
        return (StatusCode::NOT_FOUND, UNKNOWN_BODY).into_response();
    };
    let manifest = rest.rsplit_once("/manifests/");
    if let Some((repository, _)) = manifest {
        shared
            .manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ManifestRequest {
                repository: repository.to_owned(),
                user: user.clone(),
                served: user.is_some(),
            });
    }
    if user.is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            [
                (WWW_AUTHENTICATE, "Basic realm=\"servitor-test\""),
                (CONTENT_TYPE, "application/json"),
            ],
            UNAUTHORIZED_BODY,
        )
            .into_response();
    }
    let content = shared
        .content
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let found = if rest.is_empty() {
        Some((b"{}".to_vec(), "application/json"))
    } else if let Some((repository, reference)) = manifest {
        let separator = if reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        content
            .manifests
            .get(&format!("{repository}{separator}{reference}"))
            .map(|m| (m.clone(), MANIFEST_TYPE))
    } else if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        content
            .blobs
            .get(digest)
            .map(|b| (b.clone(), "application/octet-stream"))
    } else {
        None
    };
    drop(content);
    let Some((body, content_type)) = found else {
        return (
            StatusCode::NOT_FOUND,
            [(CONTENT_TYPE, "application/json")],
            UNKNOWN_BODY,
        )
            .into_response();
    };
    let digest = digest_of(&body);
    let headers = [
        (CONTENT_TYPE, content_type.to_owned()),
        (
            axum::http::HeaderName::from_static("docker-content-digest"),
            digest,
        ),
    ];
    // The server leaves the body out of an answer to HEAD.
    (StatusCode::OK, headers, body).into_response()
}
