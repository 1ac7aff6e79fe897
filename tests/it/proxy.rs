//! A TCP proxy the tests put in front of PostgreSQL or Redis, so an outage can be made and
//! ended on demand without touching the machine's own services.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards every connection to `upstream` until [`TcpProxy::cut`]; dropped, it stops.
pub struct TcpProxy {
    addr: SocketAddr,
    // `true` while traffic passes. Connection tasks watch it and drop both ends when it falls.
    passing: watch::Sender<bool>,
    // `true` while open connections stop forwarding but stay open: a half-open network.
    frozen: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (for example
    /// `127.0.0.1:5432`).
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let (passing, _) = watch::channel(true);
        let (frozen, _) = watch::channel(false);
        let watch = passing.clone();
        let freeze = frozen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // While cut, a new connection is accepted and closed at once: the client sees
                // the connection reset, as it would a server that went away.
                if !*watch.borrow() {
                    drop(client);
                    continue;
                }
                tokio::spawn(forward(
                    client,
                    upstream,
                    watch.subscribe(),
                    freeze.subscribe(),
                ));
            }
        });
        Self {
            addr,
            passing,
            frozen,
            accept,
        }
    }

    /// The address clients connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.passing.send_replace(false);
    }

    /// Stops forwarding on every open connection without closing it, as a network that drops
    /// everything silently would: the peers notice only by their own timeouts. Ended by
    /// [`TcpProxy::cut`], which closes them; [`TcpProxy::restore`] then lets new ones through.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Lets connections through again (the ones that were cut stay closed).
    pub fn restore(&self) {
        self.frozen.send_replace(false);
        self.passing.send_replace(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.passing.send_replace(false);
        self.accept.abort();
    }
}

async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut passing: watch::Receiver<bool>,
    mut frozen: watch::Receiver<bool>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        _ = passing.wait_for(|passing| !passing) => return,
        _ = frozen.wait_for(|frozen| *frozen) => {}
    }
    // Frozen: both ends stay open, nothing moves, until the cut.
    let _ = passing.wait_for(|passing| !passing).await;
}

#[tokio::test]
async fn the_proxy_forwards_cuts_and_restores() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // An echo server stands in for the upstream.
    let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let proxy = TcpProxy::start(upstream_addr).await;
    let echo = |mut stream: TcpStream| async move {
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };

    let open = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(&echo(open).await.expect("echoed"), b"ping");

    let mut held = TcpStream::connect(proxy.addr()).await.expect("connect");
    held.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    held.read_exact(&mut one)
        .await
        .expect("echoed before the cut");
    proxy.cut();
    // The open connection is closed: the read ends (EOF or reset) instead of hanging.
    let after_cut = tokio::time::timeout(std::time::Duration::from_secs(5), held.read(&mut one))
        .await
        .expect("the cut closes open connections");
    assert!(matches!(after_cut, Ok(0) | Err(_)), "{after_cut:?}");
    let refused = TcpStream::connect(proxy.addr()).await.expect("accepted");
    assert!(
        echo(refused).await.is_err(),
        "a new connection fails while cut"
    );

    proxy.restore();
    let again = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(&echo(again).await.expect("echoed after restore"), b"ping");
}
