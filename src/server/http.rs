//! The HTTP front end on the shards: Git smart HTTP, `/healthz` and `/metrics`.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use super::shard::{accept_loop, AcceptOptions, ListenerSet, ShardContext, ShardService};
use crate::http::conn::Conn;
use crate::http::server::serve_connection;
use crate::smart_http::{AppState, SmartHttp};

pub struct HttpService {
    listeners: ListenerSet,
    state: Arc<AppState>,
}

impl HttpService {
    pub fn new(listeners: ListenerSet, state: Arc<AppState>) -> Self {
        Self { listeners, state }
    }
}

impl ShardService for HttpService {
    fn serve(&self, ctx: ShardContext) -> Pin<Box<dyn Future<Output = ()>>> {
        let listener = self.listeners.take(ctx.shard);
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            let Some(listener) = listener else { return };
            let handler = Rc::new(SmartHttp::new(Arc::clone(&state), Rc::clone(&ctx.shutdown)));
            let config = Arc::clone(&state.config);
            let opts = AcceptOptions {
                name: "http",
                max_connections: config.http.max_connections_per_shard,
                tcp: &config.tcp,
            };
            let serve = |stream, peer| {
                let handler = Rc::clone(&handler);
                let shutdown = Rc::clone(&ctx.shutdown);
                let config = Arc::clone(&config);
                async move {
                    let mut conn = Conn::new(stream, peer);
                    serve_connection(&*handler, &mut conn, &config.http, &shutdown).await;
                }
            };
            let reject = |stream, peer| async move {
                let mut conn = Conn::new(stream, peer);
                conn.close_after_response();
                let _ = conn
                    .respond_text(503, &[("Retry-After", "1")], "too many connections\n")
                    .await;
                conn.shutdown().await;
            };
            accept_loop(listener, &ctx, opts, serve, reject).await;
        })
    }
}
