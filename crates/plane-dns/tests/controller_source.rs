//! `ControllerTxtSource` against small real HTTP servers (axum on loopback) that record
//! what they were asked and answer as told.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use plane_dns::{ControllerTxtSource, TxtSource};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a fake controller answers.
#[derive(Clone)]
enum Reply {
    Values(Vec<&'static str>),
    Status(StatusCode),
    Body(&'static str),
    /// Never answers.
    Hang,
}

/// A request as the fake controller saw it.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    path: String,
    authorization: Option<String>,
}

struct Fake {
    reply: Mutex<Reply>,
    seen: Mutex<Vec<Seen>>,
}

struct FakeController {
    url: String,
    state: Arc<Fake>,
    shutdown: CancellationToken,
}

impl FakeController {
    async fn start(reply: Reply) -> Self {
        let state = Arc::new(Fake {
            reply: Mutex::new(reply),
            seen: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let app = Router::new().fallback(answer).with_state(state.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        });
        FakeController { url, state, shutdown }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn set_reply(&self, reply: Reply) {
        *self.state.reply.lock().unwrap() = reply;
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn answer(State(fake): State<Arc<Fake>>, request: Request) -> Response {
    fake.seen.lock().unwrap().push(Seen {
        path: request.uri().path().to_owned(),
        authorization: request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned()),
    });
    let reply = fake.reply.lock().unwrap().clone();
    match reply {
        Reply::Values(values) => axum::Json(serde_json::json!({ "values": values })).into_response(),
        Reply::Status(status) => (status, "no").into_response(),
        Reply::Body(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Reply::Hang => std::future::pending().await,
    }
}

/// A loopback address where nothing listens.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn fetches_values_with_the_bearer_token_and_an_encoded_path() {
    let controller = FakeController::start(Reply::Values(vec!["v1", "v2"])).await;
    let source = ControllerTxtSource::new(&controller.url, Some("secret-token".into())).unwrap();
    let values = source.txt_values("c1.plane.test").await.unwrap();
    assert_eq!(values, ["v1", "v2"]);

    // A cluster that needs percent-encoding stays one path segment.
    source.txt_values("odd/cluster name?").await.unwrap();
    assert_eq!(
        controller.seen(),
        [
            Seen {
                path: "/ctrl/c/c1.plane.test/acme-txt".into(),
                authorization: Some("Bearer secret-token".into()),
            },
            Seen {
                path: "/ctrl/c/odd%2Fcluster%20name%3F/acme-txt".into(),
                authorization: Some("Bearer secret-token".into()),
            },
        ]
    );
}

#[tokio::test]
async fn no_token_no_header_and_a_base_path_is_kept() {
    let controller = FakeController::start(Reply::Values(vec![])).await;
    let source = ControllerTxtSource::new(&format!("{}/prefix/", controller.url), None).unwrap();
    assert!(source.txt_values("c1").await.unwrap().is_empty());
    assert_eq!(
        controller.seen(),
        [Seen {
            path: "/prefix/ctrl/c/c1/acme-txt".into(),
            authorization: None,
        }]
    );
}

#[tokio::test]
async fn anything_but_200_with_values_is_an_error() {
    let controller = FakeController::start(Reply::Status(StatusCode::NOT_FOUND)).await;
    let source = ControllerTxtSource::new(&controller.url, None).unwrap();
    let error = source.txt_values("c1").await.unwrap_err();
    assert!(format!("{error:#}").contains("404"), "{error:#}");

    for status in [StatusCode::NO_CONTENT, StatusCode::INTERNAL_SERVER_ERROR] {
        controller.set_reply(Reply::Status(status));
        assert!(source.txt_values("c1").await.is_err(), "{status}");
    }
    controller.set_reply(Reply::Body(r#"{"vals": []}"#));
    assert!(source.txt_values("c1").await.is_err());
    controller.set_reply(Reply::Body("not json"));
    assert!(source.txt_values("c1").await.is_err());

    let down = closed_port().await;
    let source = ControllerTxtSource::new(&format!("http://{down}"), None).unwrap();
    assert!(source.txt_values("c1").await.is_err());
}

#[tokio::test]
async fn rotates_to_the_next_controller_on_failure() {
    let a = FakeController::start(Reply::Status(StatusCode::SERVICE_UNAVAILABLE)).await;
    let b = FakeController::start(Reply::Values(vec!["from-b"])).await;
    let source = ControllerTxtSource::new(&format!("{}, {}", a.url, b.url), None).unwrap();

    // A fails, B answers; the next call goes straight to B.
    assert_eq!(source.txt_values("c1").await.unwrap(), ["from-b"]);
    assert_eq!(source.txt_values("c1").await.unwrap(), ["from-b"]);
    assert_eq!(a.seen().len(), 1);
    assert_eq!(b.seen().len(), 2);

    // B fails now, and A is still failing: one try each, and an error naming both.
    b.set_reply(Reply::Status(StatusCode::BAD_GATEWAY));
    let error = format!("{:#}", source.txt_values("c1").await.unwrap_err());
    assert!(error.contains("502") && error.contains("503"), "{error}");
    assert_eq!(a.seen().len(), 2);
    assert_eq!(b.seen().len(), 3);

    // A recovered: the call after that starts at A.
    a.set_reply(Reply::Values(vec!["from-a"]));
    assert_eq!(source.txt_values("c1").await.unwrap(), ["from-a"]);
    assert_eq!(b.seen().len(), 3);
}

#[tokio::test]
async fn an_unreachable_or_hanging_controller_is_skipped() {
    let down = closed_port().await;
    let b = FakeController::start(Reply::Values(vec!["v"])).await;
    let source = ControllerTxtSource::new(&format!("http://{down},{}", b.url), None).unwrap();
    assert_eq!(source.txt_values("c1").await.unwrap(), ["v"]);

    // Each request is bounded by 2 s.
    let hanging = FakeController::start(Reply::Hang).await;
    let source = ControllerTxtSource::new(&format!("{},{}", hanging.url, b.url), None).unwrap();
    let started = Instant::now();
    assert_eq!(source.txt_values("c1").await.unwrap(), ["v"]);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert_eq!(hanging.seen().len(), 1);
}
