//! The transport seam. The server accepts streams from any [`Listener`]:
//! a tokio `TcpListener` in production, a turmoil listener in the
//! simulation (wrapped in `im-sim`). The server never names turmoil.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream the server can speak WebSocket or RESP over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Something that accepts connections.
pub trait Listener: Send + 'static {
    type Stream: Stream;
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // Chat frames are small and latency matters more than packing.
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }
}

/// A boxed stream, so the Redis link does not make everything generic.
pub type BoxStream = Box<dyn Stream>;

/// A future that opens one stream.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;

/// Opens a new stream to Redis each time it is called: real TCP in
/// production ([`tcp_connector`]), a turmoil stream in the simulation.
pub type Connector = std::sync::Arc<dyn Fn() -> ConnectFuture + Send + Sync>;

/// A [`Connector`] that dials `addr` over real TCP.
pub fn tcp_connector(addr: String) -> Connector {
    std::sync::Arc::new(move || {
        let addr = addr.clone();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxStream)
        })
    })
}
