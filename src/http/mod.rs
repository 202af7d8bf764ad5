//! HTTP/1.1: sans-I/O codecs ([`head`], [`chunked`], [`response`]) and the I/O around them
//! ([`conn`], [`body`], [`server`]).

pub mod body;
pub mod chunked;
pub mod conn;
pub mod head;
pub mod response;
pub mod server;
