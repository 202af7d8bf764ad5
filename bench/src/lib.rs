//! Benchmarks of gitplane's hot paths live in `benches/` (`cargo bench -p gitplane-bench`):
//! `codecs` (pkt-line, HTTP head, chunked, gzip request bodies, SHA-256 streaming) and `splice`
//! (pipe to socket with splice versus a read/write copy loop). This library is empty on purpose:
//! the package exists to hold the benches and their dev-dependencies apart from the appliance.
