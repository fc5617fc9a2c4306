//! The TLS accept loop shared by the MQTT and HTTPS listeners.

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A TLS handshake taking longer than this is abandoned.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until `shutdown` flips; each one admitted by `admit` is
/// handshaken and handed to `handle` in its own task.
pub(crate) async fn serve_tls<F, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
    admit: impl Fn() -> bool,
    handle: F,
) where
    F: Fn(TlsStream<TcpStream>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        if !admit() {
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let (acceptor, handle) = (acceptor.clone(), handle.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => handle(tls).await,
                Ok(Err(e)) => tracing::debug!("tls handshake failed: {e}"),
                Err(_) => tracing::debug!("tls handshake timed out"),
            }
        });
    }
}
