//! One HTTP GET on a connection of its own, bounded in time and in the
//! size of the answer: `doctor`'s read of `/healthz`, and the lab's of the
//! agent's listeners (xtask includes this file by path, so both ask the
//! same way).

use std::{error::Error, io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, client::conn::http1, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What went wrong: connecting, the exchange, or an answer that is not
/// HTTP or too big.
pub type HttpError = Box<dyn Error + Send + Sync>;

/// GETs `path` from `address` and returns the status and body; the whole
/// exchange within `within`, a body of at most `body_limit` bytes.
pub async fn http_get(
    address: SocketAddr,
    path: &str,
    within: Duration,
    body_limit: usize,
) -> Result<(u16, String), HttpError> {
    let exchange = async {
        let stream = TcpStream::connect(address).await?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        // Reads and writes the socket while the answer is awaited below.
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, address.to_string())
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())?;
        let response = match sender.send_request(request).await {
            Err(error) if error.is_parse() => {
                return Err(format!("not an HTTP answer: {error}").into());
            }
            answer => answer?,
        };
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), body_limit)
            .collect()
            .await?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(within, exchange).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {within:?}"),
        )
    })?
}
