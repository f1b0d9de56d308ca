//! A fake Docker registry for tests: the pull side of the distribution API (v2), on plain
//! HTTP on loopback, serving one image that the Docker engine can `docker pull` for real.
//!
//! The engine treats registries on 127.0.0.0/8 as insecure without configuration: it
//! tries TLS first (the registry closes such connections) and then talks plain HTTP.
//!
//! # What it serves
//!
//! [`TestRegistry::start`] takes an image the engine has (usually
//! [`demo_image`](crate::demo_image)), reads it with `docker save`, and serves it as
//! `127.0.0.1:<port>/<repository>:<tag>`, a new random tag per registry:
//! * `GET|HEAD /v2/`: the API version check;
//! * `GET|HEAD /v2/<repository>/manifests/<tag or digest>`: a schema 2 manifest
//!   (`application/vnd.docker.distribution.manifest.v2+json`) with its
//!   `Docker-Content-Digest`;
//! * `GET|HEAD /v2/<repository>/blobs/<digest>`: the image config and the layers, gzip
//!   compressed (`…rootfs.diff.tar.gzip`), with `Range` support. The config's `diff_ids`
//!   are the digests of the uncompressed tars, the manifest's digests those of the bytes
//!   served, so the engine's checks pass.
//!
//! Everything else is a registry error (`404` with `NAME_UNKNOWN`, `MANIFEST_UNKNOWN` or
//! `BLOB_UNKNOWN`, `405` for other methods), in the registry's JSON error format.
//!
//! The layers are the saved image's, plus one layer holding a file of random bytes
//! ([`RegistryOptions::extra_layer_bytes`]), so every registry's image is new to the
//! engine and a pull always downloads something. The saved image's layers keep the same
//! bytes from one registry to the next (the gzip stream is deterministic), so an engine
//! that pulled them once reports them as `Already exists`, as with a real registry.
//!
//! The gzip streams use deflate's stored (uncompressed) blocks: valid gzip that the
//! engine decompresses and checks like any other, without the cost of compressing.
//!
//! # Authentication
//!
//! With credentials, every request without the right `Authorization: Basic …` header
//! gets `401 Unauthorized`, `WWW-Authenticate: Basic realm="plane-test-image"` and an
//! `UNAUTHORIZED` error, so the engine first pings `/v2/` without credentials, then
//! retries with them (and reports `unauthorized: …` when they are wrong).
//!
//! # Progress
//!
//! Blobs are written in chunks of [`RegistryOptions::chunk_bytes`], with an optional
//! pause between chunks ([`RegistryOptions::chunk_delay`]), so the engine sees a download
//! in progress. For a deterministic report, [`RegistryOptions::hold_extra_layer_at`]
//! stops sending the random layer after that many bytes until [`TestRegistry::release`]
//! is called: a test can observe a pull in the middle of a download, then let it finish.
//!
//! The server runs on a thread of its own (with its own tokio runtime), so it answers
//! even while the test's runtime is busy or blocked; dropping the [`TestRegistry`] stops
//! it and closes its connections.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use plane_test_image::registry::TestRegistry;
//! let image = plane_test_image::demo_image_async().await?;
//! let registry = TestRegistry::start(&image, "plane-test/demo", Some(("user", "secret"))).await?;
//! // docker login 127.0.0.1:<port> -u user -p secret; docker pull <registry.image_ref()>
//! println!("{} served {} manifests", registry.image_ref(), registry.pulls());
//! # Ok(()) }
//! ```

use anyhow::{bail, Context as _};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

/// The media type of the manifests served.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The media type of the image config in the manifest.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";
/// The media type of the layers in the manifest.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The realm of the `WWW-Authenticate` challenge.
const REALM: &str = "plane-test-image";
/// The largest request head accepted.
const MAX_HEAD: usize = 64 << 10;
/// The largest stored deflate block.
const STORED_BLOCK: usize = 0xffff;

/// How a [`TestRegistry`] serves its image.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// `(user, password)`: every request must carry them (Basic authentication).
    pub credentials: Option<(String, String)>,
    /// The size of the file of random bytes in the extra layer (default 3 MiB).
    pub extra_layer_bytes: usize,
    /// Blobs are written in chunks of this many bytes (default 64 KiB).
    pub chunk_bytes: usize,
    /// A pause after each chunk of a blob (default none).
    pub chunk_delay: Duration,
    /// Stop sending the extra layer after this many bytes, until
    /// [`TestRegistry::release`] (default: never stop).
    pub hold_extra_layer_at: Option<u64>,
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            credentials: None,
            extra_layer_bytes: 3 << 20,
            chunk_bytes: 64 << 10,
            chunk_delay: Duration::ZERO,
            hold_extra_layer_at: None,
        }
    }
}

/// A running fake registry serving one image; see the [module docs](self).
pub struct TestRegistry {
    address: SocketAddr,
    image_ref: String,
    layer_sizes: Vec<u64>,
    shared: Arc<Shared>,
    /// Dropped (or sent) to stop the server.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the server and the handle share.
struct Shared {
    /// Manifest requests (GET or HEAD) answered with the manifest.
    pulls: AtomicUsize,
    /// `METHOD path -> status` of every request answered.
    requests: Mutex<Vec<String>>,
    /// Open (`true`) once [`TestRegistry::release`] is called.
    gate: watch::Sender<bool>,
    /// `true` while a download of the extra layer waits at the gate.
    holding: watch::Sender<bool>,
}

/// The image as served: every blob by digest, and the manifest.
struct Content {
    repository: String,
    tag: String,
    manifest: Arc<Vec<u8>>,
    manifest_digest: String,
    blobs: HashMap<String, Arc<Vec<u8>>>,
    extra_layer_digest: String,
    /// `Basic <base64>` if credentials are required.
    authorization: Option<String>,
    chunk_bytes: usize,
    chunk_delay: Duration,
    hold_at: Option<u64>,
}

impl TestRegistry {
    /// Serves `image` (which the local engine must have) as `<repository>:<random tag>`,
    /// with the default [`RegistryOptions`] and these credentials, if any.
    pub async fn start(image: &str, repository: &str, credentials: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let options = RegistryOptions {
            credentials: credentials.map(|(user, password)| (user.to_owned(), password.to_owned())),
            ..RegistryOptions::default()
        };
        TestRegistry::start_with(image, repository, options).await
    }

    /// Serves `image` as `<repository>:<random tag>`, as `options` say.
    ///
    /// Runs `docker save`; errors say what failed (the engine's message, or what is
    /// wrong with the saved image).
    pub async fn start_with(image: &str, repository: &str, options: RegistryOptions) -> anyhow::Result<Self> {
        check_repository(repository)?;
        if options.chunk_bytes == 0 {
            bail!("chunk_bytes must be at least 1");
        }
        let saved = docker_save(image).await?;
        let repository = repository.to_owned();
        let tag = format!("t{:08x}", rand::random::<u32>());
        let (content, layer_sizes) =
            tokio::task::spawn_blocking(move || Content::build(&saved, repository, tag, &options))
                .await
                .context("the task preparing the image panicked")??;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind the registry's port")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let image_ref = format!("{address}/{}:{}", content.repository, content.tag);
        let shared = Arc::new(Shared {
            pulls: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            gate: watch::Sender::new(false),
            holding: watch::Sender::new(false),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build the registry's runtime")?;
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("test-registry-{}", address.port()))
            .spawn(move || runtime.block_on(serve(listener, Arc::new(content), server_shared, stopped)))
            .context("cannot start the registry's thread")?;
        Ok(TestRegistry {
            address,
            image_ref,
            layer_sizes,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The image reference to pull: `127.0.0.1:<port>/<repository>:<tag>`.
    pub fn image_ref(&self) -> &str {
        &self.image_ref
    }

    /// The registry's address (`127.0.0.1:<port>`), which is also the registry part of
    /// [`TestRegistry::image_ref`].
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// How many manifest requests were answered with the manifest: at least one per
    /// pull that got past authentication. HEADs count too: the engine HEADs the tag
    /// first and GETs the manifest (by digest) only if it lacks the image, so a pull of
    /// an image that is up to date is a single HEAD.
    pub fn pulls(&self) -> usize {
        self.shared.pulls.load(Ordering::SeqCst)
    }

    /// `METHOD path -> status` of every request answered so far, in order.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    /// The sizes of the layers as served (compressed), in manifest order; the last one is
    /// the extra layer of random bytes.
    pub fn layer_sizes(&self) -> &[u64] {
        &self.layer_sizes
    }

    /// Lets held downloads of the extra layer go on, and stops holding new ones.
    pub fn release(&self) {
        self.shared.gate.send_replace(true);
    }

    /// Waits until a download of the extra layer is held (see
    /// [`RegistryOptions::hold_extra_layer_at`]); fails after `limit`.
    pub async fn wait_held(&self, limit: Duration) -> anyhow::Result<()> {
        let mut holding = self.shared.holding.subscribe();
        let held = tokio::time::timeout(limit, async { holding.wait_for(|held| *held).await.is_ok() }).await;
        match held {
            Ok(true) => Ok(()),
            Ok(false) => bail!("the registry stopped"),
            Err(_) => bail!("no download of the extra layer was held within {limit:?}"),
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The server ends at once: its runtime drops every connection when it stops.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for TestRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRegistry")
            .field("image_ref", &self.image_ref)
            .field("pulls", &self.pulls())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Repository names as the distribution spec allows them (lowercase path components).
fn check_repository(repository: &str) -> anyhow::Result<()> {
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if repository.split('/').all(component_ok) {
        Ok(())
    } else {
        bail!("{repository:?} is not a valid repository name (lowercase letters, digits, `._-`, `/`)")
    }
}

/// The tar that `docker save` writes for `image`.
async fn docker_save(image: &str) -> anyhow::Result<Vec<u8>> {
    let output = tokio::process::Command::new("docker")
        .args(["save", image])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("cannot run `docker save`")?;
    if !output.status.success() {
        bail!(
            "`docker save {image}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for b in hash {
        text.push_str(&format!("{b:02x}"));
    }
    text
}

impl Content {
    /// The image in `saved` (a `docker save` tar) plus a random layer, ready to serve.
    /// Also returns the layers' sizes as served.
    fn build(
        saved: &[u8],
        repository: String,
        tag: String,
        options: &RegistryOptions,
    ) -> anyhow::Result<(Content, Vec<u64>)> {
        let files = tar_files(saved).context("cannot read the output of `docker save`")?;
        let file = |path: &str| {
            files
                .get(path.trim_start_matches("./"))
                .with_context(|| format!("`docker save` wrote no {path}"))
        };
        let index: serde_json::Value =
            serde_json::from_slice(file("manifest.json")?).context("invalid manifest.json from `docker save`")?;
        let entry = index
            .as_array()
            .and_then(|entries| entries.first())
            .context("`docker save` wrote no image in manifest.json")?;
        let config_path = entry["Config"].as_str().context("manifest.json names no Config")?;
        let mut config: serde_json::Value =
            serde_json::from_slice(file(config_path)?).context("invalid image config from `docker save`")?;
        let mut layers: Vec<Vec<u8>> = Vec::new();
        for path in entry["Layers"].as_array().context("manifest.json lists no Layers")? {
            let path = path.as_str().context("a layer path is not a string")?;
            let layer = file(path)?;
            if layer.starts_with(&[0x1f, 0x8b]) {
                bail!("layer {path} from `docker save` is compressed; only plain tar layers are supported");
            }
            layers.push(layer.clone());
        }
        let saved_layers = layers.len();
        layers.push(random_layer(options.extra_layer_bytes)?);

        // The config names each layer by the digest of its uncompressed tar.
        config["rootfs"] = serde_json::json!({
            "type": "layers",
            "diff_ids": layers.iter().map(|l| sha256_digest(l)).collect::<Vec<_>>(),
        });
        let extra_history = serde_json::json!({
            "created": "2026-01-01T00:00:00Z",
            "created_by": "plane-test-image registry: a layer of random bytes",
        });
        let history_layers = config["history"].as_array().map(|h| {
            h.iter()
                .filter(|e| !e["empty_layer"].as_bool().unwrap_or(false))
                .count()
        });
        if history_layers == Some(saved_layers) {
            if let Some(history) = config["history"].as_array_mut() {
                history.push(extra_history);
            }
        } else {
            config["history"] = (0..=saved_layers).map(|_| extra_history.clone()).collect();
        }
        let config = serde_json::to_vec(&config)?;

        let compressed: Vec<Vec<u8>> = layers.iter().map(|l| gzip_stored(l)).collect();
        let descriptors: Vec<serde_json::Value> = compressed
            .iter()
            .map(|blob| {
                let digest = sha256_digest(blob);
                serde_json::json!({"mediaType": LAYER_MEDIA_TYPE, "size": blob.len(), "digest": digest})
            })
            .collect();
        let manifest = serde_json::to_vec_pretty(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "size": config.len(), "digest": sha256_digest(&config)},
            "layers": descriptors,
        }))?;
        let layer_sizes = compressed.iter().map(|blob| blob.len() as u64).collect();
        let extra_layer_digest = sha256_digest(compressed.last().context("no layers")?);
        let mut blobs: HashMap<String, Arc<Vec<u8>>> = compressed
            .into_iter()
            .map(|blob| (sha256_digest(&blob), Arc::new(blob)))
            .collect();
        blobs.insert(sha256_digest(&config), Arc::new(config));
        let authorization = options.credentials.as_ref().map(|(user, password)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        let content = Content {
            repository,
            tag,
            manifest_digest: sha256_digest(&manifest),
            manifest: Arc::new(manifest),
            blobs,
            extra_layer_digest,
            authorization,
            chunk_bytes: options.chunk_bytes,
            chunk_delay: options.chunk_delay,
            hold_at: options.hold_extra_layer_at,
        };
        Ok((content, layer_sizes))
    }
}

/// The regular files of a tar, by path (without a leading `./`).
fn tar_files(tar: &[u8]) -> std::io::Result<HashMap<String, Vec<u8>>> {
    let mut files = HashMap::new();
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path()?.to_string_lossy().trim_start_matches("./").to_owned();
        let mut content = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut content)?;
        files.insert(path, content);
    }
    Ok(files)
}

/// A tar holding `plane-test-registry/random.bin`, `len` random bytes.
fn random_layer(len: usize) -> std::io::Result<Vec<u8>> {
    let mut data = vec![0u8; len];
    rand::Rng::fill(&mut rand::thread_rng(), data.as_mut_slice());
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(len as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    builder.append_data(&mut header, "plane-test-registry/random.bin", data.as_slice())?;
    builder.into_inner()
}

/// `data` as a gzip stream (RFC 1952) of stored deflate blocks (RFC 1951 §3.2.4).
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let blocks = data.len().div_ceil(STORED_BLOCK).max(1);
    let mut out = Vec::with_capacity(10 + data.len() + 5 * blocks + 8);
    // Magic, deflate, no flags, no mtime, no extra flags, OS unknown.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    let mut chunks = data.chunks(STORED_BLOCK).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        // BFINAL on the last block, BTYPE 00; then LEN and its complement.
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// The CRC-32 of gzip (ISO-HDLC: reflected, polynomial 0xEDB88320).
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data
        .iter()
        .fold(!0u32, |c, &b| TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

/// Accepts connections until `stopped` fires (or its sender is dropped).
async fn serve(
    listener: std::net::TcpListener,
    content: Arc<Content>,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(connection(stream, content.clone(), shared.clone()));
                }
            }
        }
    }
}

/// One request, as much of it as the registry looks at.
struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    range: Option<String>,
}

/// A response: status line, headers, and a body (sent unless the request was a HEAD).
struct Response {
    status: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Arc<Vec<u8>>,
    /// The part of `body` to send.
    span: std::ops::Range<usize>,
    /// Whether this is the extra layer, which may be held.
    extra_layer: bool,
}

impl Response {
    fn new(status: &'static str, content_type: &str, body: Arc<Vec<u8>>) -> Response {
        let span = 0..body.len();
        Response {
            status,
            headers: vec![("Content-Type", content_type.to_owned())],
            body,
            span,
            extra_layer: false,
        }
    }

    /// A registry error: `{"errors":[{"code","message"}]}`.
    fn error(status: &'static str, code: &str, message: &str) -> Response {
        let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]});
        Response::new(status, "application/json", Arc::new(body.to_string().into_bytes()))
    }
}

/// Serves HTTP/1.1 requests on one connection until it closes. Anything that does not
/// start like an HTTP request (the engine's TLS attempt first of all) is dropped.
async fn connection(mut stream: tokio::net::TcpStream, content: Arc<Content>, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let response = respond(&request, &content, &shared);
        lock(&shared.requests).push(format!("{} {} -> {}", request.method, request.path, response.status));
        if send(&mut stream, &request, response, &content, &shared).await.is_err() {
            return;
        }
    }
}

/// Reads the next request head from `stream` (skipping any body); `None` at the end of
/// the connection or on anything that is not HTTP.
async fn read_request(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.first().is_some_and(|b| !b.is_ascii_uppercase()) || buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let target = request_line.next()?;
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let mut request = Request {
        method,
        path,
        authorization: None,
        range: None,
    };
    let mut body_len = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "authorization" => request.authorization = Some(value.to_owned()),
            "range" => request.range = Some(value.to_owned()),
            "content-length" => body_len = value.parse().ok()?,
            _ => {}
        }
    }
    // The pull side sends no bodies; skip one if it comes.
    while buf.len() < body_len {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..body_len);
    Some(request)
}

/// The response to `request`.
fn respond(request: &Request, content: &Content, shared: &Shared) -> Response {
    if content.authorization.is_some() && request.authorization != content.authorization {
        let mut response = Response::error("401 Unauthorized", "UNAUTHORIZED", "authentication required");
        response
            .headers
            .push(("WWW-Authenticate", format!("Basic realm=\"{REALM}\"")));
        return response;
    }
    if request.method != "GET" && request.method != "HEAD" {
        return Response::error(
            "405 Method Not Allowed",
            "UNSUPPORTED",
            "this registry only serves pulls",
        );
    }
    if request.path == "/v2/" || request.path == "/v2" {
        return Response::new("200 OK", "application/json", Arc::new(b"{}".to_vec()));
    }
    let Some(rest) = request.path.strip_prefix("/v2/") else {
        return Response::error("404 Not Found", "NOT_FOUND", "not a registry API path");
    };
    let repository = &content.repository;
    let Some(rest) = rest
        .strip_prefix(repository.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return Response::error("404 Not Found", "NAME_UNKNOWN", "repository name not known to registry");
    };
    if let Some(reference) = rest.strip_prefix("manifests/") {
        if reference != content.tag && reference != content.manifest_digest {
            return Response::error("404 Not Found", "MANIFEST_UNKNOWN", "manifest unknown");
        }
        shared.pulls.fetch_add(1, Ordering::SeqCst);
        let mut response = Response::new("200 OK", MANIFEST_MEDIA_TYPE, content.manifest.clone());
        response
            .headers
            .push(("Docker-Content-Digest", content.manifest_digest.clone()));
        return response;
    }
    if let Some(digest) = rest.strip_prefix("blobs/") {
        let Some(blob) = content.blobs.get(digest) else {
            return Response::error("404 Not Found", "BLOB_UNKNOWN", "blob unknown to registry");
        };
        let mut response = Response::new("200 OK", "application/octet-stream", blob.clone());
        response.headers.push(("Docker-Content-Digest", digest.to_owned()));
        response.headers.push(("Accept-Ranges", "bytes".to_owned()));
        response.extra_layer = digest == content.extra_layer_digest;
        if let Some(range) = &request.range {
            match byte_range(range, blob.len()) {
                Some(span) => {
                    response.status = "206 Partial Content";
                    response.headers.push((
                        "Content-Range",
                        format!("bytes {}-{}/{}", span.start, span.end - 1, blob.len()),
                    ));
                    response.span = span;
                }
                None => {
                    let mut response =
                        Response::error("416 Range Not Satisfiable", "BLOB_UNKNOWN", "range not satisfiable");
                    response
                        .headers
                        .push(("Content-Range", format!("bytes */{}", blob.len())));
                    return response;
                }
            }
        }
        return response;
    }
    Response::error("404 Not Found", "UNSUPPORTED", "this registry only serves pulls")
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` as a span of a body of `len` bytes.
fn byte_range(range: &str, len: usize) -> Option<std::ops::Range<usize>> {
    let (first, last) = range.trim().strip_prefix("bytes=")?.split_once('-')?;
    let (start, end) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n: usize = suffix.parse().ok()?;
            (len.checked_sub(n.min(len))?, len)
        }
        (first, "") => (first.parse().ok()?, len),
        (first, last) => (
            first.parse().ok()?,
            last.parse::<usize>().ok()?.saturating_add(1).min(len),
        ),
    };
    (start < end).then_some(start..end)
}

/// Writes `response`, its body in chunks (held or paused as configured).
async fn send(
    stream: &mut tokio::net::TcpStream,
    request: &Request,
    response: Response,
    content: &Content,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nDocker-Distribution-API-Version: registry/2.0\r\n\r\n",
        response.span.len()
    ));
    stream.write_all(head.as_bytes()).await?;
    if request.method == "HEAD" {
        return stream.flush().await;
    }
    let hold_at = content.hold_at.filter(|_| response.extra_layer);
    let mut at = response.span.start;
    while at < response.span.end {
        if hold_at.is_some_and(|hold| at as u64 >= hold) && !*shared.gate.borrow() {
            let mut gate = shared.gate.subscribe();
            shared.holding.send_replace(true);
            let released = gate.wait_for(|open| *open).await.is_ok();
            shared.holding.send_replace(false);
            if !released {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
        }
        let mut end = (at + content.chunk_bytes).min(response.span.end);
        if let Some(hold) = hold_at.and_then(|h| usize::try_from(h).ok()) {
            if at < hold && hold < end && !*shared.gate.borrow() {
                end = hold;
            }
        }
        stream.write_all(&response.body[at..end]).await?;
        at = end;
        if !content.chunk_delay.is_zero() && at < response.span.end {
            tokio::time::sleep(content.chunk_delay).await;
        }
    }
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    /// Decompresses with the system's `gzip`, which checks the CRC and the length.
    fn gunzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut child = std::process::Command::new("gzip")
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("these tests run `gzip`");
        let mut stdin = child.stdin.take().unwrap();
        let input = data.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    }

    #[test]
    fn stored_gzip_streams_decompress() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for data in [&b""[..], b"x", &big[..STORED_BLOCK], &big[..STORED_BLOCK + 1], &big] {
            let gz = gzip_stored(data);
            assert_eq!(gunzip(&gz), data, "{} bytes", data.len());
            assert_eq!(gzip_stored(data), gz, "deterministic");
        }
    }

    #[test]
    fn digests() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(byte_range("bytes=0-", 10), Some(0..10));
        assert_eq!(byte_range("bytes=4-", 10), Some(4..10));
        assert_eq!(byte_range("bytes=2-4", 10), Some(2..5));
        assert_eq!(byte_range("bytes=2-40", 10), Some(2..10));
        assert_eq!(byte_range("bytes=-3", 10), Some(7..10));
        assert_eq!(byte_range("bytes=10-", 10), None);
        assert_eq!(byte_range("bytes=5-2", 10), None);
        assert_eq!(byte_range("items=0-1", 10), None);
    }

    #[test]
    fn repository_names() {
        for good in ["demo", "plane-test/demo", "a/b.c/d_e"] {
            assert!(check_repository(good).is_ok(), "{good}");
        }
        for bad in ["", "Demo", "a//b", "/a", "a/", "-a", "a b"] {
            assert!(check_repository(bad).is_err(), "{bad}");
        }
    }

    /// A `docker save`-like tar of one image with one layer.
    fn saved_image(layer: &[u8]) -> Vec<u8> {
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer)]},
            "history": [{"created": "2026-01-01T00:00:00Z", "comment": "imported"}],
        });
        let index = serde_json::json!([{"Config": "abc.json", "RepoTags": ["x:1"], "Layers": ["l1/layer.tar"]}]);
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in [
            ("abc.json", config.to_string().into_bytes()),
            ("l1/layer.tar", layer.to_vec()),
            ("manifest.json", index.to_string().into_bytes()),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, path, data.as_slice()).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn request(method: &str, path: &str, authorization: Option<&str>) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            authorization: authorization.map(str::to_owned),
            range: None,
        }
    }

    fn shared() -> Shared {
        Shared {
            pulls: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            gate: watch::Sender::new(false),
            holding: watch::Sender::new(false),
        }
    }

    #[test]
    fn content_and_routes() {
        let layer = random_layer(1000).unwrap();
        let options = RegistryOptions {
            credentials: Some(("u".into(), "p".into())),
            extra_layer_bytes: 5000,
            ..RegistryOptions::default()
        };
        let (content, sizes) = Content::build(&saved_image(&layer), "r/demo".into(), "t1".into(), &options).unwrap();
        assert_eq!(sizes.len(), 2);
        let shared = shared();
        let auth = Some("Basic dTpw"); // base64("u:p")

        let denied = respond(&request("GET", "/v2/", None), &content, &shared);
        assert_eq!(denied.status, "401 Unauthorized");
        assert!(denied
            .headers
            .contains(&("WWW-Authenticate", "Basic realm=\"plane-test-image\"".to_owned())));
        let wrong = respond(
            &request("GET", "/v2/r/demo/manifests/t1", Some("Basic eDp5")),
            &content,
            &shared,
        );
        assert_eq!(wrong.status, "401 Unauthorized");
        assert_eq!(
            respond(&request("GET", "/v2/", auth), &content, &shared).status,
            "200 OK"
        );
        assert_eq!(shared.pulls.load(Ordering::SeqCst), 0);

        let manifest = respond(&request("GET", "/v2/r/demo/manifests/t1", auth), &content, &shared);
        assert_eq!(manifest.status, "200 OK");
        assert_eq!(shared.pulls.load(Ordering::SeqCst), 1);
        let by_digest = format!("/v2/r/demo/manifests/{}", content.manifest_digest);
        assert_eq!(
            respond(&request("HEAD", &by_digest, auth), &content, &shared).status,
            "200 OK"
        );
        assert_eq!(shared.pulls.load(Ordering::SeqCst), 2, "a HEAD counts too");
        let parsed: serde_json::Value = serde_json::from_slice(&manifest.body).unwrap();
        assert_eq!(parsed["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(sha256_digest(&manifest.body), content.manifest_digest);

        // Every digest is right: blobs by what is served, diff ids by the tars.
        let config_digest = parsed["config"]["digest"].as_str().unwrap();
        let config = respond(
            &request("GET", &format!("/v2/r/demo/blobs/{config_digest}"), auth),
            &content,
            &shared,
        );
        assert_eq!(sha256_digest(&config.body), config_digest);
        let config: serde_json::Value = serde_json::from_slice(&config.body).unwrap();
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        assert_eq!(diff_ids[0], sha256_digest(&layer));
        assert_eq!(config["history"].as_array().unwrap().len(), 2);
        let descriptors = parsed["layers"].as_array().unwrap();
        for (i, descriptor) in descriptors.iter().enumerate() {
            assert_eq!(descriptor["mediaType"], LAYER_MEDIA_TYPE);
            let digest = descriptor["digest"].as_str().unwrap();
            let blob = respond(
                &request("GET", &format!("/v2/r/demo/blobs/{digest}"), auth),
                &content,
                &shared,
            );
            assert_eq!(blob.status, "200 OK");
            assert_eq!(sha256_digest(&blob.body), digest);
            assert_eq!(descriptor["size"], blob.body.len());
            assert_eq!(sizes[i], blob.body.len() as u64);
            assert_eq!(blob.extra_layer, i == 1);
            assert_eq!(sha256_digest(&gunzip(&blob.body)), diff_ids[i]);
        }
        let extra = gunzip(
            &respond(
                &request("GET", &format!("/v2/r/demo/blobs/{}", content.extra_layer_digest), auth),
                &content,
                &shared,
            )
            .body,
        );
        let files = tar_files(&extra).unwrap();
        assert_eq!(files["plane-test-registry/random.bin"].len(), 5000);

        let mut ranged = request("GET", &format!("/v2/r/demo/blobs/{config_digest}"), auth);
        ranged.range = Some("bytes=5-".into());
        let partial = respond(&ranged, &content, &shared);
        assert_eq!((partial.status, partial.span.start), ("206 Partial Content", 5));

        for (path, status) in [
            ("/v2/r/other/manifests/t1", "404 Not Found"),
            ("/v2/r/demo/manifests/t2", "404 Not Found"),
            ("/v2/r/demo/blobs/sha256:00", "404 Not Found"),
            ("/elsewhere", "404 Not Found"),
        ] {
            assert_eq!(
                respond(&request("GET", path, auth), &content, &shared).status,
                status,
                "{path}"
            );
        }
        assert_eq!(
            respond(&request("PUT", "/v2/r/demo/blobs/uploads/", auth), &content, &shared).status,
            "405 Method Not Allowed"
        );
    }
}
