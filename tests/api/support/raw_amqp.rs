//! A raw AMQP 0-9-1 publisher built from hand-made frames, for the one thing no client
//! library will do: publish properties and headers that are not valid UTF-8 (the poison
//! messages RabbitMQ accepts and lapin refuses to parse). Plain auth, one channel, publisher
//! confirms; just enough protocol for the tests, every read bounded by a timeout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for any one frame from the broker.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
const FRAME_END: u8 = 0xCE;

/// One basic property of the content header, in AMQP's flag order, with raw bytes.
#[derive(Debug, Clone)]
pub(crate) enum RawProperty {
    ContentType(Vec<u8>),
    /// The header table's encoded bytes (without the length prefix).
    Headers(Vec<u8>),
    CorrelationId(Vec<u8>),
    ReplyTo(Vec<u8>),
    MessageId(Vec<u8>),
    Type(Vec<u8>),
    UserId(Vec<u8>),
    AppId(Vec<u8>),
}

impl RawProperty {
    /// The property's bit in the 16-bit flags word (bit 15 is content-type).
    fn flag(&self) -> u16 {
        match self {
            RawProperty::ContentType(_) => 1 << 15,
            RawProperty::Headers(_) => 1 << 13,
            RawProperty::CorrelationId(_) => 1 << 10,
            RawProperty::ReplyTo(_) => 1 << 9,
            RawProperty::MessageId(_) => 1 << 7,
            RawProperty::Type(_) => 1 << 5,
            RawProperty::UserId(_) => 1 << 4,
            RawProperty::AppId(_) => 1 << 3,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            RawProperty::Headers(table) => {
                out.extend_from_slice(&(table.len() as u32).to_be_bytes());
                out.extend_from_slice(table);
            }
            RawProperty::ContentType(bytes)
            | RawProperty::CorrelationId(bytes)
            | RawProperty::ReplyTo(bytes)
            | RawProperty::MessageId(bytes)
            | RawProperty::Type(bytes)
            | RawProperty::UserId(bytes)
            | RawProperty::AppId(bytes) => short_string(out, bytes),
        }
    }
}

/// A header table with one long-string entry whose key is `key` (raw bytes).
pub(crate) fn header_table_with_key(key: &[u8]) -> Vec<u8> {
    let mut table = Vec::new();
    short_string(&mut table, key);
    table.push(b'S');
    table.extend_from_slice(&3u32.to_be_bytes());
    table.extend_from_slice(b"bad");
    table
}

fn short_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).expect("a short string is at most 255 bytes"));
    out.extend_from_slice(bytes);
}

/// What the broker answered to a confirmed publish.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Published {
    Acked,
    Nacked,
    /// The broker closed the channel or connection instead (it refused the publish).
    Refused(String),
}

/// A connection with one channel in confirm mode.
pub(crate) struct RawPublisher {
    stream: TcpStream,
    delivery_tag: u64,
}

impl RawPublisher {
    /// Connects to `host:port` as `user`/`password` on vhost `/`.
    pub(crate) async fn connect(address: &str, user: &str, password: &str) -> std::io::Result<Self> {
        let mut stream = TcpStream::connect(address).await?;
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut publisher = RawPublisher { stream, delivery_tag: 0 };
        publisher.expect_method(0, 10, 10).await?; // connection.start
        let mut start_ok = method(10, 11);
        start_ok.extend_from_slice(&0u32.to_be_bytes()); // client-properties: empty table
        short_string(&mut start_ok, b"PLAIN");
        let response = format!("\0{user}\0{password}");
        start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
        start_ok.extend_from_slice(response.as_bytes());
        short_string(&mut start_ok, b"en_US");
        publisher.send_frame(1, 0, &start_ok).await?;
        let tune = publisher.expect_method(0, 10, 30).await?; // connection.tune
        let mut tune_ok = method(10, 31);
        tune_ok.extend_from_slice(&tune[4..10]); // channel-max and frame-max as offered
        tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        publisher.send_frame(1, 0, &tune_ok).await?;
        let mut open = method(10, 40);
        short_string(&mut open, b"/");
        short_string(&mut open, b"");
        open.push(0);
        publisher.send_frame(1, 0, &open).await?;
        publisher.expect_method(0, 10, 41).await?;
        let mut channel_open = method(20, 10);
        short_string(&mut channel_open, b"");
        publisher.send_frame(1, 1, &channel_open).await?;
        publisher.expect_method(1, 20, 11).await?;
        let mut select = method(85, 10);
        select.push(0);
        publisher.send_frame(1, 1, &select).await?;
        publisher.expect_method(1, 85, 11).await?;
        Ok(publisher)
    }

    /// Publishes `body` with `properties` and waits for the broker's confirm.
    pub(crate) async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: &[RawProperty],
        body: &[u8],
    ) -> std::io::Result<Published> {
        let mut publish = method(60, 40);
        publish.extend_from_slice(&0u16.to_be_bytes());
        short_string(&mut publish, exchange.as_bytes());
        short_string(&mut publish, routing_key.as_bytes());
        publish.push(0);
        self.send_frame(1, 1, &publish).await?;
        let mut header = Vec::new();
        header.extend_from_slice(&60u16.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        let mut sorted: Vec<&RawProperty> = properties.iter().collect();
        sorted.sort_by_key(|p| std::cmp::Reverse(p.flag()));
        header.extend_from_slice(&sorted.iter().fold(0u16, |flags, p| flags | p.flag()).to_be_bytes());
        for property in sorted {
            property.encode(&mut header);
        }
        self.send_frame(2, 1, &header).await?;
        self.send_frame(3, 1, body).await?;
        self.delivery_tag += 1;
        loop {
            let (kind, _, payload) = self.read_frame().await?;
            if kind != 1 || payload.len() < 4 {
                continue;
            }
            match (u16::from_be_bytes([payload[0], payload[1]]), u16::from_be_bytes([payload[2], payload[3]])) {
                (60, 80) => return Ok(Published::Acked),
                (60, 120) => return Ok(Published::Nacked),
                (20, 40) | (10, 50) => {
                    let text_len = usize::from(payload.get(6).copied().unwrap_or(0));
                    let text = payload.get(7..7 + text_len).unwrap_or_default();
                    return Ok(Published::Refused(String::from_utf8_lossy(text).into_owned()));
                }
                _ => continue,
            }
        }
    }

    async fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame).await
    }

    async fn read_frame(&mut self) -> std::io::Result<(u8, u16, Vec<u8>)> {
        let read = async {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head).await?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload).await?;
            payload.pop();
            Ok((head[0], u16::from_be_bytes([head[1], head[2]]), payload))
        };
        tokio::time::timeout(FRAME_TIMEOUT, read)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no frame from the broker"))?
    }

    /// Reads frames until method `class.method` on `channel`; returns its arguments' payload.
    async fn expect_method(&mut self, channel: u16, class: u16, id: u16) -> std::io::Result<Vec<u8>> {
        loop {
            let (kind, on, payload) = self.read_frame().await?;
            if kind == 1 && on == channel && payload.len() >= 4 {
                let got = (u16::from_be_bytes([payload[0], payload[1]]), u16::from_be_bytes([payload[2], payload[3]]));
                if got == (class, id) {
                    return Ok(payload);
                }
                if got == (10, 50) || got == (20, 40) {
                    return Err(std::io::Error::other(format!(
                        "the broker closed: {:?}",
                        String::from_utf8_lossy(&payload)
                    )));
                }
            }
        }
    }
}

fn method(class: u16, id: u16) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&class.to_be_bytes());
    payload.extend_from_slice(&id.to_be_bytes());
    payload
}
