//! The frames a client sends on an SSH WebSocket, read as the server reads them (tungstenite,
//! server role, the server's message and frame limit): never a panic, never a message over the
//! limit, and every error is one the server answers with a close code.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error, Message, WebSocket};

/// `gitplane::ssh::websocket::MAX_MESSAGE`.
const MAX_MESSAGE: usize = 512 * 1024;

/// Reads the fuzz input; writes go nowhere.
struct Input(Cursor<Vec<u8>>);

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Input {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let mut ws = WebSocket::from_raw_socket(
        Input(Cursor::new(data.to_vec())),
        Role::Server,
        Some(config),
    );
    for _ in 0..1024 {
        match ws.read() {
            Ok(Message::Binary(b)) => assert!(b.len() <= MAX_MESSAGE),
            Ok(Message::Text(t)) => assert!(t.len() <= MAX_MESSAGE),
            Ok(_) => {}
            Err(Error::Io(_) | Error::ConnectionClosed | Error::AlreadyClosed) => break,
            Err(Error::Protocol(_) | Error::Capacity(_) | Error::Utf8) => break,
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
});
