//! Benchmarks of gitplane's hot paths live in `benches/` (`cargo bench -p gitplane-bench`):
//! `codecs` (pkt-line, HTTP head, chunked, gzip request bodies, SHA-256 streaming), `lfs` (batch
//! JSON round, SHA-256 through the pinned buffer pool) and `splice` (pipe to socket with splice
//! versus a read/write copy loop, in wall time and in CPU time per MiB). Their inputs come from
//! `gitplane-icount` (`icount/`), which also runs the same paths under callgrind for
//! instruction counts (`bench/icount.sh`). This library is empty on purpose: the package exists
//! to hold the benches and their dev-dependencies apart from the appliance.
