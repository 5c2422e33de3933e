//! Probes: `tcp` (a connect) and `http` (GET `path` over hyper; 2xx and 3xx are healthy),
//! each bounded by the check's `timeout`.

use std::net::SocketAddr;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{CheckKind, HealthConfig};

/// Runs one check; `true` means healthy.
pub async fn probe(addr: SocketAddr, cfg: &HealthConfig) -> bool {
    let fut = async {
        match cfg.check {
            CheckKind::None => true,
            CheckKind::Tcp => TcpStream::connect(addr).await.is_ok(),
            CheckKind::Http => http(addr, &cfg.path).await,
        }
    };
    tokio::time::timeout(cfg.timeout, fut)
        .await
        .unwrap_or(false)
}

async fn http(addr: SocketAddr, path: &str) -> bool {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
    else {
        return false;
    };
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "meshd-health")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new());
    let ok = match req {
        Ok(req) => match sender.send_request(req).await {
            Ok(resp) => {
                let s = resp.status();
                s.is_success() || s.is_redirection()
            }
            Err(_) => false,
        },
        Err(_) => false,
    };
    driver.abort();
    ok
}
